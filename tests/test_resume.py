"""Runs survive interruption: 10 rounds, SIGTERM, --resume, 10 more rounds == 20 rounds, bit for bit on the CPU.
And bad input gets one clear line (exit status 2) before anything is created."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cfcql
import icql_qs
import spacql_mamujoco
import spacql_mpe
from tests.helpers import tiny_args, write_tiny_dataset

torch.set_num_threads(1)
ALGOS = {"cfcql": cfcql, "icql_qs": icql_qs, "spacql_mpe": spacql_mpe, "spacql_mamujoco": spacql_mamujoco}
ROOT = Path(__file__).resolve().parents[1]


def args_for(module, tmp_path, task, run_name):
    return tiny_args(
        module, tmp_path, task, num_updates=20, eval_every=4, log_every=3, checkpoint_every=7, save_model=True,
        run_name=run_name, num_eval_episodes=2,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(ALGOS))
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, name):
    """Interrupted mid log window (log every 3), after a periodic checkpoint (every 7): the resumed run must still
    reproduce every evaluation, every logged metric and every parameter of the uninterrupted run exactly."""
    module = ALGOS[name]
    task = "halfcheetah" if name == "spacql_mamujoco" else "cn"
    write_tiny_dataset(tmp_path / "data", task, episodes=2 if task == "halfcheetah" else 8)
    whole = module.main(args_for(module, tmp_path, task, "whole"))

    real_round, calls = module.update_round, []

    def round_then_sigterm_at_10(*a, **kw):
        out = real_round(*a, **kw)
        calls.append(1)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster sends before preemption
        return out

    monkeypatch.setattr(module, "update_round", round_then_sigterm_at_10)
    with pytest.raises(SystemExit) as stop:
        module.main(args_for(module, tmp_path, task, "parts"))
    assert stop.value.code == 143 and len(calls) == 10
    run_path = tmp_path / "runs" / "parts"
    assert (run_path / "checkpoint.pt").exists() and not (run_path / "final.json").exists()
    monkeypatch.setattr(module, "update_round", real_round)
    resumed = module.main(module.Args(resume=str(run_path), cuda=False))
    assert not (run_path / "checkpoint.pt").exists()  # complete: the checkpoint is gone, final.json remains

    for key in ("eval_history", "logs", "final_return"):
        assert json.loads(json.dumps(resumed[key])) == json.loads(json.dumps(whole[key])), key
    assert len(resumed["eval_history"]) == 6  # rounds 0, 4, 8, 12, 16 and the final one
    assert [c["round"] for c in resumed["meta"]["code"]] == [0, 10]  # the code of each segment of the run
    a = torch.load(Path(whole["run_path"]) / "model.pt", weights_only=True)
    b = torch.load(run_path / "model.pt", weights_only=True)
    for part in ("actors", "actors_target", "critic", "critic_target"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert a["critic_opt"]["state"][0]["step"] == b["critic_opt"]["state"][0]["step"]


def test_resume_refuses_a_complete_run_and_a_checkpoint_of_another_algorithm(tmp_path):
    write_tiny_dataset(tmp_path / "data", "cn")
    done = cfcql.main(tiny_args(cfcql, tmp_path, "cn", save_model=True))
    with pytest.raises(cfcql.runs.UserError, match="is a checkpoint of cfcql, not spacql_mpe"):
        spacql_mpe.main(spacql_mpe.Args(load_model=os.path.join(done["run_path"], "model.pt")))
    with pytest.raises(cfcql.runs.UserError, match="this run is complete"):
        cfcql.main(cfcql.Args(resume=done["run_path"]))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", -1.0, "--alpha must be"),
        ("alpha", float("nan"), "--alpha must be"),
        ("gamma", 2.0, "--gamma must be"),
        ("gamma", float("nan"), "--gamma must be"),
        ("tau", -1.0, "--tau must be"),
        ("lr", -1.0, "--lr must be"),
        ("grad_clip", 0.0, "--grad-clip must be"),
        ("target_noise", -1.0, "--target-noise must be"),
        ("hidden", 0, "--hidden must be"),
        ("log_every", 0, "--log-every must be"),
        ("checkpoint_every", 0, "--checkpoint-every must be"),
        ("num_cql_samples", 0, "--num-cql-samples must be"),
        ("num_eval_episodes", 0, "--num-eval-episodes must be"),
        ("threads", 0, "--threads must be"),
        ("dataset_seed", 7, "--dataset-seed must be in 0..4"),
        ("task", "walker", "unknown task"),
        ("load_model", "no/such/file.pt", "no/such/file.pt"),
        ("resume", "no/such/run", "no/such/run"),
    ],
)
def test_bad_options_are_user_errors_before_anything_is_created(tmp_path, field, value, message):
    args = cfcql.Args(data_dir=str(tmp_path / "data"), run_dir=str(tmp_path / "runs"), cuda=False)
    setattr(args, field, value)
    with pytest.raises(cfcql.runs.UserError, match=message.replace(".", r"\.")):
        cfcql.main(args)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    """A user error: one line on stderr, status 2, no traceback (a bug would still show its traceback)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "spacql_mpe.py", "--gamma", "2", "--run-dir", str(tmp_path / "runs")]
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --gamma must be a finite number in (0, 1], got 2.0"]


def test_a_fresh_run_never_overwrites_a_run_folder(tmp_path):
    write_tiny_dataset(tmp_path / "data", "cn")
    cfcql.main(tiny_args(cfcql, tmp_path, "cn", run_name="mine"))
    with pytest.raises(cfcql.runs.UserError, match="already holds a run"):
        cfcql.main(tiny_args(cfcql, tmp_path, "cn", run_name="mine"))


def test_runs_started_in_the_same_second_get_distinct_default_folders(tmp_path, monkeypatch):
    """The default run name carries the start time in seconds; a second run in the same second (a script, a
    test) gets its own folder instead of an error or a shared one."""
    write_tiny_dataset(tmp_path / "data", "cn")
    monkeypatch.setattr(cfcql.runs.time, "time", lambda: 1_800_000_000.0)
    paths = [cfcql.main(tiny_args(cfcql, tmp_path, "cn"))["run_path"] for _ in range(3)]
    assert len(set(paths)) == 3 and all(os.path.exists(os.path.join(p, "final.json")) for p in paths)
