"""scripts/benchmark.py (grid runner) and scripts/report.py: skip/resume logic, conversion, Slurm and report.

The runner logic is checked against a fake algorithm script (--algo-dir); test_smoke_grid_end_to_end uses the
real algorithm files on a tiny dataset.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common.perf import cpu_model
from tests.helpers import write_tiny_dataset

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "benchmark.py"
REPORT = ROOT / "scripts" / "report.py"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}

FAKE_ALGO = textwrap.dedent(
    """
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    for a in ("--task", "--dataset", "--seed", "--data-dir", "--run-dir", "--run-name", "--resume", "--threads"):
        p.add_argument(a)
    args, rest = p.parse_known_args()
    folder = os.path.join(args.run_dir, args.run_name)
    os.makedirs(folder, exist_ok=True)
    json.dump(sys.argv[1:], open(os.path.join(folder, "argv.json"), "w"))
    seed = int(args.seed)
    if seed == 13:
        sys.exit("fake failure for seed 13")
    logs = [{"round": r, "losses/td": 1.0, "charts/target_spread": float(r), "charts/w_1": 0.6,
             "charts/w_2": 0.3, "charts/w_3": 0.1, "charts/u_1": 0.2} for r in range(25)]
    final = {"algo": "fake", "task": args.task, "dataset": args.dataset, "seed": seed, "final_return": -10.0,
             "final_normalized_score": 50.0 + seed, "wall_time_s": 1.5, "device": "cpu",
             "eval_history": [[0, -20.0, 10.0], [2, -15.0, 70.0], [4, -10.0, 50.0 + seed]],
             "args": {"task": args.task, "resume": args.resume, "rest": rest}, "logs": logs,
             "meta": {"commit": "abc123", "dirty": False, "packages": {}, "machine": {"cpu": "fake"},
                      "dataset": {"path": "x", "sha256": "y"}}}
    json.dump(final, open(os.path.join(folder, "final.json"), "w"))
    """
)


def bench(*args, env=ENV):
    return subprocess.run(
        [sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
    )


def report(*args):
    return subprocess.run(
        [sys.executable, str(REPORT), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT
    )


def dirs(tmp_path):
    return [
        "--data-dir",
        tmp_path / "data",
        "--results-dir",
        tmp_path / "results",
        "--runs-dir",
        tmp_path / "runs",
    ]


def fake_algos(tmp_path):
    folder = tmp_path / "algos"
    folder.mkdir()
    for name in ("cfcql.py", "spacql_mpe.py"):
        (folder / name).write_text(FAKE_ALGO)
    return ["--algo-dir", folder]


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_grid_end_to_end(tmp_path):
    """The real algorithm files: run the smoke grid, re-run it (all skipped), then the report."""
    write_tiny_dataset(tmp_path / "data", "cn", "random", 0)
    out = bench("smoke", "--seeds", 0, "--jobs", 1, "--threads", 1, "--extra=--no-cuda", *dirs(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "grid smoke: 2 runs, 0 done (skipped), 2 missing" in out.stdout
    results = sorted((tmp_path / "results").glob("*/cn/random/seed_0.json"))
    assert [p.parts[-4] for p in results] == ["cfcql_smoke", "spacql_mpe_smoke"]
    for path in results:
        r = json.loads(path.read_text())
        assert (r["task"], r["dataset"], r["seed"]) == ("cn", "random", 0)
        assert [h[0] for h in r["eval_history"]] == [0, 2, 4]
        assert r["final_normalized_score"] == r["eval_history"][-1][2]
        assert r["best_normalized_score"] == max(h[2] for h in r["eval_history"])
        assert r["flags"]["num_updates"] == 4 and r["flags"]["hidden"] == 16
        assert (tmp_path / "runs" / path.parts[-4] / "cn" / "random" / "seed_0" / "stdout.log").is_file()
    mtimes = [p.stat().st_mtime_ns for p in results]

    again = bench("smoke", "--seeds", 0, "--jobs", 1, "--threads", 1, *dirs(tmp_path))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 done (skipped), 0 missing" in again.stdout and "no missing run" in again.stdout
    assert [p.stat().st_mtime_ns for p in results] == mtimes

    rep = report("--results-dir", tmp_path / "results", "--suffix", "_smoke", "--reps", 200)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "n=1, not tested" in readme and "78.2 ± 14" in readme
    assert (tmp_path / "results" / "figures" / "curves_cn.png").stat().st_size > 0


def test_runner_fresh_resume_convert_and_failure(tmp_path):
    algo_dir = fake_algos(tmp_path)
    resumed = tmp_path / "runs" / "cfcql_smoke" / "cn" / "random" / "seed_1"
    resumed.mkdir(parents=True)
    (resumed / "checkpoint.pt").write_bytes(b"")
    out = bench("smoke", "--seeds", 0, 1, 13, "--jobs", 2, "--threads", 1, *dirs(tmp_path), *algo_dir)
    assert out.returncode == 1
    assert "FAILED cfcql_smoke/cn/random/seed_13" in out.stderr and "fake failure for seed 13" in out.stderr
    assert "finished: 4 ok, 2 failed" in out.stdout

    argv = json.loads((tmp_path / "runs/cfcql_smoke/cn/random/seed_0/argv.json").read_text())
    assert argv[argv.index("--run-dir") + 1] == str(tmp_path / "runs/cfcql_smoke/cn/random")
    assert argv[argv.index("--run-name") + 1] == "seed_0" and "--resume" not in argv
    assert argv[argv.index("--threads") + 1] == "1" and "--num-updates" in argv
    argv = json.loads((resumed / "argv.json").read_text())
    assert argv[argv.index("--resume") + 1] == str(resumed)

    r = json.loads((tmp_path / "results/spacql_mpe_smoke/cn/random/seed_1.json").read_text())
    assert r["final_normalized_score"] == 51.0 and r["best_normalized_score"] == 70.0
    assert r["last10_normalized_score"] == (10 + 70 + 51) / 3
    assert r["log_curves"]["round"] == [9, 19, 24]  # blocks of 10 logging windows
    assert r["log_curves"]["charts/target_spread"] == [4.5, 14.5, 22.0]
    assert "losses/td" not in r["log_curves"] and r["log_means"]["charts/w_1"] == pytest.approx(0.6)
    assert r["meta"] == {"commit": "abc123", "dirty": False, "machine": {"cpu": "fake"}}

    # a run whose final.json exists but whose result is lost is converted, not run again
    (tmp_path / "results/cfcql_smoke/cn/random/seed_0.json").unlink()
    (tmp_path / "runs/cfcql_smoke/cn/random/seed_0/argv.json").unlink()
    out = bench("smoke", "--seeds", 0, 1, *dirs(tmp_path), *algo_dir)
    assert out.returncode == 0 and "3 done (skipped), 1 missing" in out.stdout
    assert (tmp_path / "results/cfcql_smoke/cn/random/seed_0.json").is_file()
    assert not (tmp_path / "runs/cfcql_smoke/cn/random/seed_0/argv.json").exists()


def test_result_of_an_older_final_json_without_logs_or_meta():
    final = {"algo": "cfcql", "task": "cn", "dataset": "random", "seed": 3, "final_return": -5.0}
    final |= {"final_normalized_score": 40.0, "eval_history": [[0, -9.0, 20.0], [10, -5.0, 40.0]], "args": {}}
    r = load_benchmark_module().compact_result(final, "cfcql")
    assert r["log_curves"] is None and r["log_means"] is None and r["meta"] is None
    assert r["last10_normalized_score"] == 30.0 and r["wall_time_s"] is None


def test_dry_run_lists_missing_runs_then_none(tmp_path):
    out = bench("smoke", "--seeds", 0, 1, "--dry-run", *dirs(tmp_path))
    assert out.returncode == 0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("cfcql_smoke/", "spacql_mpe_smoke/"))]
    assert len(lines) == 4 and all("fresh" in ln and "4 rounds" in ln for ln in lines)
    assert "estimated CPU time" in out.stdout
    assert not (tmp_path / "runs").exists()  # a dry run creates nothing
    timed = {"algo": "cfcql_smoke", "task": "cn", "device": "cpu", "wall_time_s": 300.0}
    timed["meta"] = {"machine": {"torch_threads": 2}}  # 300 s x 2 threads = 10 core-minutes
    (tmp_path / "results/cfcql_smoke/cn/random").mkdir(parents=True)
    (tmp_path / "results/cfcql_smoke/cn/random/seed_0.json").write_text(json.dumps(timed))
    out = bench("smoke", "--seeds", 0, 1, "--dry-run", *dirs(tmp_path))
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("cfcql_smoke/cn/random/seed_1"))
    assert line.endswith("~   10.0 core-min (measured, 1 run)"), line
    assert "cfcql_smoke/cn/random/seed_0" not in out.stdout and "(measured" not in out.stdout.split(line)[1]
    other = {"algo": "cfcql_smoke", "task": "cn", "device": "cpu", "wall_time_s": 60.0}  # 1 thread: 1 minute
    other["meta"] = {"machine": {"torch_threads": 1, "cpu": cpu_model()}}  # this CPU model: preferred
    (tmp_path / "results/cfcql_smoke/cn/random/seed_2.json").write_text(json.dumps(other))
    out = bench("smoke", "--seeds", 0, 1, "--dry-run", *dirs(tmp_path))
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("cfcql_smoke/cn/random/seed_1"))
    assert line.endswith("~    1.0 core-min (measured here, 1 run)"), line
    for algo in ("cfcql_smoke", "spacql_mpe_smoke"):
        for seed in (0, 1):
            path = tmp_path / "results" / algo / "cn" / "random" / f"seed_{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
    out = bench("smoke", "--seeds", 0, 1, "--dry-run", *dirs(tmp_path))
    assert "no missing run" in out.stdout and "estimated CPU time" not in out.stdout
    full = bench("table2-mpe", "--dry-run", *dirs(tmp_path))
    assert "grid table2-mpe: 72 runs" in full.stdout and "spacql_mpe/world/expert/seed_2" in full.stdout


def expected_command(tmp_path, algo, seed, threads, algo_dir=None):
    cmd = f"{sys.executable} {BENCH} --run-one {algo} cn random {seed} --data-dir {tmp_path / 'data'} "
    cmd += f"--results-dir {tmp_path / 'results'} --runs-dir {tmp_path / 'runs'} "
    cmd += f"--algo-dir {algo_dir} " if algo_dir else ""
    return cmd + f"--threads {threads}"


def test_slurm_script(tmp_path):
    algo_dir = fake_algos(tmp_path)
    args = ["--slurm-partition", "debug", "--slurm-gpus", 1, "--slurm-cpus", 4, "--slurm-mem", "2G"]
    no_sbatch = ENV | {"PATH": str(Path(sys.executable).parent)}
    out = bench("smoke", "--seeds", 0, 1, "--slurm", *args, *dirs(tmp_path), *algo_dir, env=no_sbatch)
    assert out.returncode == 0, out.stderr
    assert "sbatch is not on PATH; submit on the cluster with: sbatch " in out.stdout
    script = (tmp_path / "runs/slurm/smoke.sbatch").read_text()
    for line in ("--array=0-3", "--partition=debug", "--gres=gpu:1", "--cpus-per-task=4", "--mem=2G"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --time=12:00:00\n" in script
    commands = (tmp_path / "runs/slurm/smoke.commands").read_text().splitlines()
    runs = [("cfcql_smoke", 0), ("cfcql_smoke", 1), ("spacql_mpe_smoke", 0), ("spacql_mpe_smoke", 1)]
    assert commands == [expected_command(tmp_path, a, s, 4, algo_dir[1]) for a, s in runs]
    # array task 2 as Slurm would run it
    task = subprocess.run(
        ["/bin/bash", tmp_path / "runs/slurm/smoke.sbatch"],
        env=ENV | {"SLURM_ARRAY_TASK_ID": "2"},
        capture_output=True,
        text=True,
    )
    assert task.returncode == 0, task.stdout + task.stderr
    assert [p.parts[-4] for p in (tmp_path / "results").glob("*/*/*/*.json")] == ["spacql_mpe_smoke"]

    # with sbatch on PATH (a fake one here) the script is submitted; the finished run is no longer in the array
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(
        f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch_args\necho Submitted batch job 7\n'
    )
    (fake_bin / "sbatch").chmod(0o755)
    env = ENV | {"PATH": f"{fake_bin}:{ENV['PATH']}"}
    out = bench("smoke", "--seeds", 0, 1, "--slurm", *dirs(tmp_path), *algo_dir, env=env)
    assert out.returncode == 0 and "Submitted batch job 7" in out.stdout
    assert (tmp_path / "sbatch_args").read_text().split() == [str(tmp_path / "runs/slurm/smoke.sbatch")]
    assert "#SBATCH --array=0-2\n" in (tmp_path / "runs/slurm/smoke.sbatch").read_text()


def test_print_commands(tmp_path):
    algo_dir = fake_algos(tmp_path)
    out = bench("smoke", "--seeds", 0, "--print-commands", "--threads", 1, *dirs(tmp_path), *algo_dir)
    assert out.returncode == 0 and "grid smoke" in out.stderr  # stdout: the commands only
    commands = out.stdout.splitlines()
    assert commands == [
        expected_command(tmp_path, a, 0, 1, algo_dir[1]) for a in ("cfcql_smoke", "spacql_mpe_smoke")
    ]
    done = subprocess.run(["/bin/bash", "-c", commands[0]], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "results/cfcql_smoke/cn/random/seed_0.json").is_file()
    extra = bench("smoke", "--seeds", 0, "--print-commands", "--extra=--compile --bf16", *dirs(tmp_path))
    assert extra.stdout.splitlines()[0].endswith(f" --threads {os.cpu_count()} '--extra=--compile --bf16'")


def test_report_on_synthetic_results(tmp_path):
    """Every table cell kind and every figure, from hand-made results (no training)."""
    results = tmp_path / "results"

    def write(algo, task, dataset, seed, score, logs=True):
        w = {"charts/w_1": 0.5 + seed / 100, "charts/w_2": 0.3, "charts/w_3": 0.2} if logs else {}
        r = {"algo": algo, "task": task, "dataset": dataset, "seed": seed, "final_normalized_score": score}
        r |= {"eval_history": [[0, 0.0, 10.0], [5, 0.0, score]], "meta": None}
        r |= {"log_curves": {"round": [9, 19], "charts/target_spread": [1.0, 0.5]} if logs else None}
        r |= {"log_means": w if logs else None}
        path = results / algo / task / dataset / f"seed_{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))

    for seed in range(3):
        write("cfcql", "cn", "random", seed, 62 + seed)  # agrees with the paper's 62.2 ± 8.1
        write("spacql_mpe", "cn", "random", seed, 20 + seed)  # far below the paper's 78.2 ± 14
        write("icql_qs", "cn", "random", seed, 70 + seed)  # the paper gives no std
        for algo in ("cfcql_e10", "icql_qs_e10"):
            write(algo, "cn", "expert", seed, 100.0)
    write("spacql_mamujoco", "halfcheetah", "expert", 0, 100.0, logs=False)
    rep = report("--results-dir", results, "--reps", 200)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    readme = (results / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith("| cn | random |"))
    cf, _, icql, _, spacql, _ = [c.strip() for c in row.split("|")[3:-1]]
    assert cf == "63.0 ± 1.0 (n=3)" and "†" in spacql and "no std, not tested" in icql
    assert "P(SPaCQL > CFCQL)" in readme and "seeds per setting: SPaCQL 3, CFCQL 3;" in readme
    assert "95% CI [" in readme
    # SPaCQL: cn random has seeds 0-2, halfcheetah expert seed 0 only: 1 setting x 3 seeds keeps more runs than
    # 2 settings x 1 seed, so halfcheetah expert is left out and named
    assert "| SPaCQL | 1 | 3 | 0.210 | [" in readme
    assert "Left out (not the seeds of the other settings): SPaCQL halfcheetah expert (seeds [0])." in readme
    assert "| CFCQL | 1 | 3 | 0.630 | [" in readme
    # SPaCQL's raw weights: the seed mean of w_1 = 0.50, 0.51, 0.52; u_k, k_eff, spread not logged here
    assert "| cn | random | 3 | 0.510 / 0.300 / 0.200 | — / — / — | — | — |" in readme
    for name in (
        "curves_cn.png",
        "curves_halfcheetah.png",
        "figure2_target_spread.png",
        "figure3_weights.png",
    ):
        assert (results / "figures" / name).stat().st_size > 0
    assert "missing (no data): curves_pp.png, curves_world.png" in readme


def test_report_intervals_are_reproducible():
    """The same scores give the same CI whatever ran before (rliable draws from numpy's global generator)."""
    spec = importlib.util.spec_from_file_location("report_script", REPORT)
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    scores = np.random.default_rng(1).uniform(0.2, 1.2, size=(8, 4))  # 8 seeds x 4 settings
    iqm = lambda x: np.array([rep.metrics.aggregate_iqm(x)])
    first = rep.bootstrap(scores, iqm, 100)[1]
    np.random.rand(7)  # other code using the global generator in between, e.g. another algorithm's bootstrap
    again = rep.bootstrap(scores, iqm, 100)[1]
    assert first.shape == (2, 1) and first[0, 0] < first[1, 0] and np.array_equal(first, again)


def test_dry_run_into_a_closed_pipe_ends_quietly(tmp_path):
    """`benchmark.sh GRID --dry-run | head -1`: no BrokenPipeError traceback once head has what it wants."""
    cmd = f"{shlex.quote(sys.executable)} {BENCH} table2-mpe --dry-run --results-dir {tmp_path} | head -1"
    done = subprocess.run(["/bin/bash", "-c", cmd], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert done.stdout.startswith("grid table2-mpe: 72 runs, 0 done") and "Traceback" not in done.stderr, (
        done.stderr
    )
