"""Build (if needed) and load every dataset of one seed, and write the statistics table of DATASETS.md.

For every task and type: transitions, episodes, episode return mean +- std (the evaluation's reward aggregation,
common.dataset.episode_returns), build seconds, OMAR's published size, mean and std (cfcql-reference.md Sec. 5.3)
and the three calibration targets against them.
Datasets whose behaviour file is not shipped are listed as not built, with the reason.

    python scripts/dataset_card.py [--seed 0] [--data-dir data] [--card DATASETS.md] [--no-build]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.build import behaviour_file, ensure_dataset  # noqa: E402
from common.dataset import dataset_path, episode_returns, load_dataset, read_metadata  # noqa: E402
from common.tasks import DATASET_TYPES, TASKS  # noqa: E402

# OMAR's datasets (OG-MARL copies, dataset seed 0): (transitions, mean, std of the episode returns)
OMAR = {
    ("cn", "random"): (1_000_000, 159.6, 60.5),
    ("cn", "medium-replay"): (97_500, 203.7, 80.5),
    ("cn", "medium"): (1_000_000, 273.4, 92.1),
    ("cn", "expert"): (1_000_000, 531.0, 71.4),
    ("pp", "random"): (1_000_000, -4.1, 10.8),
    ("pp", "medium-replay"): (62_500, 3.9, 20.3),
    ("pp", "medium"): (1_000_000, 116.4, 58.9),
    ("pp", "expert"): (1_000_000, 207.9, 77.5),
    ("world", "random"): (1_000_000, -6.8, 5.7),
    ("world", "medium-replay"): (80_000, 1.2, 13.5),
    ("world", "medium"): (1_000_000, 65.9, 29.6),
    ("world", "expert"): (1_000_000, 85.2, 31.1),
    ("halfcheetah", "random"): (1_000_000, -282.9, 77.5),
    ("halfcheetah", "medium-replay"): (460_000, 423.5, 655.7),
    ("halfcheetah", "medium"): (1_000_000, 1568.9, 273.4),
    ("halfcheetah", "expert"): (1_000_000, 3338.7, 252.6),
}
# Calibration targets against OMAR's dataset: |normalized mean difference| <= 0.05 (normalized with OMAR's random
# and expert means), std ratio in [0.75, 1.33], size ratio in [0.75, 1.25].
MAX_MEAN_DIFF, STD_RATIO, SIZE_RATIO = 0.05, (0.75, 1.33), (0.75, 1.25)
START, END = "<!-- dataset-table:start -->", "<!-- dataset-table:end -->"
B_START, B_END = "<!-- behaviour:start -->", "<!-- behaviour:end -->"


@dataclass
class Args:
    seed: int = 0
    """dataset seed to describe"""
    data_dir: str = "data"
    """dataset root"""
    card: str = "DATASETS.md"
    """markdown file whose table (between the markers) is replaced"""
    build: bool = True
    """build missing datasets (else only describe the files that exist)"""


def row(task: str, dataset: str, args: Args) -> tuple[str, bool]:
    """The table row of (task, dataset) and whether it meets all three calibration targets."""
    omar_n, omar_mean, omar_std = OMAR[(task, dataset)]
    omar = f"{omar_n:,} | {omar_mean} ± {omar_std}"
    path = dataset_path(args.data_dir, task, dataset, args.seed)
    if not path.is_file():
        if dataset != "random" and not behaviour_file(task, dataset).is_file():
            reason = f"not built: common/behaviour/{behaviour_file(task, dataset).name} not shipped"
            return f"| {task} | {dataset} | {reason} | | | | {omar} | | | | |", False
        if not args.build:
            return (
                f"| {task} | {dataset} | not built (python -m common.build) | | | | {omar} | | | | |",
                False,
            )
        ensure_dataset(task, dataset, args.seed, args.data_dir)
    ds = load_dataset(path, task, dataset)
    returns = episode_returns(
        TASKS[task], ds.rewards.numpy(), ds.dones.numpy().astype(bool), ds.timeouts.numpy().astype(bool)
    )
    scale = OMAR[(task, "expert")][1] - OMAR[(task, "random")][1]
    mean_diff = (returns.mean() - omar_mean) / scale
    std_ratio, size_ratio = returns.std() / omar_std, len(ds) / omar_n
    meets = (
        abs(mean_diff) <= MAX_MEAN_DIFF
        and STD_RATIO[0] <= std_ratio <= STD_RATIO[1]
        and SIZE_RATIO[0] <= size_ratio <= SIZE_RATIO[1]
    )
    seconds = read_metadata(path).get("rollout_seconds", float("nan"))
    return (
        f"| {task} | {dataset} | {len(ds):,} | {len(returns):,} | {returns.mean():.1f} ± {returns.std():.1f} "
        f"| {seconds:.1f} | {omar} | {mean_diff:+.3f} | {std_ratio:.2f} | {size_ratio:.2f} | {'yes' if meets else 'no'} |",
        meets,
    )


def behaviour_table() -> str:
    """One line per shipped behaviour file, from the json it carries (written by scripts/export_behaviour.py)."""
    lines = [
        "| file | size | source run | snapshot / schedule | env steps of the run | noise | return with noise "
        "| deterministic |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for task in TASKS:
        for dataset in DATASET_TYPES[1:]:
            path = behaviour_file(task, dataset)
            if not path.is_file():
                lines.append(f"| {path.name} | not shipped | | | | | | |")
                continue
            with np.load(path, allow_pickle=False) as f:
                info = json.loads(str(f["meta" if "meta" in f.files else "schedule"]))
            size = f"{path.stat().st_size / 1e6:.2f} MB"
            if dataset == "medium-replay":
                snaps = len(info["episodes_per_snapshot"])
                what = (
                    f"{info['warmup_episodes']} random + {snaps} snapshots, {info['total_episodes']} episodes"
                )
                steps = (
                    info["snapshot_env_steps"][-1]
                    + info["episodes_per_snapshot"][-1] * TASKS[task].episode_length
                )
                lines.append(
                    f"| {path.name} | {size} | {info['source_run']} | {what} | {steps:,} | "
                    f"{info['exploration_noise']} | "
                    f"last snapshot {info['storage_check']['last_snapshot_return_stored']:.1f} | |"
                )
            else:
                lines.append(
                    f"| {path.name} | {size} | {info['source_run']} | {info['snapshot']} | {info['env_steps']:,} | "
                    f"{info['exploration_noise']} | "
                    f"{info['return_with_noise']:.1f} ± {info['return_with_noise_std']:.1f} | "
                    f"{info['return_deterministic']:.1f} |"
                )
    lines.append("")
    lines.append(
        "Returns measured by scripts/export_behaviour.py on fresh episodes (2000 MPE, 20-200 halfcheetah: the "
        "file's meta says how many) with the file's exploration noise N(0, noise^2); medium-replay: its last snapshot "
        "with its run's noise. Total size of common/behaviour/: "
        f"{sum(p.stat().st_size for p in behaviour_file('cn', 'expert').parent.glob('*.npz')) / 1e6:.2f} MB."
    )
    return "\n".join(lines)


def replace_between(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(args: Args):
    lines = [
        f"Dataset seed {args.seed}. Return = sum over the episode of the evaluation reward (cn: mean over agents; "
        "pp / world: predator 0; halfcheetah: team reward); std over episodes (ddof 0).",
        "",
        "Targets against OMAR's dataset: normalized mean difference (ours - OMAR) / (OMAR expert - OMAR random) "
        f"within ±{MAX_MEAN_DIFF}, std ratio in [{STD_RATIO[0]}, {STD_RATIO[1]}], size ratio in "
        f"[{SIZE_RATIO[0]}, {SIZE_RATIO[1]}]. Build: seconds of the rollout (one thread).",
        "",
        "| task | type | transitions | episodes | return mean ± std | build s | OMAR transitions | OMAR mean ± std "
        "| norm. mean diff | std ratio | size ratio | meets all |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    met = 0
    for task in TASKS:
        for dataset in DATASET_TYPES:
            line, meets = row(task, dataset, args)
            lines.append(line)
            met += meets
            print(line, flush=True)
    lines += ["", f"{met} of {len(TASKS) * len(DATASET_TYPES)} datasets meet all three targets."]
    table = "\n".join(lines)
    card = Path(args.card)
    text = card.read_text() if card.is_file() else f"# Datasets\n\n{START}\n{END}\n"
    text = replace_between(text, START, END, table)
    if B_START in text:
        text = replace_between(text, B_START, B_END, behaviour_table())
    card.write_text(text)
    print(f"wrote the tables into {card}")


if __name__ == "__main__":
    main(tyro.cli(Args))
