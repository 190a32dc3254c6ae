"""Build (if needed) and load every dataset of one seed, and write the statistics table of DATASETS.md.

For every task and type: transitions, episodes, episode return mean +- std, min, max (the evaluation's reward
aggregation, common.dataset.episode_returns) beside OMAR's published mean (cfcql-reference.md Sec. 5.3).
Datasets whose behaviour file is not shipped are listed as not built, with the reason.

    python scripts/dataset_card.py [--seed 0] [--data-dir data] [--card DATASETS.md] [--no-build]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.build import behaviour_file, ensure_dataset  # noqa: E402
from common.dataset import dataset_path, episode_returns, load_dataset  # noqa: E402
from common.tasks import DATASET_TYPES, TASKS  # noqa: E402

# OMAR's datasets (OG-MARL copies, dataset seed 0): (transitions, mean episode return)
OMAR = {
    ("cn", "random"): (1_000_000, 159.6),
    ("cn", "medium-replay"): (97_500, 203.7),
    ("cn", "medium"): (1_000_000, 273.4),
    ("cn", "expert"): (1_000_000, 531.0),
    ("pp", "random"): (1_000_000, -4.1),
    ("pp", "medium-replay"): (62_500, 3.9),
    ("pp", "medium"): (1_000_000, 116.4),
    ("pp", "expert"): (1_000_000, 207.9),
    ("world", "random"): (1_000_000, -6.8),
    ("world", "medium-replay"): (80_000, 1.2),
    ("world", "medium"): (1_000_000, 65.9),
    ("world", "expert"): (1_000_000, 85.2),
    ("halfcheetah", "random"): (1_000_000, -282.9),
    ("halfcheetah", "medium-replay"): (460_000, 423.5),
    ("halfcheetah", "medium"): (1_000_000, 1568.9),
    ("halfcheetah", "expert"): (1_000_000, 3338.7),
}
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


def row(task: str, dataset: str, args: Args) -> str:
    omar_n, omar_mean = OMAR[(task, dataset)]
    path = dataset_path(args.data_dir, task, dataset, args.seed)
    if not path.is_file():
        if dataset != "random" and not behaviour_file(task, dataset).is_file():
            reason = (
                f"not built: behaviour file common/behaviour/{behaviour_file(task, dataset).name} not shipped"
            )
            return f"| {task} | {dataset} | {reason} | | | | | {omar_n:,} | {omar_mean} |"
        if not args.build:
            return f"| {task} | {dataset} | not built (run python -m common.build) | | | | | {omar_n:,} | {omar_mean} |"
        start = time.time()
        ensure_dataset(task, dataset, args.seed, args.data_dir)
        print(f"built {path} in {time.time() - start:.1f} s")
    ds = load_dataset(path, task, dataset)
    returns = episode_returns(
        TASKS[task], ds.rewards.numpy(), ds.dones.numpy().astype(bool), ds.timeouts.numpy().astype(bool)
    )
    return (
        f"| {task} | {dataset} | {len(ds):,} | {len(returns):,} | {returns.mean():.1f} ± {returns.std():.1f} "
        f"| {returns.min():.1f} | {returns.max():.1f} | {omar_n:,} | {omar_mean} |"
    )


def behaviour_table() -> str:
    """One line per shipped behaviour file, from the json it carries (written by scripts/export_behaviour.py)."""
    lines = [
        "| file | size | source run | snapshot / schedule | env steps of the run | return with noise | deterministic |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for task in TASKS:
        for dataset in DATASET_TYPES[1:]:
            path = behaviour_file(task, dataset)
            if not path.is_file():
                lines.append(f"| {path.name} | not shipped | | | | | |")
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
                    f"last snapshot {info['storage_check']['last_snapshot_return_stored']:.1f} | |"
                )
            else:
                lines.append(
                    f"| {path.name} | {size} | {info['source_run']} | {info['snapshot']} | {info['env_steps']:,} | "
                    f"{info['return_with_noise']:.1f} ± {info['return_with_noise_std']:.1f} | "
                    f"{info['return_deterministic']:.1f} |"
                )
    lines.append("")
    lines.append(
        "Returns measured by scripts/export_behaviour.py on 2000 (MPE) / 50 (halfcheetah) fresh episodes; "
        f"exploration noise N(0, 0.1^2) in every file. Total size of common/behaviour/: "
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
        "| task | type | transitions | episodes | return mean ± std | min | max | OMAR transitions | OMAR mean |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in TASKS:
        for dataset in DATASET_TYPES:
            lines.append(row(task, dataset, args))
            print(lines[-1], flush=True)
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
