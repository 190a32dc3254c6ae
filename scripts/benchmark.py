"""Run the paper's experiment grids (CleanRL convention; `bash benchmark.sh GRID ...` calls this script).

A run is one (algorithm, task, dataset type, seed). Its folder is <runs-dir>/<algo>/<task>/<dataset>/seed_<k>/
and its compact result <results-dir>/<algo>/<task>/<dataset>/seed_<k>.json. A run with a result is skipped, one
with a checkpoint.pt is resumed, one with final.json only converted, any other starts afresh: re-running a grid
does only what is missing.

    python scripts/benchmark.py table2-mpe --dry-run            # missing runs and their estimated CPU time
    python scripts/benchmark.py table1 --jobs 2                 # run locally, 2 runs at a time
    python scripts/benchmark.py table2-mpe --tasks world --datasets random   # a part of a grid
    python scripts/benchmark.py figure2 --print-commands --jobs 4 | parallel -j 4   # --jobs: threads per run
    python scripts/benchmark.py table2-halfcheetah --slurm --slurm-gpus 1 --extra="--compile"
    python scripts/benchmark.py --run-one cfcql cn random 0     # one run and its conversion (used by the above)

Grids: table2-mpe, table1, figure2, table2-halfcheetah, smoke (tiny settings, for tests). The flags of a run are
a function of its algorithm name (cfcql_e10 = cfcql.py --num-critics 10), so a run shared by two grids is
the same run. Then `python scripts/report.py` writes results/README.md and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.perf import cpu_model  # noqa: E402
from common.tasks import DATASET_TYPES, REFERENCE_HPARAMS  # noqa: E402

SMOKE_FLAGS = "--num-updates 4 --eval-every 2 --batch-size 32 --hidden 16 --num-eval-episodes 2 --log-every 1"
# result name -> (algorithm file, flags); every grid and every result folder uses these names
ALGOS = {
    "cfcql": ("cfcql.py", ""),
    "icql_qs": ("icql_qs.py", ""),
    "spacql_mpe": ("spacql_mpe.py", ""),
    "spacql_mamujoco": ("spacql_mamujoco.py", ""),
    "cfcql_e10": ("cfcql.py", "--num-critics 10"),
    "icql_qs_e10": ("icql_qs.py", "--num-critics 10"),
    "cfcql_smoke": ("cfcql.py", SMOKE_FLAGS),
    "spacql_mpe_smoke": ("spacql_mpe.py", SMOKE_FLAGS),
}
GRIDS = {  # grid -> [(algo, task, dataset)]
    "table2-mpe": [
        (a, t, d) for a in ("cfcql", "spacql_mpe") for t in ("cn", "pp", "world") for d in DATASET_TYPES
    ],
    "table1": [(a, t, d) for a in ("cfcql", "icql_qs") for t in ("cn", "world") for d in DATASET_TYPES],
    "figure2": [(a, "cn", d) for a in ("cfcql_e10", "icql_qs_e10") for d in ("random", "expert")],
    "table2-halfcheetah": [
        (a, "halfcheetah", d) for a in ("cfcql", "spacql_mamujoco") for d in DATASET_TYPES
    ],
    "smoke": [(a, "cn", "random") for a in ("cfcql_smoke", "spacql_mpe_smoke")],
}
# ms per update round of the current code, 2 threads, 2-core AMD EPYC (benchmarks/bench_algos.py, docs/speed.md):
# (eager fp32, --compile, estimated?); estimated = scaled from the measured cn cases (same shapes up to the state width)
MS_PER_ROUND = {
    ("cfcql.py", "cn"): (276, 206, False),
    ("cfcql.py", "pp"): (276, 206, True),
    ("cfcql.py", "world"): (290, 217, True),
    ("cfcql.py", "halfcheetah"): (933, 808, False),
    ("spacql_mpe.py", "cn"): (1246, 905, False),
    ("spacql_mpe.py", "pp"): (1246, 905, True),
    ("spacql_mpe.py", "world"): (1308, 950, True),
    ("spacql_mamujoco.py", "halfcheetah"): (2650, 2290, True),
}
LOG_TAGS = re.compile(r"charts/(target_spread|k_eff|w_\d+|u_\d+)")  # the logged tags a result keeps
CORES = os.cpu_count() or 1


def key(algo, task, dataset, seed):
    return f"{algo}/{task}/{dataset}/seed_{seed}"


def run_state(algo, task, dataset, seed, runs_dir, results_dir):
    """('done' | 'convert' | 'resume' | 'fresh', run folder): the one place that knows the run-folder layout."""
    folder = Path(runs_dir) / algo / task / dataset / f"seed_{seed}"
    if (Path(results_dir) / f"{key(algo, task, dataset, seed)}.json").is_file():
        return "done", folder
    if (folder / "final.json").is_file():  # finished, but its conversion did not happen
        return "convert", folder
    if (folder / "checkpoint.pt").is_file():
        return "resume", folder
    return "fresh", folder


def algo_command(algo, task, dataset, seed, folder, state, args, threads):
    file, flags = ALGOS[algo]
    cmd = [sys.executable, str(Path(args.algo_dir) / file), "--task", task, "--dataset", dataset]
    cmd += ["--seed", str(seed), "--data-dir", str(args.data_dir), "--threads", str(threads)]
    cmd += ["--run-dir", str(folder.parent), "--run-name", folder.name]
    if state == "resume":
        cmd += ["--resume", str(folder)]
    return cmd + shlex.split(flags) + shlex.split(args.extra)


def compact_result(final: dict, algo: str) -> dict:
    """The result kept per run, from the run's final.json (older files without logs/meta give None there)."""
    scores = [h[2] for h in final["eval_history"]]
    logs, meta = final.get("logs"), final.get("meta")
    curves = means = None
    if logs is not None:
        tags = sorted({t for w in logs for t in w if LOG_TAGS.fullmatch(t)})
        curves = {"round": []} | {t: [] for t in tags}  # mean of each block of 10 logging windows
        for i in range(0, len(logs), 10):
            block = logs[i : i + 10]
            curves["round"].append(block[-1]["round"])
            for t in tags:
                vals = [w[t] for w in block if t in w]
                curves[t].append(sum(vals) / len(vals) if vals else None)
        means = {t: sum(w[t] for w in logs if t in w) / sum(t in w for w in logs) for t in tags}
    return {
        "algo": algo,
        "task": final["task"],
        "dataset": final["dataset"],
        "seed": final["seed"],
        "final_normalized_score": final["final_normalized_score"],
        "final_return": final["final_return"],
        "last10_normalized_score": sum(scores[-10:]) / len(scores[-10:]),
        "best_normalized_score": max(scores),
        "eval_history": final["eval_history"],
        "log_curves": curves,  # None: the run's final.json had no logs
        "log_means": means,  # mean over all logging windows (Figure 3 uses charts/w_k)
        "wall_time_s": final.get("wall_time_s"),
        "device": final.get("device"),
        "meta": None if meta is None else {k: meta.get(k) for k in ("commit", "dirty", "machine")},
        "flags": final.get("args"),
    }


def convert(folder: Path, algo: str, result_path: Path):
    result = compact_result(json.loads((folder / "final.json").read_text()), algo)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)


def run_one(algo, task, dataset, seed, args, threads):
    """Run (or resume) one run, its output in <run folder>/stdout.log, then convert it. Returns an error or None."""
    state, folder = run_state(algo, task, dataset, seed, args.runs_dir, args.results_dir)
    name = key(algo, task, dataset, seed)
    if state == "done":
        return None
    if state != "convert":
        folder.mkdir(parents=True, exist_ok=True)
        cmd = algo_command(algo, task, dataset, seed, folder, state, args, threads)
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        print(f"start {name} ({state})", flush=True)
        with open(folder / "stdout.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not (folder / "final.json").is_file():
            tail = (folder / "stdout.log").read_text(errors="replace").splitlines()[-15:]
            lines = "\n  ".join(tail)
            print(f"failed {name} (exit {rc}); details at the end", flush=True)
            return f"FAILED {name} (exit {rc}), last lines of {folder / 'stdout.log'}:\n  {lines}"
    try:
        convert(folder, algo, Path(args.results_dir) / f"{name}.json")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"FAILED {name}: converting {folder / 'final.json'}: {e!r}"
    print(f"done {name}", flush=True)
    return None


def run_one_command(algo, task, dataset, seed, args, threads):
    """The shell command of --run-one for this run (absolute paths, so it works from any directory)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", algo, task, dataset, str(seed)]
    for opt, path in (("data", args.data_dir), ("results", args.results_dir), ("runs", args.runs_dir)):
        cmd += [f"--{opt}-dir", str(Path(path).resolve())]
    if Path(args.algo_dir).resolve() != ROOT:
        cmd += ["--algo-dir", str(Path(args.algo_dir).resolve())]
    cmd += ["--threads", str(threads)]
    return shlex.join(cmd + ([f"--extra={args.extra}"] if args.extra else []))


def measured_core_s(results_dir) -> dict:
    """(algo, task) -> (median core-seconds of its finished CPU runs: wall time x torch threads, how many, where).

    Runs on this machine's CPU model are used when there are any ("here"): the same code on two CPU types here
    differed by about 2x. Otherwise the runs of every machine."""
    seen, here = {}, cpu_model()
    for path in Path(results_dir).glob("*/*/*/seed_*.json"):
        try:
            r = json.loads(path.read_text())
            machine = r["meta"]["machine"]
            threads = machine["torch_threads"]
            if r["device"] == "cpu" and r["wall_time_s"] > 0 and threads > 0:
                seen.setdefault((r["algo"], r["task"]), []).append(
                    (r["wall_time_s"] * threads, machine.get("cpu"))
                )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a result with timing (older or foreign file): estimated instead
    out = {}
    for k, runs in seen.items():
        local = sorted(s for s, cpu in runs if cpu == here)
        pool = local or sorted(s for s, _ in runs)
        out[k] = (pool[len(pool) // 2], len(pool), " here" if local else "")
    return out


def estimate_s(algo, task, compiled=False, measured=None):
    """(core-seconds, source, rounds) of one run: the median of its finished runs of the same algorithm and task
    when there are any (evaluation included), else rounds x ms per round at 2 threads (updates only)."""
    file, flags = ALGOS[algo]
    words = shlex.split(flags)
    rounds = int(words[words.index("--num-updates") + 1]) if "--num-updates" in words else None
    rounds = rounds or REFERENCE_HPARAMS[task].num_updates
    if measured and (algo, task) in measured:
        core_s, count, where = measured[(algo, task)]
        return core_s, f"measured{where}, {count} run{'s' * (count > 1)}", rounds
    base = file if (file, task) in MS_PER_ROUND else file.replace("icql_qs", "cfcql")
    eager_ms, compiled_ms, guess = MS_PER_ROUND[(base, task)]
    ms = compiled_ms if compiled else eager_ms
    if base != file:  # icql_qs: cfcql + ~10%
        ms, guess = ms * 1.1, True
    if "--num-critics" in words:  # measured with E = 2; critic work grows with E, so this is an upper bound
        ms, guess = ms * int(words[words.index("--num-critics") + 1]) / 2, True
    return 2 * rounds * ms / 1000, "estimate" if guess else "benchmark", rounds


def print_estimate(missing, results_dir, compiled=False):
    measured = measured_core_s(results_dir)
    total = 0.0
    for run, state in missing:
        sec, source, rounds = estimate_s(run[0], run[1], compiled, measured)
        sec = 0.0 if state == "convert" else sec  # finished; only its result is missing
        total += sec
        print(f"{key(*run):45s} {state:8s} {rounds:6d} rounds ~{sec / 60:7.1f} core-min ({source})")
    print(
        f"estimated CPU time: {total / 3600:.1f} core-hours (~{total / 3600 / CORES:.1f} h on {CORES} cores). "
        f"measured: the median finished run of that algorithm and task in {results_dir} (here: on this CPU "
        f"model); benchmark: update rounds at 2 threads from benchmarks/bench_algos.py"
        f"{' with --compile' * compiled}; estimate: scaled from those"
    )


def write_slurm(grid, missing, args):
    folder = Path(args.runs_dir).resolve() / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    commands = folder / f"{grid}.commands"
    commands.write_text("".join(run_one_command(*m, args, args.slurm_cpus) + "\n" for m in missing))
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=par-{grid}",
        f"#SBATCH --array=0-{len(missing) - 1}",
        f"#SBATCH --cpus-per-task={args.slurm_cpus}",
        f"#SBATCH --mem={args.slurm_mem}",
        f"#SBATCH --time={args.slurm_time}",
        f"#SBATCH --output={folder}/{grid}_%A_%a.out",
    ]
    lines += [f"#SBATCH --partition={args.slurm_partition}"] if args.slurm_partition else []
    lines += [f"#SBATCH --gres=gpu:{args.slurm_gpus}"] if args.slurm_gpus else []
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(ROOT))}",
        f'cmd=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(commands))})',
        'echo "$cmd"',
        'eval "$cmd"',
    ]
    script = folder / f"{grid}.sbatch"
    script.write_text("\n".join(lines) + "\n")
    print(f"wrote {script} ({len(missing)} array tasks) and {commands}", flush=True)
    if shutil.which("sbatch"):
        subprocess.run(["sbatch", str(script)], check=True)
    else:
        print(f"sbatch is not on PATH; submit on the cluster with: sbatch {script}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", nargs="?", choices=sorted(GRIDS), help="which grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", help="only these algorithms of the grid (e.g. cfcql spacql_mpe)")
    p.add_argument("--tasks", nargs="+", help="only these tasks of the grid (e.g. world)")
    p.add_argument("--datasets", nargs="+", help="only these dataset types of the grid (e.g. random)")
    p.add_argument("--data-dir", default="data", help="datasets (passed to every run)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--runs-dir", default="runs/benchmark")
    p.add_argument("--extra", default="", help='extra flags for every run; write --extra="--compile"')
    p.add_argument("--jobs", type=int, default=1, help="concurrent local runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run; default cores // jobs")
    p.add_argument("--dry-run", action="store_true", help="list the missing runs and their estimated time")
    p.add_argument("--print-commands", action="store_true", help="one shell command per missing run")
    p.add_argument("--slurm", action="store_true", help="write (and submit) a Slurm job array")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", default="12:00:00")
    p.add_argument("--slurm-cpus", type=int, default=2)
    p.add_argument("--slurm-mem", default="8G")
    p.add_argument("--slurm-gpus", type=int, default=0)
    p.add_argument(
        "--run-one", nargs=4, metavar=("ALGO", "TASK", "DATASET", "SEED"), help="one run, converted"
    )
    p.add_argument("--algo-dir", default=str(ROOT), help="where the algorithm files are (tests)")
    args = p.parse_args()
    if (args.grid is None) == (args.run_one is None):
        p.error("give a GRID or --run-one ALGO TASK DATASET SEED")
    return args


def main():
    args = parse_args()
    if args.run_one:
        algo, task, dataset, seed = args.run_one
        error = run_one(algo, task, dataset, int(seed), args, args.threads or CORES)
        if error:
            print(error, file=sys.stderr)
        sys.exit(1 if error else 0)

    cells = [
        (a, t, d)
        for a, t, d in GRIDS[args.grid]
        if (not args.algos or a in args.algos)
        and (not args.tasks or t in args.tasks)
        and (not args.datasets or d in args.datasets)
    ]
    runs = [(a, t, d, s) for a, t, d in cells for s in args.seeds]
    states = [run_state(*r, args.runs_dir, args.results_dir)[0] for r in runs]
    missing = [r for r, st in zip(runs, states) if st != "done"]
    info = sys.stderr if args.print_commands else sys.stdout  # stdout of --print-commands: commands only
    done = len(runs) - len(missing)
    print(f"grid {args.grid}: {len(runs)} runs, {done} done (skipped), {len(missing)} missing", file=info)
    if not missing:
        print("no missing run", file=info)
        return
    if args.dry_run:
        compiled = "--compile" in shlex.split(args.extra)
        missing_states = [(r, st) for r, st in zip(runs, states) if st != "done"]
        return print_estimate(missing_states, args.results_dir, compiled)
    if args.print_commands:
        for m in missing:
            print(run_one_command(*m, args, args.threads or max(1, CORES // args.jobs)))
        return
    if args.slurm:
        return write_slurm(args.grid, missing, args)
    threads = args.threads or max(1, CORES // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        errors = [e for e in pool.map(lambda r: run_one(*r, args, threads), missing) if e]
    for e in errors:
        print(e, file=sys.stderr)
    print(f"finished: {len(missing) - len(errors)} ok, {len(errors)} failed")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `--dry-run | head` ends quietly, as a shell tool does
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
