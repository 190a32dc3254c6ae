"""Speed of one update round (1 critic+actor step, 4 critic steps, 1 target update) of every algorithm.

Synthetic data of the real shapes (no dataset needed). Per case it prints the median and min-max milliseconds per
round over repeats, the FLOPs of one round (matrix multiplies, counted by torch.utils.flop_counter on the real
code), the achieved GFLOP/s, device, dtype and threads, and the projected time of the reference schedule;
then one machine-readable line
    RESULT algo=<name> task=<cn|pp|world|halfcheetah> device=<cpu|cuda> dtype=<fp32|bf16> ms_per_round=<float>

    python benchmarks/bench_algos.py                      # every algorithm on cn, world, halfcheetah; 2 threads
    python benchmarks/bench_algos.py --algos spacql_mpe --tasks cn world --rounds 20 --repeats 5
    python benchmarks/bench_algos.py --algos cfcql --tasks cn --bf16 --compile   # also bf16 and torch.compile
    git worktree add /tmp/base 4fead26 && python benchmarks/bench_algos.py --baseline /tmp/base   # A/B, interleaved

Measure on an otherwise idle machine: a second busy process on a 2-core CPU distorts the figures several-fold.
The variants of one algorithm and task (fp32/bf16, eager/compiled) are timed interleaved, repeat by repeat, so that
the machine's drift does not favour one of them; the first line printed names the machine (MACHINE ...).
A --compile case adds ` compile=1` to its RESULT line. On CPU a PROBE line per algorithm and task gives the
rate of a fixed matmul and copy timed between the cases: compare runs from different minutes only together
with it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.perf import keep_freed_memory, machine_description  # noqa: E402
from common.tasks import get_task  # noqa: E402

FAMILY_OF = {"cfcql": None, "icql_qs": None, "spacql_mpe": "mpe", "spacql_mamujoco": "mamujoco"}


def synthetic_data(spec, n_transitions: int, device) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    n, o, d = spec.n_agents, spec.obs_dim, spec.act_dim
    obs = torch.randn(n_transitions, n, o, generator=g)
    next_obs = torch.randn(n_transitions, n, o, generator=g)
    states = (
        obs.flatten(1) if spec.family == "mpe" else torch.randn(n_transitions, spec.state_dim, generator=g)
    )
    next_states = (
        next_obs.flatten(1)
        if spec.family == "mpe"
        else torch.randn(n_transitions, spec.state_dim, generator=g)
    )
    data = SimpleNamespace(
        obs=obs,
        actions=torch.rand(n_transitions, n, d, generator=g) * 2 - 1,
        rewards=torch.randn(n_transitions, n, generator=g),
        next_obs=next_obs,
        next_actions=torch.rand(n_transitions, n, d, generator=g) * 2 - 1,
        dones=torch.zeros(n_transitions),
        states=states,
        next_states=next_states,
    )
    for k, v in vars(data).items():
        setattr(data, k, v.to(device))
    return data


class Data(SimpleNamespace):
    def __len__(self):
        return self.obs.shape[0]


def load_algorithm(algo: str, folder: str | None):
    """The algorithm file `algo` of this checkout, or of another version's checkout `folder` (--baseline; it runs
    against this checkout's common/, whose interfaces it must share)."""
    if folder is None:
        return importlib.import_module(algo)
    spec = importlib.util.spec_from_file_location(f"baseline_{algo}", Path(folder) / f"{algo}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def prepare(
    algo: str, task: str, device, bf16: bool, compile_: bool = False, baseline: str | None = None
) -> dict:
    """Networks, optimizers and synthetic data of one case; returns its one_round() and its FLOPs per round."""
    module = load_algorithm(algo, baseline)
    spec = get_task(task)
    args = module.Args(task=task, dataset="random", cuda=device.type == "cuda", bf16=bf16)
    if hasattr(module, "resolve_args"):  # the baseline's own option resolution
        args = module.resolve_args(args)
    else:
        from common import runs

        args = runs.resolve_args(args, module.TASK_FAMILIES)
    torch.manual_seed(0)
    nets = module.make_nets(spec, args, device)
    copt = torch.optim.Adam(nets.critic.parameters(), lr=args.lr)
    aopt = torch.optim.Adam(nets.actors.parameters(), lr=args.lr)
    data = Data(**vars(synthetic_data(spec, 100_000, device)))
    gen = torch.Generator(device=device).manual_seed(0)

    def one_round():
        return module.update_round(data, nets, copt, aopt, args, gen)

    with FlopCounterMode(display=False) as counter:
        one_round()
    # --compile only now: a torch.compile'd function first called under a mode like the FLOP counter runs eagerly,
    # and keeps doing so (measured: no graph is ever captured afterwards)
    if compile_:  # as the training scripts' --compile
        if hasattr(module, "compile_losses"):  # 4fead26's interface
            module.compile_losses(nets)
        else:  # make_nets under --compile attaches the compiled losses
            args.compile = True
            compiled = module.make_nets(spec, args, device)
            nets.critic_loss, nets.actor_loss = compiled.critic_loss, compiled.actor_loss
    for _ in range(3):  # warm-up (and compilation)
        one_round()
    return {
        "one_round": one_round,
        "algo": algo + (" (baseline)" if baseline else ""),
        "task": task,
        "device": device.type,
        "dtype": "bf16" if bf16 else "fp32",
        "compiled": compile_,
        "threads": torch.get_num_threads(),
        "gflop": counter.get_total_flops() / 1e9,
        "num_updates": args.num_updates,
        "E": args.num_critics,
    }


class MachineProbe:
    """A fixed CPU workload timed once per repeat, between the cases: an fp32 matmul ([1024, 1024] @ [1024, 1024],
    GFLOP/s) and a 64 MB copy (GB/s, read + write). Its medians, printed beside the cases (PROBE line), tell a slow
    minute of a drifting virtual machine apart from a slower change in the code when runs are compared."""

    def __init__(self):
        self.a, self.b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        self.src, self.dst = torch.randn(2**24), torch.empty(2**24)
        self.gflops, self.gbs = [], []

    def run(self) -> None:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(self.a, self.b)
        self.gflops.append(4 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        for _ in range(4):
            self.dst.copy_(self.src)
        self.gbs.append(4 * 2 * self.src.numel() * 4 / (time.perf_counter() - t0) / 1e9)


def measure(cases: list[dict], rounds: int, repeats: int, probe: MachineProbe | None = None) -> None:
    """Times every case's rounds, the cases interleaved repeat by repeat: a virtual machine's speed drifts by
    10-20% over minutes, and interleaving spreads the drift over all variants instead of favouring one."""
    times = [[] for _ in cases]
    for _ in range(repeats):
        if probe is not None:
            probe.run()
        for case, ts in zip(cases, times, strict=True):
            if case["device"] == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(rounds):
                case["one_round"]()
            if case["device"] == "cuda":
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) / rounds * 1e3)
    for case, ts in zip(cases, times, strict=True):
        ms = statistics.median(ts)
        case.update(ms=ms, min=min(ts), max=max(ts), gflops=case["gflop"] / (ms / 1e3))
        case["full_run_min"] = ms * case["num_updates"] / 1e3 / 60


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=list(FAMILY_OF))
    p.add_argument("--tasks", nargs="+", default=["cn", "world", "halfcheetah"])
    p.add_argument("--rounds", type=int, default=10, help="rounds per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="also measure --bf16 (the penalty in bf16)")
    p.add_argument("--compile", action="store_true", help="also measure --compile (torch.compile)")
    p.add_argument(
        "--baseline", help="checkout of another version: its cases are timed interleaved with these"
    )
    p.add_argument("--baseline-compile", action="store_true", help="also the baseline's --compile cases")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    print(f"MACHINE {machine_description()}", flush=True)
    device = torch.device(a.device)
    for algo in a.algos:
        for task in a.tasks:
            family = FAMILY_OF[algo]
            if family is not None and get_task(task).family != family:
                continue
            variants = list(
                itertools.product(
                    [False, True] if a.bf16 else [False], [False, True] if a.compile else [False]
                )
            )
            cases = [prepare(algo, task, device, bf16, compile_) for bf16, compile_ in variants]
            if a.baseline:
                cases += [
                    prepare(algo, task, device, bf16, compile_, a.baseline)
                    for bf16, compile_ in variants
                    if a.baseline_compile or not compile_
                ]
            probe = MachineProbe() if device.type == "cpu" else None
            measure(cases, a.rounds, a.repeats, probe)
            if probe is not None:
                print(
                    f"PROBE {algo} {task}: matmul_fp32_gflops={statistics.median(probe.gflops):.1f} "
                    f"copy_gbs={statistics.median(probe.gbs):.1f} (medians over the repeats, timed between the cases)",
                    flush=True,
                )
            for r in cases:
                print(
                    f"{r['algo']:27s} {task:12s} E={r['E']:2d} {r['device']} {r['dtype']}{' compiled' if r['compiled'] else ''} "
                    f"threads={r['threads']}: "
                    f"{r['ms']:8.1f} ms/round (min {r['min']:.1f}, max {r['max']:.1f}), {r['gflop']:6.2f} GFLOP/round, "
                    f"{r['gflops']:6.1f} GFLOP/s, full run ({r['num_updates']} rounds) {r['full_run_min']:.1f} min",
                    flush=True,
                )
                print(
                    f"RESULT algo={r['algo'].replace(' (baseline)', '_baseline')} task={task} device={r['device']} dtype={r['dtype']} ms_per_round={r['ms']:.2f}"
                    + (" compile=1" if r["compiled"] else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
