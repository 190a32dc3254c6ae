"""Offline datasets: one validated HDF5 file per (task, dataset type, dataset seed).

Layout (format_version 1), N transitions stored time-ordered, episode after episode:

    obs, next_obs              [N, n, obs_dim]  float32
    actions, next_actions      [N, n, act_dim]  float32, in [-1, 1]
    rewards                    [N, n]           float32 (per learning agent)
    dones, timeouts            [N]              uint8 (true termination / time-limit end of an episode)
    states, next_states        [N, 17]          float32, halfcheetah only (MPE states = concat of the learners'
                                                obs, computed on load, never stored)

plus attributes that say where the file came from (generator, behaviour policy, package versions) and what is
in it (episode-return statistics with the evaluation's reward aggregation, the normalisation references).

`next_actions` is the action taken at next_obs. The project's generator stores the behaviour policy's own action
at s'; files imported from OMAR follow the reference code, which uses the next dataset row (`acs[(idx+1) % N]`,
cfcql-reference.md Sec. 5.2) and record `next_actions_convention` in their attributes.

Writing is atomic (temporary file in the same directory, fsync, `os.replace`) and serialised by an exclusive
`fcntl.flock` on `<path>.lock`; `locked(path)` exposes that lock so a builder can "check exists, else build and
write" without two processes building the same file. Reading takes no lock (a folder of finished datasets may be
read-only). Temporary files of a writer killed with -9 are removed by the next write of the same dataset.

Arrays are stored uncompressed and contiguous: on a 1M-transition Cooperative Navigation file lzf saved ~15% of
the disk space but made writing ~8x and reading ~1.5x slower (gzip-1: ~25x / ~2.3x).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import math
import os
import re
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from common.runs import UserError
from common.tasks import TASKS, TaskSpec, check_dataset_type, get_task

FORMAT_VERSION = 1

# (R_random, R_expert): mean episode returns of OMAR's random / expert datasets as published on the OG-MARL
# dataset card (dataset seed 0), the D4RL-style normalisation used by OMAR and CFCQL (cfcql-reference.md 5.5).
REFERENCE_RETURNS: dict[str, tuple[float, float]] = {
    "cn": (159.6, 531.0),
    "pp": (-4.1, 207.9),
    "world": (-6.8, 85.2),
    # Measured by OMAR on MuJoCo 2.0 / gym HalfCheetah-v2; our environment is HalfCheetah-v5 on MuJoCo 4, whose
    # numerics differ (benchmark-tasks.md Sec. 3), so halfcheetah scores are comparable only to our own runs.
    "halfcheetah": (-282.9, 3338.7),
}

FLOAT_KEYS = ("obs", "actions", "rewards", "next_obs", "next_actions")
FLAG_KEYS = ("dones", "timeouts")
STATE_KEYS = ("states", "next_states")  # stored for halfcheetah only
ACTION_TOLERANCE = 1e-6

# attributes written by write_dataset; extra_attrs may not overwrite them
RESERVED_ATTRS = tuple(
    "format_version task dataset dataset_seed generator behaviour_policy package_versions created num_transitions "
    "num_episodes return_mean return_std return_min return_max ref_random_return ref_expert_return".split()
)


class DatasetError(UserError, ValueError):
    """A dataset file (or the arrays about to be written to one) is missing or malformed; the message names the
    file. A UserError, so that the algorithm files' CLI reports it as one line."""


@dataclass
class OfflineDataset:
    """A whole dataset as float32 torch tensors on one device (dones / timeouts as 0.0 / 1.0)."""

    obs: torch.Tensor  # [N, n, obs_dim]
    actions: torch.Tensor  # [N, n, act_dim]
    rewards: torch.Tensor  # [N, n]
    next_obs: torch.Tensor  # [N, n, obs_dim]
    next_actions: torch.Tensor  # [N, n, act_dim]
    dones: torch.Tensor  # [N]
    timeouts: torch.Tensor  # [N]
    states: torch.Tensor  # [N, state_dim]; MPE: a view of obs reshaped to [N, n * obs_dim]
    next_states: torch.Tensor  # [N, state_dim]
    meta: dict = field(default_factory=dict)  # the file's attributes (+ "path")

    def __len__(self) -> int:
        return self.obs.shape[0]


def dataset_path(data_dir: str | os.PathLike, task: str, dataset: str, seed: int) -> Path:
    """`data_dir/<task>/<dataset>/seed_<seed>.h5`, with the task's canonical short name."""
    return Path(data_dir) / get_task(task).name / check_dataset_type(dataset) / f"seed_{int(seed)}.h5"


def normalized_score(task: str, episode_return: float) -> float:
    """D4RL-style score 100 * (R - R_random) / (R_expert - R_random) (cfcql-reference.md Sec. 5.5)."""
    r_random, r_expert = REFERENCE_RETURNS[get_task(task).name]
    episode_return = float(episode_return)
    if not math.isfinite(episode_return):
        raise ValueError(f"normalized_score: episode return must be finite, got {episode_return}")
    return 100.0 * (episode_return - r_random) / (r_expert - r_random)


# ---------------------------------------------------------------------------------------------------------------
# validation shared by write and load
# ---------------------------------------------------------------------------------------------------------------


def expected_shapes(spec: TaskSpec, num_transitions: int) -> dict[str, tuple[int, ...]]:
    N, n = num_transitions, spec.n_agents
    shapes = {
        "obs": (N, n, spec.obs_dim),
        "actions": (N, n, spec.act_dim),
        "rewards": (N, n),
        "next_obs": (N, n, spec.obs_dim),
        "next_actions": (N, n, spec.act_dim),
        "dones": (N,),
        "timeouts": (N,),
    }
    if spec.family == "mamujoco":
        shapes["states"] = shapes["next_states"] = (N, spec.state_dim)
    return shapes


def _all_finite(x: np.ndarray) -> bool:
    # min / max propagate NaN and expose +-inf, without isfinite's N-sized temporary (3x faster here)
    return bool(np.isfinite(x.min()) and np.isfinite(x.max()))


def checksum(x: np.ndarray) -> int:
    """CRC-32 of the array's bytes, stored beside each HDF5 dataset: HDF5 itself does not notice flipped data
    bytes, and its own fletcher32 filter made reading a 1M-transition file 20x slower."""
    return zlib.crc32(np.ascontiguousarray(x))


def episode_bounds(dones: np.ndarray, timeouts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the episodes; an episode ends at a step with done or timeout set."""
    ends = np.flatnonzero(np.logical_or(dones, timeouts))
    starts = np.concatenate([[0], ends[:-1] + 1])
    return starts, ends - starts + 1


def episode_returns(
    spec: TaskSpec, rewards: np.ndarray, dones: np.ndarray, timeouts: np.ndarray
) -> np.ndarray:
    """Per-episode returns with the evaluation's aggregation (cfcql-reference.md Sec. 6): mean over agents for
    cn, agent 0 for pp / world (predator 0; all predators share it) and halfcheetah (team reward)."""
    step_reward = (
        rewards.mean(axis=1, dtype=np.float64) if spec.name == "cn" else rewards[:, 0].astype(np.float64)
    )
    starts, _ = episode_bounds(dones, timeouts)
    return np.add.reduceat(step_reward, starts)


def _validate(spec: TaskSpec, arrays: dict[str, np.ndarray], where: str) -> None:
    """Raise DatasetError (message starting with `where`) unless `arrays` is a well-formed dataset of `spec`."""
    N = arrays["obs"].shape[0] if arrays["obs"].ndim > 0 else 0
    if N == 0:
        raise DatasetError(f"{where}: dataset is empty (obs has shape {arrays['obs'].shape})")
    for key, shape in expected_shapes(spec, N).items():
        if arrays[key].shape != shape:
            raise DatasetError(
                f"{where}: {key!r} has shape {arrays[key].shape}, expected {shape} for task {spec.name!r} "
                f"(N = {N} transitions from obs)"
            )
    for key in FLOAT_KEYS + tuple(k for k in STATE_KEYS if k in arrays):
        if not _all_finite(arrays[key]):
            bad = np.argwhere(~np.isfinite(arrays[key]))
            raise DatasetError(
                f"{where}: {key!r} has {len(bad)} non-finite values, first at index {tuple(int(i) for i in bad[0])}"
            )
    for key in ("actions", "next_actions"):
        a = arrays[key]
        if a.min() < -1 - ACTION_TOLERANCE or a.max() > 1 + ACTION_TOLERANCE:
            i = int(np.argmax(np.abs(a).reshape(N, -1).max(axis=1)))
            raise DatasetError(
                f"{where}: {key!r} outside [-1, 1] (min {a.min():.6g}, max {a.max():.6g}; first worst row {i})"
            )
    for key in FLAG_KEYS:  # uint8 / bool here (write casts after checking); only 0 and 1 are flags
        if arrays[key].max() > 1:
            raise DatasetError(f"{where}: {key!r} must hold only 0/1 (False/True), found {arrays[key].max()}")
    dones, timeouts = arrays["dones"].astype(bool), arrays["timeouts"].astype(bool)
    if not (dones[-1] or timeouts[-1]):
        raise DatasetError(
            f"{where}: the last transition (row {N - 1}) ends no episode (neither done nor timeout)"
        )
    # Episodes have the task's fixed length (TaskSpec.episode_length): a time-limit end comes exactly at that
    # step, and a true termination (never seen in these tasks, but allowed) at most there.
    starts, lengths = episode_bounds(dones, timeouts)
    ends = starts + lengths - 1
    T = spec.episode_length
    bad = (lengths > T) | (~dones[ends] & (lengths != T))
    if bad.any():
        k = int(np.argmax(bad))
        raise DatasetError(
            f"{where}: episode {k} (rows {starts[k]}..{ends[k]}) has {lengths[k]} steps and ends with "
            f"{'done' if dones[ends[k]] else 'timeout'}; {spec.name!r} episodes are {T} steps, ending with a "
            f"timeout (or earlier with done); {int(bad.sum())} of {len(bad)} episodes are malformed"
        )


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------

_held_locks = threading.local()  # paths whose lock this thread holds (makes `locked` re-entrant)


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on `<path>.lock` (fcntl.flock) for the block; re-entrant within a thread.

    Use it to build a dataset at most once across processes:
        with locked(path):
            if not path.exists():
                write_dataset(path, ...)   # write_dataset takes the same lock, re-entrantly
    The lock file is left in place: deleting it would let a third process lock a fresh inode while a second
    still waits on the old one.
    """
    path = Path(path).absolute()
    held = _held_locks.__dict__.setdefault("paths", {})
    if held.get(path):
        held[path] += 1
        try:
            yield path
        finally:
            held[path] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(f"{path}.lock", "a+")  # closed by the `with` below
    except OSError as e:
        raise DatasetError(
            f"{path}: cannot create the lock file {path}.lock ({e.strerror or e}): building or writing a "
            f"dataset needs a writable folder"
        ) from e
    with lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)  # blocks until the other holder leaves
        held[path] = 1
        try:
            yield path
        finally:
            held[path] = 0
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes of `path` left behind; call it holding `locked(path)`.

    The rule is "all of them": every writer of `path` (write_dataset) creates and removes its temporary file only
    while it holds the lock, so while we hold it any such file is an orphan. A PID-liveness check would be
    weaker: PIDs are reused, and on a shared filesystem the writer may have run on another machine.
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"\d+\.[0-9a-f]{8}\.tmp")
    removed = []
    for p in path.parent.iterdir():
        if pattern.fullmatch(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("numpy", "h5py", "torch", "mujoco", "gymnasium", "gymnasium-robotics"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions["hdf5"] = h5py.version.hdf5_version
    return versions


def _attr_value(key: str, value):
    """Something h5py stores as an attribute: scalars and strings as they are, anything else as JSON."""
    if isinstance(value, str | bool | int | float | np.generic):
        return value
    try:
        return json.dumps(value)
    except TypeError as e:
        raise DatasetError(f"extra attribute {key!r}: cannot store {type(value).__name__} ({e})") from e


def write_dataset(
    path: str | os.PathLike,
    *,
    task: str,
    dataset: str,
    seed: int,
    obs: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    next_obs: np.ndarray,
    next_actions: np.ndarray,
    dones: np.ndarray,
    timeouts: np.ndarray,
    states: np.ndarray | None = None,
    next_states: np.ndarray | None = None,
    behaviour_policy: str,
    generator: str,
    extra_attrs: dict | None = None,
) -> Path:
    """Validate the arrays (see module docstring for shapes) and write them atomically to `path`.

    Replaces an existing file at `path`; raises DatasetError (naming `path`) on malformed input.
    """
    path = Path(path)
    spec = get_task(task)
    check_dataset_type(dataset)
    where = f"{path} (writing)"
    arrays = dict(
        obs=obs,
        actions=actions,
        rewards=rewards,
        next_obs=next_obs,
        next_actions=next_actions,
        dones=dones,
        timeouts=timeouts,
    )
    if spec.family == "mamujoco":
        if states is None or next_states is None:
            raise DatasetError(
                f"{where}: task {spec.name!r} needs states and next_states [N, {spec.state_dim}]"
            )
        arrays.update(states=states, next_states=next_states)
    elif states is not None or next_states is not None:
        raise DatasetError(
            f"{where}: MPE states are the concatenated obs, computed on load; do not pass them"
        )
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k in FLAG_KEYS:
        if arrays[k].dtype.kind not in "biuf":
            raise DatasetError(f"{where}: {k!r} must be boolean or numeric, got dtype {arrays[k].dtype}")
        values = np.unique(arrays[k])
        if not np.isin(values, (0, 1)).all():
            raise DatasetError(f"{where}: {k!r} must hold only 0/1 (False/True), found values {values[:10]}")
    for k, v in arrays.items():
        if k not in FLAG_KEYS and v.dtype.kind not in "iuf":
            raise DatasetError(f"{where}: {k!r} must be numeric, got dtype {v.dtype}")
    arrays = {k: v.astype(np.uint8 if k in FLAG_KEYS else np.float32, copy=False) for k, v in arrays.items()}
    # validate what will be stored (after the float32 cast), so load never rejects what write accepted
    _validate(spec, arrays, where)

    returns = episode_returns(spec, arrays["rewards"], arrays["dones"], arrays["timeouts"])
    r_random, r_expert = REFERENCE_RETURNS[spec.name]
    attrs = dict(
        format_version=FORMAT_VERSION,
        task=spec.name,
        dataset=dataset,
        dataset_seed=int(seed),
        generator=str(generator),
        behaviour_policy=str(behaviour_policy),
        package_versions=json.dumps(package_versions()),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        num_transitions=len(arrays["obs"]),
        num_episodes=len(returns),
        return_mean=float(returns.mean()),
        return_std=float(returns.std()),  # population std (ddof = 0) over episodes
        return_min=float(returns.min()),
        return_max=float(returns.max()),
        ref_random_return=r_random,
        ref_expert_return=r_expert,
    )
    for key, value in (extra_attrs or {}).items():
        if key in attrs:
            raise DatasetError(f"{where}: extra attribute {key!r} would overwrite a reserved attribute")
        attrs[key] = _attr_value(key, value)

    with locked(path):
        remove_stale_temp_files(path)
        # same directory, so os.replace is an atomic rename; not mkstemp, whose 0600 mode the final file would
        # inherit; the PID and random part keep the name unique
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with h5py.File(tmp, "w-") as f:
                for key, value in arrays.items():
                    # contiguous, uncompressed: see module docstring
                    f.create_dataset(key, data=value).attrs["crc32"] = checksum(value)
                f.attrs.update(attrs)
            with open(tmp, "rb+") as tmp_file:
                os.fsync(tmp_file.fileno())  # the data is on disk before the name points at it
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # persist the rename itself
        finally:
            os.close(dir_fd)
    return path


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def _meta(attrs: h5py.AttributeManager) -> dict:
    meta = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        meta[key] = value
    if isinstance(meta.get("package_versions"), str):
        with contextlib.suppress(json.JSONDecodeError):
            meta["package_versions"] = json.loads(meta["package_versions"])
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """A dataset file's attributes (decoded), without reading or validating its arrays."""
    with h5py.File(path, "r") as f:
        return _meta(f.attrs)


def _read_file(path: Path, spec: TaskSpec | None, dataset: str | None) -> tuple[TaskSpec, dict, dict]:
    with h5py.File(path, "r") as f:
        meta = _meta(f.attrs)
        for key in ("format_version", "task", "dataset", "num_transitions"):
            if key not in meta:
                raise DatasetError(f"{path}: attribute {key!r} is missing (not written by common.dataset?)")
        if meta["format_version"] != FORMAT_VERSION:
            raise DatasetError(
                f"{path}: format_version {meta['format_version']}, this code reads {FORMAT_VERSION}"
            )
        if meta["task"] not in TASKS:
            raise DatasetError(f"{path}: attribute task {meta['task']!r} is none of {sorted(TASKS)}")
        if spec is not None and spec.name != meta["task"]:
            raise DatasetError(f"{path}: holds task {meta['task']!r}, but task {spec.name!r} was asked for")
        if dataset is not None and dataset != meta["dataset"]:
            raise DatasetError(f"{path}: holds dataset {meta['dataset']!r}, but {dataset!r} was asked for")
        spec = TASKS[meta["task"]]
        keys = FLOAT_KEYS + FLAG_KEYS + (STATE_KEYS if spec.family == "mamujoco" else ())
        missing = [k for k in keys if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise DatasetError(f"{path}: missing dataset(s) {missing} (has {sorted(f)})")
        for k in keys:
            want = (np.uint8, np.bool_) if k in FLAG_KEYS else (np.float32,)
            if f[k].dtype not in want:
                raise DatasetError(
                    f"{path}: {k!r} has dtype {f[k].dtype}, expected {' or '.join(map(str, want))}"
                )
        arrays = {k: f[k][()] for k in keys}
        for k in keys:
            if "crc32" not in f[k].attrs:
                raise DatasetError(f"{path}: {k!r} has no crc32 attribute (not written by common.dataset?)")
            if checksum(arrays[k]) != f[k].attrs["crc32"]:
                raise DatasetError(f"{path}: {k!r} does not match its crc32 checksum: the file is corrupt")
    return spec, arrays, meta


def _read(path: Path, task: str | None, dataset: str | None) -> tuple[TaskSpec, dict[str, np.ndarray], dict]:
    # the caller's arguments are checked first, so that a ValueError below can only come from the file
    spec = None if task is None else get_task(task)
    dataset = None if dataset is None else check_dataset_type(dataset)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    try:
        spec, arrays, meta = _read_file(path, spec, dataset)
    except DatasetError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        # h5py reports truncated / corrupt files with any of these, depending on which structure is damaged
        raise DatasetError(
            f"{path}: not a readable HDF5 file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    if meta["num_transitions"] != len(arrays["obs"]):
        raise DatasetError(
            f"{path}: attribute num_transitions = {meta['num_transitions']}, obs has {len(arrays['obs'])}"
        )
    _validate(spec, arrays, str(path))
    return spec, arrays, meta


def load_dataset(
    path: str | os.PathLike,
    task: str | None = None,
    dataset: str | None = None,
    device: str | torch.device = "cpu",
) -> OfflineDataset:
    """Read, validate and move a whole dataset to `device` once (float32 tensors).

    `task` / `dataset`, when given, must match the file's attributes. Any problem, a truncated or corrupt file
    included, raises DatasetError naming the file.
    """
    path = Path(path)
    spec, arrays, meta = _read(path, task, dataset)
    meta["path"] = str(path)
    t = {k: torch.from_numpy(v).to(device=device, dtype=torch.float32) for k, v in arrays.items()}
    if spec.family == "mpe":
        # MPE state = concat of the learners' obs (INTERFACES.md), a view: no extra memory
        N = len(arrays["obs"])
        t["states"] = t["obs"].reshape(N, spec.state_dim)
        t["next_states"] = t["next_obs"].reshape(N, spec.state_dim)
    return OfflineDataset(**t, meta=meta)
