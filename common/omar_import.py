"""Convert OMAR's published datasets (the layout the OMAR / CFCQL code reads) into our HDF5 files.

Source layout (cfcql-reference.md Sec. 5.1), for every agent index i:
    <src>/<env_id>/<type>/seed_<k>_data/{obs,acs,rews,next_obs,dones}_<i>.npy   (+ states_0, next_states_0 for HC)
with env_id in simple_spread / simple_tag / simple_world / HalfCheetah-v2. Only the learners 0..n-1 are read:
in simple_tag / simple_world agent 3 is the prey, which the environment drives with its pretrained policy.

Rows are time-ordered, whole episodes of the task's fixed length (25 MPE, 1000 HalfCheetah); the reference code
relies on that and so do we: timeouts mark every 25th / 1000th row, dones are copied as given (expected all
zero). next_actions follows the reference sampler, `next_acs = acs[(idx + 1) % N]` (Sec. 5.2): the next row,
which at the last step of an episode is the first action of the NEXT episode (and row 0 after the last row).
That is recorded as `next_actions_convention = "next_row (reference)"`; our own generator instead stores the
behaviour policy's action at s'.

    python -m common.omar_import --src /path/to/omar/datasets --task cn --dataset random --seed 0 --data-dir data
    python -m common.omar_import --src /path/to/omar/datasets --all --data-dir data
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from common.dataset import ACTION_TOLERANCE, DatasetError, dataset_path, locked, write_dataset
from common.tasks import DATASET_TYPES, TASKS, check_dataset_type, get_task

NEXT_ACTIONS_CONVENTION = "next_row (reference)"


def source_dir(src: str | Path, task: str, dataset: str, seed: int) -> Path:
    return Path(src) / get_task(task).omar_env_id / check_dataset_type(dataset) / f"seed_{int(seed)}_data"


def _load(folder: Path, name: str, shape_tail: tuple[int, ...], num_rows: int | None) -> np.ndarray:
    """np.load `folder/name.npy` (memory-mapped) and check it is [N, *shape_tail]; [N, 1] counts as [N]."""
    file = folder / f"{name}.npy"
    try:
        x = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{file}: cannot read ({e})") from e
    if shape_tail == () and x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if (
        x.ndim != 1 + len(shape_tail)
        or x.shape[1:] != shape_tail
        or (num_rows is not None and len(x) != num_rows)
    ):
        want = ("N" if num_rows is None else str(num_rows),) + tuple(map(str, shape_tail))
        raise DatasetError(f"{file}: shape {x.shape}, expected [{', '.join(want)}]")
    return x


def read_omar(folder: str | Path, task: str) -> dict[str, np.ndarray]:
    """Arrays in write_dataset's layout from one OMAR `seed_<k>_data` folder (see the module docstring)."""
    folder, spec = Path(folder), get_task(task)
    n, T = spec.n_agents, spec.episode_length
    names = [f"{k}_{i}" for i in range(n) for k in ("obs", "acs", "rews", "next_obs", "dones")]
    if spec.family == "mamujoco":
        # every agent holds the same copy of the state; the reference reads agent 0's
        names += ["states_0", "next_states_0"]
    missing = [f"{m}.npy" for m in names if not (folder / f"{m}.npy").is_file()]
    if missing:
        raise DatasetError(
            f"{folder}: missing {missing} (OMAR layout for {spec.omar_env_id}, agents 0..{n - 1})"
        )

    N = len(_load(folder, "obs_0", (spec.obs_dim,), None))
    if N == 0 or N % T:
        raise DatasetError(
            f"{folder}: {N} rows is not a whole number of {T}-step episodes of {spec.omar_env_id}"
        )
    out = {
        "obs": np.empty((N, n, spec.obs_dim), np.float32),
        "actions": np.empty((N, n, spec.act_dim), np.float32),
        "rewards": np.empty((N, n), np.float32),
        "next_obs": np.empty((N, n, spec.obs_dim), np.float32),
    }
    dones = np.zeros(N, bool)
    for i in range(n):
        out["obs"][:, i] = _load(folder, f"obs_{i}", (spec.obs_dim,), N)
        out["actions"][:, i] = _load(folder, f"acs_{i}", (spec.act_dim,), N)
        out["rewards"][:, i] = _load(folder, f"rews_{i}", (), N)
        out["next_obs"][:, i] = _load(folder, f"next_obs_{i}", (spec.obs_dim,), N)
        dones |= _load(folder, f"dones_{i}", (), N) != 0  # a step is terminal when any agent says so
    if spec.family == "mamujoco":
        out["states"] = _load(folder, "states_0", (spec.state_dim,), N).astype(np.float32)
        out["next_states"] = _load(folder, "next_states_0", (spec.state_dim,), N).astype(np.float32)
    mid_episode = np.flatnonzero(dones & (np.arange(N) % T != T - 1))
    if len(mid_episode):
        # episodes are recovered from the fixed length, so a termination inside one would shift all that follow
        raise DatasetError(
            f"{folder}: done = 1 inside a {T}-step episode at {len(mid_episode)} rows (first: row "
            f"{mid_episode[0]}); cannot recover episode boundaries"
        )
    # the reference's next_acs = acs[(idx + 1) % N]: crosses episode ends, and wraps at N (Sec. 5.2)
    out["next_actions"] = np.roll(out["actions"], -1, axis=0)
    out["dones"] = dones
    out["timeouts"] = (np.arange(N) % T) == T - 1
    return out


def import_omar(
    src: str | Path,
    task: str,
    dataset: str,
    seed: int,
    data_dir: str | Path,
    *,
    clip_actions: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert one OMAR dataset to `dataset_path(data_dir, task, dataset, seed)`; returns that path.

    An existing file is kept unless `overwrite`. With `clip_actions`, actions outside [-1, 1] are clipped (and
    counted in the `actions_clipped` attribute) instead of rejected.
    """
    spec = get_task(task)
    folder = source_dir(src, task, dataset, seed)
    path = dataset_path(data_dir, task, dataset, seed)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder (OMAR layout <src>/<env_id>/<type>/seed_<k>_data)")
    with locked(path):
        if path.exists() and not overwrite:
            print(f"{path}: exists, kept (use --overwrite to convert again)")
            return path
        arrays = read_omar(folder, spec.name)
        extra = {
            "source": str(folder),
            "omar_env_id": spec.omar_env_id,
            "next_actions_convention": NEXT_ACTIONS_CONVENTION,
            "source_dones_nonzero": int(arrays["dones"].sum()),
        }
        a = arrays["actions"]
        if not clip_actions and (a.min() < -1 - ACTION_TOLERANCE or a.max() > 1 + ACTION_TOLERANCE):
            raise DatasetError(
                f"{folder}: acs_<i>.npy hold values outside [-1, 1] (min {a.min():.6g}, max {a.max():.6g}); "
                "pass --clip-actions to clip them"
            )
        if clip_actions:
            outside = np.abs(arrays["actions"]) > 1
            extra["actions_clipped"] = int(outside.sum())
            for k in ("actions", "next_actions"):
                np.clip(arrays[k], -1, 1, out=arrays[k])
        if arrays["dones"].any():
            # MPE and HalfCheetah never terminate, so OMAR's dones should be all zero (cfcql-reference.md B20)
            print(
                f"{folder}: note: {int(arrays['dones'].sum())} of {len(arrays['dones'])} rows have done = 1"
            )
        write_dataset(
            path,
            task=spec.name,
            dataset=dataset,
            seed=seed,
            **arrays,
            behaviour_policy=f"OMAR published '{dataset}' data (MATD3 behaviour policies, OMAR paper Sec. 5.1)",
            generator="common.omar_import",
            extra_attrs=extra,
        )
    N, T = len(arrays["obs"]), spec.episode_length
    print(f"{folder} -> {path}: {N} transitions, {N // T} episodes")
    return path


def find_sources(src: str | Path) -> list[tuple[str, str, int]]:
    """Every (task, dataset, seed) with a `seed_<k>_data` folder under `src`."""
    found = []
    for spec in TASKS.values():
        for dataset in DATASET_TYPES:
            parent = Path(src) / spec.omar_env_id / dataset
            for d in sorted(parent.glob("seed_*_data")) if parent.is_dir() else []:
                m = re.fullmatch(r"seed_(\d+)_data", d.name)
                if m and d.is_dir():
                    found.append((spec.name, dataset, int(m.group(1))))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="OMAR's datasets root (holds simple_spread/, ...)")
    parser.add_argument("--task", help="cn | pp | world | halfcheetah (or an alias)")
    parser.add_argument("--dataset", choices=DATASET_TYPES)
    parser.add_argument("--seed", type=int, default=0, help="OMAR's dataset number k (seed_<k>_data)")
    parser.add_argument("--data-dir", default="data", help="our datasets root")
    parser.add_argument(
        "--all", action="store_true", help="convert every seed_<k>_data folder found under --src"
    )
    parser.add_argument(
        "--clip-actions", action="store_true", help="clip actions to [-1, 1] instead of failing"
    )
    parser.add_argument("--overwrite", action="store_true", help="convert again when the output exists")
    args = parser.parse_args(argv)
    if args.all:
        jobs = find_sources(args.src)
        if not jobs:
            parser.error(f"no <env_id>/<type>/seed_<k>_data folders under {args.src}")
    elif args.task is None or args.dataset is None:
        parser.error("give --task and --dataset, or --all")
    else:
        jobs = [(args.task, args.dataset, args.seed)]
    failed = 0
    for task, dataset, seed in jobs:
        try:
            import_omar(
                args.src,
                task,
                dataset,
                seed,
                args.data_dir,
                clip_actions=args.clip_actions,
                overwrite=args.overwrite,
            )
        except (DatasetError, ValueError) as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
