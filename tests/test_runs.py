"""common/runs.py: one-line user errors, option checks, atomic files, RNG state, checkpoints, metadata,
graceful interruption and progress lines."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import torch

from common import runs
from common.dataset import DatasetError, load_dataset
from common.runs import (
    Progress,
    UserError,
    atomic_torch_save,
    atomic_write_json,
    catch_interrupts,
    cli,
    exit_interrupted,
    get_rng_state,
    load_checkpoint,
    run_metadata,
    set_rng_state,
    validate_args,
)
from tests.helpers import write_tiny_dataset


@dataclass
class Args:
    """The fields of spacql_mpe.py's Args, plus the checkpoint options."""

    task: str = "cn"
    dataset: str = "random"
    seed: int = 0
    dataset_seed: int | None = None
    data_dir: str = "data"
    num_critics: int = 10
    gamma: float = 0.95
    lr: float | None = None
    batch_size: int | None = None
    hidden: int | None = None
    tau: float | None = None
    alpha: float | None = None
    num_updates: int | None = None
    critic_steps: int = 5
    eval_every: int | None = None
    num_eval_episodes: int = 10
    num_cql_samples: int = 10
    target_noise: float = 0.05
    policy_sample_noise: float = 0.2
    actor_l2: float = 1e-3
    grad_clip: float = 0.5
    log_every: int = 10
    cuda: bool = True
    bf16: bool = False
    compile: bool = False
    threads: int | None = None
    run_dir: str = "runs"
    exp_name: str = "spacql_mpe"
    save_model: bool = False
    load_model: str | None = None
    checkpoint_every: int = 100
    resume: str | None = None


@pytest.fixture
def args(tmp_path):
    return Args(data_dir=str(tmp_path / "data"), run_dir=str(tmp_path / "runs"))


# ---------------------------------------------------------------------------------------------------------------
# cli
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Small:
    x: int = 1


def test_cli_prints_one_line_for_user_errors(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog", "--x", "3"])
    assert cli(lambda a: a.x * 2, Small) == 6

    def bad(a):
        raise UserError(f"--x is wrong, got {a.x}\nsecond line")

    with pytest.raises(SystemExit) as e:
        cli(bad, Small)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --x is wrong, got 3 second line\n"  # one line, no traceback


def test_cli_keeps_tracebacks_of_bugs_and_reports_dataset_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["prog"])

    def bug(a):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli(bug, Small)
    missing = tmp_path / "nothing.h5"
    with pytest.raises(SystemExit) as e:
        cli(lambda a: load_dataset(missing), Small)  # DatasetError is a UserError
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and err.count("\n") == 1
    assert issubclass(DatasetError, ValueError)  # existing `pytest.raises(ValueError)` callers still work


# ---------------------------------------------------------------------------------------------------------------
# validate_args
# ---------------------------------------------------------------------------------------------------------------

BAD_VALUES = {
    "alpha": -1.0,
    "gamma": 0.0,
    "tau": 1.5,
    "lr": 0.0,
    "grad_clip": -0.5,
    "target_noise": -0.1,
    "policy_sample_noise": -0.2,
    "actor_l2": -1e-3,
    "hidden": 0,
    "batch_size": 1,
    "num_critics": 1,
    "critic_steps": 0,
    "num_updates": -1,
    "eval_every": 0,
    "log_every": 0,
    "num_cql_samples": 0,
    "num_eval_episodes": 0,
    "threads": 0,
    "checkpoint_every": 0,
}
FLOATS = [name for name, (kind, _, _) in runs.RULES.items() if kind == "float"]


def test_every_rule_has_a_bad_value_and_defaults_pass(args):
    assert set(BAD_VALUES) == set(runs.RULES)
    assert set(runs.RULES) <= {f.name for f in fields(Args)}
    validate_args(args, ("mpe",))  # nothing raised: the defaults (None = the task's default) are valid


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_each_bad_value_names_its_option(args, name):
    setattr(args, name, BAD_VALUES[name])
    option = "--" + name.replace("_", "-")
    with pytest.raises(UserError, match=f"^{option} must be .*, got {BAD_VALUES[name]!r}$"):
        validate_args(args, ("mpe",))


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_rejected(args, name, value):
    setattr(args, name, value)
    with pytest.raises(UserError, match=f"^--{name.replace('_', '-')} must be a finite number"):
        validate_args(args, ("mpe",))


def test_message_and_boundaries(args):
    args.alpha = -1.0
    with pytest.raises(UserError) as e:
        validate_args(args, ("mpe",))
    assert str(e.value) == "--alpha must be a finite number >= 0, got -1.0"
    # the inclusive ends of every range are allowed
    good = Args(**{**vars(args), "alpha": 0.0, "gamma": 1.0, "tau": 1.0, "target_noise": 0.0, "hidden": 1})
    good.batch_size, good.num_critics, good.num_updates, good.threads = 2, 2, 0, 1
    validate_args(good, ("mpe",))
    args.alpha, args.hidden = 0.5, 2.5  # not an integer
    with pytest.raises(UserError, match="--hidden must be an integer >= 1"):
        validate_args(args, ("mpe",))


def test_only_existing_fields_are_checked(tmp_path):
    @dataclass
    class Few:
        task: str = "halfcheetah"
        gamma: float = 0.9

    validate_args(Few(), ("mamujoco",))
    with pytest.raises(UserError, match="--gamma"):
        validate_args(Few(gamma=float("nan")), ("mamujoco",))


def test_task_and_dataset(args):
    args.task = "nope"
    with pytest.raises(UserError, match="^--task: unknown task 'nope'"):
        validate_args(args, ("mpe",))
    args.task = "halfcheetah"
    with pytest.raises(UserError, match="mamujoco task.*use spacql_mamujoco.py for halfcheetah"):
        validate_args(args, ("mpe",))
    args.task = "spread"  # an alias of cn
    with pytest.raises(UserError, match="mpe task.*use spacql_mpe.py for cn"):
        validate_args(args, ("mamujoco",))
    validate_args(args, ("mpe", "mamujoco"))
    args.dataset = "medium_replay"
    with pytest.raises(UserError, match="^--dataset: unknown dataset type 'medium_replay'"):
        validate_args(args, ("mpe",))


def test_dataset_seed_range_unless_the_file_exists(args):
    args.dataset_seed = 7
    with pytest.raises(UserError) as e:
        validate_args(args, ("mpe",))
    msg = str(e.value)
    assert msg.startswith("--dataset-seed must be in 0..4") and "got 7" in msg
    assert f"python -m common.build --task cn --dataset random --seed 7 --data-dir {args.data_dir}" in msg
    args.dataset_seed, args.seed = None, 5  # the dataset copy defaults to --seed
    with pytest.raises(UserError, match="--dataset-seed .*got 5 \\(from --seed\\)"):
        validate_args(args, ("mpe",))
    args.dataset_seed = -1
    with pytest.raises(UserError, match="--dataset-seed"):
        validate_args(args, ("mpe",))
    write_tiny_dataset(args.data_dir, "cn", seed=7, episodes=2)  # built explicitly: now allowed
    args.dataset_seed = 7
    validate_args(args, ("mpe",))
    args.dataset_seed, args.load_model = 9, "model.pt"  # evaluating a saved model needs no dataset
    validate_args(args, ("mpe",))


def test_run_dir_and_data_dir(args, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args.run_dir = str(afile)
    with pytest.raises(UserError, match="^--run-dir .*afile exists and is not a directory"):
        validate_args(args, ("mpe",))
    args.run_dir = str(afile / "sub" / "deeper")
    with pytest.raises(UserError, match="^--run-dir .*afile exists and is not a directory"):
        validate_args(args, ("mpe",))
    args.run_dir = str(tmp_path / "new" / "runs")  # created later, inside a writable folder
    validate_args(args, ("mpe",))

    # a read-only folder (os.access is patched: tests may run as root, for whom every folder is writable)
    real_access = os.access
    read_only = [str(tmp_path)]

    def access(path, mode):
        if mode & os.W_OK and any(str(path).startswith(r) for r in read_only):
            return False
        return real_access(path, mode)

    monkeypatch.setattr(runs.os, "access", access)
    with pytest.raises(UserError, match="^--run-dir .* is not writable \\(it would be created in"):
        validate_args(args, ("mpe",))
    read_only[0] = str(tmp_path / "data")
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="^--data-dir .* is not writable"):  # the dataset must be built there
        validate_args(args, ("mpe",))
    monkeypatch.setattr(runs.os, "access", real_access)
    write_tiny_dataset(args.data_dir, "cn", episodes=2)
    monkeypatch.setattr(runs.os, "access", access)
    validate_args(args, ("mpe",))  # an existing dataset is only read: a read-only folder is fine
    args.data_dir = str(afile)
    monkeypatch.setattr(runs.os, "access", real_access)
    with pytest.raises(UserError, match="^--data-dir .*afile exists and is not a directory"):
        validate_args(args, ("mpe",))


# ---------------------------------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------------------------------


def test_atomic_writes(tmp_path, monkeypatch):
    old_umask = os.umask(0o022)
    try:
        atomic_write_json({"a": [1, 2]}, tmp_path / "r.json")
        atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    finally:
        os.umask(old_umask)
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o644  # the umask's mode, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "r.json"]

    def interrupted_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. a second Ctrl-C while saving

    monkeypatch.setattr(runs.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "c.pt")
    monkeypatch.undo()
    with pytest.raises(TypeError):
        atomic_write_json({"a": object()}, tmp_path / "r.json")
    # the old files are intact and no temporary file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "r.json"]
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2]}


def test_atomic_write_syncs_before_replacing(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(runs.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(runs.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    atomic_write_json([1], tmp_path / "x.json")
    assert events[:2] == ["fsync", "replace"]


# ---------------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------------


def draw(generator):
    return (
        [random.random(), random.gauss(0, 1), random.gauss(0, 1)],
        np.concatenate([np.random.rand(3), np.random.standard_normal(3)]).tolist(),
        torch.rand(3).tolist() + torch.randn(3).tolist(),
        torch.rand(3, generator=generator).tolist(),
    )


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(4)
    # leave a cached second Gaussian in python's and numpy's legacy generators: the state must carry it
    random.gauss(0, 1)
    np.random.standard_normal()
    torch.save(get_rng_state(g), tmp_path / "rng.pt")
    expected = draw(g)
    # scramble every stream, then restore from the file
    for seed in (random.seed, np.random.seed, torch.manual_seed, g.manual_seed):
        seed(99)
    draw(g)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), g)
    assert draw(g) == expected
    for stream, (a, b) in enumerate(zip(draw(g), expected)):
        assert a != b, f"stream {stream} repeats itself"


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------


class Foreign:
    """Not something weights_only loading accepts."""


def good_checkpoint(**kw):
    return {"algo": "spacql_mpe", "args": {"task": "cn", "seed": 0}, "round": 10, **kw}


def test_load_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    atomic_torch_save(good_checkpoint(w=torch.ones(2)), run / "checkpoint.pt")
    for where in (run, run / "checkpoint.pt"):  # `--resume RUN_FOLDER` or the file itself
        ckpt = load_checkpoint(where, "spacql_mpe", task="spread")  # task aliases match
        assert ckpt["round"] == 10 and torch.equal(ckpt["w"], torch.ones(2))
    assert load_checkpoint(run, "spacql_mpe")["args"]["task"] == "cn"


def test_load_checkpoint_errors(tmp_path):
    def fails(path, match, algo="spacql_mpe", task=None):
        with pytest.raises(UserError, match=match) as e:
            load_checkpoint(path, algo, task)
        assert "\n" not in str(e.value)

    fails(tmp_path / "missing.pt", "missing.pt does not exist")
    fails(tmp_path, "is a folder without checkpoint.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a torch file at all" * 10)
    fails(tmp_path / "garbage.pt", "garbage.pt is not a readable checkpoint")
    torch.save(good_checkpoint(w=torch.ones(1000)), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:2000])
    fails(tmp_path / "cut.pt", "cut.pt is not a readable checkpoint")
    torch.save(good_checkpoint(obj=Foreign()), tmp_path / "pickled.pt")  # loading it would run pickled code
    fails(tmp_path / "pickled.pt", "pickled.pt is not a readable checkpoint")
    torch.save({"actors": {}}, tmp_path / "model.pt")
    fails(tmp_path / "model.pt", "not a training checkpoint \\(missing algo, args, round\\)")
    torch.save([1, 2], tmp_path / "list.pt")
    fails(tmp_path / "list.pt", "not a training checkpoint")
    torch.save(good_checkpoint(algo="cfcql"), tmp_path / "cfcql.pt")
    fails(tmp_path / "cfcql.pt", "cfcql.pt is a checkpoint of cfcql, not spacql_mpe$")
    torch.save(good_checkpoint(), tmp_path / "cn.pt")
    fails(tmp_path / "cn.pt", "cn.pt is a checkpoint of task cn, not pp$", task="pp")


# ---------------------------------------------------------------------------------------------------------------
# run metadata
# ---------------------------------------------------------------------------------------------------------------


def test_run_metadata(tmp_path, monkeypatch):
    data = np.random.default_rng(0).bytes(2_500_000)  # several 1 MB blocks and a partial one
    (tmp_path / "d.h5").write_bytes(data)
    meta = run_metadata(tmp_path / "d.h5", "cpu")
    assert set(meta) == {"commit", "dirty", "packages", "machine", "dataset"}
    assert meta["dataset"] == {"path": str(tmp_path / "d.h5"), "sha256": hashlib.sha256(data).hexdigest()}
    assert {"torch", "numpy", "h5py", "tyro", "mujoco", "gymnasium", "python"} <= set(meta["packages"])
    assert meta["packages"]["torch"] == torch.__version__
    assert set(meta["machine"]) == {"cpu", "logical_cpus", "torch_threads", "device", "gpu"}
    assert meta["machine"]["device"] == "cpu" and meta["machine"]["gpu"] is None
    assert meta["machine"]["torch_threads"] == torch.get_num_threads()
    json.dumps(meta)  # plain data
    repo = Path(runs.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        head = None
    if head is not None and head.returncode == 0:
        assert meta["commit"] == head.stdout.strip() and isinstance(meta["dirty"], bool)
    assert run_metadata(None, "cpu")["dataset"] is None

    monkeypatch.setattr(runs, "__file__", str(tmp_path / "runs.py"))  # not inside a repository
    assert run_metadata(None, "cpu")["commit"] is None

    def no_git(*a, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runs.subprocess, "run", no_git)
    meta = run_metadata(None, "cpu")
    assert meta["commit"] is None and meta["dirty"] is None


# ---------------------------------------------------------------------------------------------------------------
# interruption
# ---------------------------------------------------------------------------------------------------------------


def wait_for(flag):
    deadline = time.monotonic() + 5
    while not flag.requested and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_catch_interrupts_turns_signals_into_a_flag(sig):
    before = signal.getsignal(sig)
    with catch_interrupts() as flag:
        assert not flag.requested and flag.signal_name is None
        os.kill(os.getpid(), sig)
        wait_for(flag)
        assert flag.requested and flag.signal_name == sig.name  # and no exception
    assert signal.getsignal(sig) is before


def test_second_signal_raises_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with catch_interrupts() as flag:
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(flag)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_exit_interrupted(capsys, name, code):
    message = f"interrupted by {name} at round 12: checkpoint saved; resume with: python x.py --resume runs/r"
    with pytest.raises(SystemExit) as e:
        exit_interrupted(message, name)
    assert e.value.code == code
    assert capsys.readouterr().err == message + "\n"


# ---------------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------------


def test_progress_without_a_terminal_prints_lines_with_eta(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(runs.time, "monotonic", lambda: now[0])
    p = Progress(100, "run-a", initial=20, interval_s=0)  # resumed at round 20; stderr is not a terminal here
    assert p.bar is None
    now[0] = 110.0
    p.update(40)  # 20 rounds in 10 s: 2 rounds/s, 60 left: 30 s
    now[0] = 120.0
    p.update(60, last_score=42.25)
    p.write("round 60/100: return 1.00")
    p.close()
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines == [
        "run-a: round 40/100 (40%), 2.00 rounds/s, ETA 0:00:30, last score -",
        "run-a: round 60/100 (60%), 2.00 rounds/s, ETA 0:00:20, last score 42.2",
    ]
    assert out == "round 60/100: return 1.00\n"


def test_progress_interval(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(runs.time, "monotonic", lambda: now[0])
    p = Progress(10_000, "run-b", interval_s=120)
    for r in range(1, 100):
        now[0] = r * 3.0  # a round every 3 s: a line every 40 rounds
        p.update(r)
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_progress_on_a_terminal_uses_tqdm(capsys):
    p = Progress(10, "run-c", tty=True)
    p.update(3, last_score=1.5)
    assert p.bar is not None and p.bar.n == 3
    p.write("an evaluation line")
    p.close()
    out, err = capsys.readouterr()
    assert "an evaluation line" in out and "run-c" in err
