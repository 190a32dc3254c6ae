"""Run robustness shared by the algorithm files: one-line user errors, option checks, atomic files, checkpoints
with RNG state, run metadata, graceful SIGINT / SIGTERM, and progress reports that also work without a terminal.

Run bookkeeping of the algorithm files (the `Run` class, `resolve_args`, `restore_args`) is at the end.

Checkpoint format (a dict that `torch.load(weights_only=True)` reads): "algo" (the file's exp name), "args" (the
run's Args as a plain dict, "task" included), "round" (rounds completed), plus whatever the algorithm stores
(state dicts, `get_rng_state(...)`, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from tqdm import tqdm

from common.perf import cpu_model

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = ("algo", "args", "round")
NUM_DATASET_SEEDS = 5  # the shipped protocol: dataset copies 0..4


class UserError(Exception):
    """A problem with the user's input (bad option, missing or unreadable file, wrong checkpoint): `cli` prints
    its message as one line, without a traceback."""


def cli(main: Callable, args_cls: type):
    """`main(tyro.cli(args_cls))`; a UserError prints `error: <message>` to stderr and exits with status 2."""
    import tyro

    args = tyro.cli(args_cls)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# option checks
# ---------------------------------------------------------------------------------------------------------------
# field -> (kind, test, allowed range as the message says it); None values mean "the task default", not checked
RULES: dict[str, tuple[str, Callable, str]] = {
    "alpha": ("float", lambda v: v >= 0, ">= 0"),
    "gamma": ("float", lambda v: 0 < v <= 1, "in (0, 1]"),
    "tau": ("float", lambda v: 0 < v <= 1, "in (0, 1]"),
    "lr": ("float", lambda v: v > 0, "> 0"),
    "grad_clip": ("float", lambda v: v > 0, "> 0"),
    "target_noise": ("float", lambda v: v >= 0, ">= 0"),
    "policy_sample_noise": ("float", lambda v: v >= 0, ">= 0"),
    "actor_l2": ("float", lambda v: v >= 0, ">= 0"),
    "hidden": ("int", lambda v: v >= 1, ">= 1"),
    "batch_size": ("int", lambda v: v >= 2, ">= 2"),
    "num_critics": ("int", lambda v: v >= 2, ">= 2"),
    "critic_steps": ("int", lambda v: v >= 1, ">= 1"),
    "num_updates": ("int", lambda v: v >= 0, ">= 0"),
    "eval_every": ("int", lambda v: v >= 1, ">= 1"),
    "log_every": ("int", lambda v: v >= 1, ">= 1"),
    "num_cql_samples": ("int", lambda v: v >= 1, ">= 1"),
    "num_eval_episodes": ("int", lambda v: v >= 1, ">= 1"),
    "threads": ("int", lambda v: v >= 1, ">= 1"),
    "checkpoint_every": ("int", lambda v: v >= 1, ">= 1"),
}
# the particle tasks and HalfCheetah run in separate SPaCQL files; cfcql.py / icql_qs.py run both families
FAMILY_FILE = {"mpe": "spacql_mpe.py", "mamujoco": "spacql_mamujoco.py"}


def option(name: str) -> str:
    """A field's command-line spelling (tyro's default): num_critics -> --num-critics."""
    return "--" + name.replace("_", "-")


def _check_rule(name: str, value, kind: str, test: Callable, allowed: str) -> None:
    if kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        what = "a finite number"
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    if not (ok and test(value)):
        raise UserError(f"{option(name)} must be {what} {allowed}, got {value!r}")


def _check_writable_dir(name: str, path: Path) -> None:
    """`path` is a writable directory, or can be created: its nearest existing ancestor is one."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option(name)} {path}: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in {existing})"
        raise UserError(f"{option(name)} {path}: {existing} is not writable{where}")


def validate_args(args, task_families: tuple[str, ...]) -> None:
    """Check an algorithm file's Args; the first problem raises UserError naming the option and allowed range.

    Only fields that `args` has are checked. The dataset folder needs to be writable only when the dataset file
    does not exist yet (it is then built there): reading an existing dataset works in a read-only folder.
    """
    from common.dataset import dataset_path
    from common.tasks import check_dataset_type, get_task

    for name, (kind, test, allowed) in RULES.items():
        value = getattr(args, name, None)
        if value is not None:
            _check_rule(name, value, kind, test, allowed)
    try:
        spec = get_task(args.task)
    except ValueError as e:
        raise UserError(f"--task: {e}") from None
    if spec.family not in task_families:
        other = FAMILY_FILE.get(spec.family)
        hint = f"; use {other} for {spec.name}" if other else ""
        raise UserError(
            f"--task {spec.name} is a {spec.family} task; this file runs {' / '.join(task_families)} tasks{hint}"
        )
    if hasattr(args, "dataset"):
        try:
            check_dataset_type(args.dataset)
        except ValueError as e:
            raise UserError(f"--dataset: {e}") from None
    if hasattr(args, "run_dir"):
        _check_writable_dir("run_dir", Path(args.run_dir))
    if getattr(args, "load_model", None) or not (hasattr(args, "data_dir") and hasattr(args, "dataset")):
        return  # evaluating a saved model reads no dataset
    seed = getattr(args, "dataset_seed", None)
    from_seed = seed is None  # the algorithm files default the dataset copy to --seed
    seed = getattr(args, "seed", 0) if from_seed else seed
    path = dataset_path(args.data_dir, spec.name, args.dataset, seed)
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise UserError(f"{option('data_dir')}: dataset file {path} is not readable")
        return
    if not 0 <= seed < NUM_DATASET_SEEDS:
        raise UserError(
            f"{option('dataset_seed')} must be in 0..{NUM_DATASET_SEEDS - 1} (the five dataset copies), got "
            f"{seed}{' (from --seed)' if from_seed else ''}; to train on another copy, build it first: "
            f"python -m common.build --task {spec.name} --dataset {args.dataset} --seed {seed} "
            f"--data-dir {shlex.quote(str(args.data_dir))}"
        )
    _check_writable_dir("data_dir", path.parent)


# ---------------------------------------------------------------------------------------------------------------
# atomic files, RNG state, checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """Write via a temporary file in the same folder, fsync, os.replace: readers see the old or the new file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:  # not mkstemp: its 0600 mode would pass to the final file
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # persist the rename
    finally:
        os.close(dir_fd)
    return path


def atomic_write_json(obj, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON to `path`, atomically."""
    return _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path`, atomically."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def get_rng_state(generator: torch.Generator | None = None) -> dict:
    """Every random stream as plain data (lists, tensors) that torch.load(weights_only=True) accepts."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Restore what get_rng_state returned (CUDA streams only where as many devices are present)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"].cpu())


def load_checkpoint(path: str | os.PathLike, algo: str, task: str | None = None) -> dict:
    """Load a checkpoint on the CPU; `path` is the file or a run folder holding checkpoint.pt (`--resume RUN`).

    Every problem (missing, unreadable, not a checkpoint, another algorithm's or task's) raises a one-line
    UserError.
    """
    if Path(path).is_dir() and not Path(_checkpoint_file(path)).is_file():
        raise UserError(f"{path} is a folder without {CHECKPOINT_NAME}: not a run folder with a checkpoint")
    path = Path(_checkpoint_file(path))
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports garbage, truncated and foreign files with many exception types
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a training checkpoint (missing {', '.join(missing)})")
    if ckpt["algo"] != algo:
        raise UserError(f"{path} is a checkpoint of {ckpt['algo']}, not {algo}")
    if task is not None:
        from common.tasks import get_task

        theirs = ckpt["args"].get("task") if isinstance(ckpt["args"], dict) else None
        if theirs is None or get_task(theirs).name != get_task(task).name:
            raise UserError(f"{path} is a checkpoint of task {theirs}, not {get_task(task).name}")
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# run metadata
# ---------------------------------------------------------------------------------------------------------------
def _git(*cmd: str) -> str | None:
    repo = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no git
    return out.stdout if out.returncode == 0 else None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> dict:
    """The git commit of this checkout and whether tracked files differ from it (None without git)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(status.strip()) if status is not None else None,
    }


def run_metadata(dataset_path: str | os.PathLike | None, device) -> dict:
    """Commit, package versions, machine and dataset checksum: what a result needs to be reproduced."""
    packages = {}
    for name in ("torch", "numpy", "h5py", "tyro", "mujoco", "gymnasium"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    packages["python"] = platform.python_version()
    device = torch.device(device)
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    dataset = None
    if dataset_path is not None:
        dataset = {"path": str(dataset_path), "sha256": file_sha256(dataset_path)}
    return {
        **code_version(),
        "packages": packages,
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "gpu": gpu,
        },
        "dataset": dataset,
    }


# ---------------------------------------------------------------------------------------------------------------
# interruption and progress
# ---------------------------------------------------------------------------------------------------------------
class StopFlag:
    """Set by catch_interrupts' handler: `.requested`, and which signal (`.signal_name`, e.g. "SIGTERM")."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: the user insists; atomic saves keep the checkpoint whole
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.requested, self.signal_name = True, signal.Signals(signum).name


@contextlib.contextmanager
def catch_interrupts() -> Iterator[StopFlag]:
    """While active, SIGINT / SIGTERM set the yielded flag instead of stopping the process (a second one raises
    KeyboardInterrupt). Previous handlers come back on exit. Outside the main thread nothing is installed."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.signal(sig, flag._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_interrupted(message: str, signal_name: str) -> NoReturn:
    """Print `message` (e.g. "interrupted by SIGTERM at round 1234: checkpoint saved; resume with: ...") to stderr
    and exit with the shell's status for that signal: 130 (SIGINT), 143 (SIGTERM)."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(128 + signal.Signals[signal_name].value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Rounds done / total: a tqdm bar on a terminal, otherwise a plain stderr line every `interval_s` seconds
    (log files of batch jobs stay readable)."""

    def __init__(self, total: int, name: str, initial: int = 0, interval_s: float = 120.0, tty=None):
        self.total, self.name, self.initial, self.interval_s = total, name, initial, interval_s
        self.start = self.last_print = time.monotonic()
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = tqdm(total=total, initial=initial, desc=name, smoothing=0.05) if tty else None

    def update(self, done: int, last_score: float | None = None) -> None:
        """`done` rounds are complete; `last_score` is the latest evaluation's normalized score."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if last_score is not None:
                self.bar.set_postfix(score=f"{last_score:.1f}")
            return
        now = time.monotonic()
        if now - self.last_print < self.interval_s:
            return
        self.last_print = now
        rate = (done - self.initial) / max(now - self.start, 1e-9)
        eta = _duration((self.total - done) / rate) if rate > 0 else "?"
        score = "-" if last_score is None else f"{last_score:.1f}"
        percent = 100.0 * done / self.total if self.total else 100.0
        print(
            f"{self.name}: round {done}/{self.total} ({percent:.0f}%), {rate:.2f} rounds/s, ETA {eta}, "
            f"last score {score}",
            file=sys.stderr,
            flush=True,
        )

    def write(self, line: str) -> None:
        """Print a line to stdout (above the bar when there is one)."""
        if self.bar is not None:
            tqdm.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------------
# the algorithm files' run: options, bookkeeping, checkpoints
# ---------------------------------------------------------------------------------------------------------------
def resolve_args(args, task_families: tuple[str, ...]):
    """Check the options, then fill every unset hyper-parameter with the reference's per-task value."""
    from common.tasks import REFERENCE_HPARAMS, get_task

    validate_args(args, task_families)
    args.task = get_task(args.task).name
    hp = REFERENCE_HPARAMS[args.task]
    for name in ("lr", "batch_size", "hidden", "tau", "num_updates", "eval_every"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(hp, name))
    args.alpha = hp.alpha[args.dataset] if args.alpha is None else args.alpha
    args.dataset_seed = args.seed if args.dataset_seed is None else args.dataset_seed
    validate_args(args, task_families)  # again, with the per-task values filled in
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


RESUME_KEEPS = ("resume", "load_model", "cuda", "threads", "compile", "bf16", "checkpoint_every")


def restore_args(args, algo: str):
    """--resume RUN_FOLDER / --load-model FILE: the options stored in the checkpoint, except where and how fast to
    run (RESUME_KEEPS). Returns (args, checkpoint or None)."""
    path = getattr(args, "resume", None) or getattr(args, "load_model", None)
    if not path:
        return args, None
    if getattr(args, "resume", None) and os.path.exists(
        os.path.join(os.path.dirname(_checkpoint_file(path)), "final.json")
    ):
        raise UserError(f"--resume {path}: this run is complete (final.json exists)")
    ckpt = load_checkpoint(path, algo)
    keep = {k: getattr(args, k) for k in RESUME_KEEPS if hasattr(args, k)}
    if getattr(args, "resume", None):
        print(
            f"resuming {path} at round {ckpt['round']}: options from its checkpoint, except {', '.join(keep)}"
        )
    return type(args)(**(ckpt["args"] | keep)), ckpt


def _checkpoint_file(path) -> str:
    """The checkpoint a --resume / --load-model path names: the file itself, or a run folder's checkpoint.pt."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else str(path)


def write_evaluation(model_path: str, ret: float, score: float, args) -> dict:
    """--load-model: the evaluation lands beside the checkpoint (<file>.eval.json), no run folder is made."""
    result = {"return": ret, "normalized_score": score, "checkpoint": str(model_path), "args": asdict(args)}
    atomic_write_json(result, str(model_path) + ".eval.json")
    print(f"{model_path}: return {ret:.2f}, normalized score {score:.2f} -> {model_path}.eval.json")
    return result


class Run:
    """One training run's bookkeeping, so that the algorithm files show only the algorithm: the run folder
    (made when training starts), TensorBoard, evaluation history and logged metrics, progress, checkpoints
    (every --checkpoint-every rounds and on SIGINT/SIGTERM, atomic) and final.json.

    `state` maps names to the objects whose state_dict() a checkpoint holds (networks, optimizers); with
    `checkpoint` (from restore_args under --resume) they, every RNG, the round and the histories are restored,
    so that the resumed run equals an uninterrupted one bit for bit on the CPU.
    """

    def __init__(
        self, algo: str, args, state: dict, generator: torch.Generator, checkpoint: dict | None = None
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.algo, self.args, self.state, self.generator = algo, args, state, generator
        self.round, self.history, self.logs, self.pending, self.elapsed = 0, [], [], [], 0.0
        self.code = []  # the code version of every segment of the run: its start and each resume
        if checkpoint is not None:
            for name, obj in state.items():
                obj.load_state_dict(checkpoint[name])
            set_rng_state(checkpoint["rng"], generator)
            for key in ("round", "history", "logs", "pending", "elapsed"):
                setattr(self, key, checkpoint[key])
            self.code = checkpoint.get("code", [])
            self.path = os.path.dirname(_checkpoint_file(args.resume))
        else:
            name = args.run_name or f"{algo}__{args.task}__{args.dataset}__{args.seed}__{int(time.time())}"
            self.path = os.path.join(args.run_dir, name)
            if args.run_name is None:  # two runs started within the same second get distinct default names
                suffix = 1
                while os.path.exists(self.path):
                    self.path, suffix = os.path.join(args.run_dir, f"{name}_{suffix}"), suffix + 1
            for existing in (CHECKPOINT_NAME, "final.json"):
                if os.path.exists(os.path.join(self.path, existing)):
                    raise UserError(
                        f"{self.path} already holds a run ({existing}): --resume it or pick another --run-name"
                    )
        self.code = self.code + [{"round": self.round, **code_version()}]
        self.writer = SummaryWriter(self.path, purge_step=self.round)
        table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        self.progress = Progress(args.num_updates, self.path, initial=self.round)
        self.start = time.time()

    def rounds(self) -> Iterator[int]:
        """The remaining round numbers. After each round: a checkpoint every --checkpoint-every rounds, and on
        SIGINT/SIGTERM a checkpoint and exit (status 130/143) with the command that resumes."""
        with catch_interrupts() as stop:
            for round_ in range(self.round, self.args.num_updates):
                yield round_
                self.round = round_ + 1
                self.progress.update(self.round, self.history[-1][2] if self.history else None)
                if stop.requested or self.round % self.args.checkpoint_every == 0:
                    self.save(CHECKPOINT_NAME)
                if stop.requested:
                    self.progress.close()
                    exit_interrupted(
                        f"{stop.signal_name} at round {self.round}: checkpoint saved; resume with: "
                        f"python {self.algo}.py --resume {self.path}",
                        stop.signal_name,
                    )
        self.progress.close()

    def log_eval(self, round_: int, ret: float, score: float) -> None:
        self.history.append((round_, ret, score))
        self.writer.add_scalar("eval/return", ret, round_)
        self.writer.add_scalar("eval/normalized_score", score, round_)
        self.progress.write(
            f"round {round_}/{self.args.num_updates}: return {ret:.2f}, normalized score {score:.1f}"
        )

    def log_train(self, round_: int, info: dict) -> None:
        """Keep the round's metrics (tensors: no host sync); every --log-every rounds write their means."""
        self.pending.append(info)
        if (round_ + 1) % self.args.log_every:
            return
        window = {"round": round_ + 1}
        for key in self.pending[0]:
            mean = torch.stack([p[key] for p in self.pending]).float().mean(0)  # scalar, or [n] per-k values
            tags = [key] if mean.dim() == 0 else [f"{key}_{j + 1}" for j in range(len(mean))]
            for tag, v in zip(tags, mean.flatten().tolist(), strict=True):
                if not math.isfinite(v):
                    raise FloatingPointError(f"{tag} became {v} at round {round_}; training diverged")
                self.writer.add_scalar(tag, v, round_)
                window[tag] = v
        self.logs.append(window)
        self.pending = []

    def save(self, name: str) -> None:
        states = {k: obj.state_dict() for k, obj in self.state.items()}
        atomic_torch_save(
            {
                "algo": self.algo,
                "args": asdict(self.args),
                **states,
                "round": self.round,
                "history": self.history,
                "logs": self.logs,
                "pending": self.pending,
                "code": self.code,
                "elapsed": self.elapsed + time.time() - self.start,
                "rng": get_rng_state(self.generator),
            },  # fmt: skip
            os.path.join(self.path, name),
        )

    def finish(self, ret: float, score: float, dataset_path, device) -> dict:
        """The final evaluation (after the last round, D4) -> final.json (and model.pt under --save-model)."""
        self.log_eval(self.args.num_updates, ret, score)
        wall = self.elapsed + time.time() - self.start
        result = {
            "algo": self.algo, "task": self.args.task, "dataset": self.args.dataset, "seed": self.args.seed,
            "final_return": ret, "final_normalized_score": score, "wall_time_s": wall, "device": str(device),
            "eval_history": self.history, "logs": self.logs, "args": asdict(self.args),
            "meta": run_metadata(dataset_path, device) | {
                "commit": self.code[0]["commit"], "dirty": any(c["dirty"] for c in self.code), "code": self.code},
        }  # fmt: skip
        atomic_write_json(result, os.path.join(self.path, "final.json"))
        if self.args.save_model:
            self.save("model.pt")
        if os.path.exists(
            os.path.join(self.path, CHECKPOINT_NAME)
        ):  # complete: final.json (and model.pt) remain
            os.remove(os.path.join(self.path, CHECKPOINT_NAME))
        self.writer.close()
        print(
            f"final: return {ret:.2f}, normalized score {score:.2f} ({wall:.0f} s) -> {self.path}/final.json"
        )
        return result | {"run_path": self.path}
