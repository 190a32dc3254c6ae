"""Attainable matrix-multiply rates on this machine at the critic's shapes: the ceiling of the training scripts.

The conservative penalty is three H x H matmuls per member (forward, input gradient, weight gradient) on n*B*M
rows, plus the first layer's K = n*d matmuls; bench_algos.py reports what the whole round achieves, this script
what the matmul paths available to PyTorch achieve at those shapes, so that the two can be compared:

    python benchmarks/bench_matmul.py              # 2 threads
    python benchmarks/bench_matmul.py --threads 1

Paths: torch.bmm in float32 (PyTorch's default CPU path: MKL), oneDNN float32 through
torch.ops.mkldnn._linear_pointwise (one call per member: it has no batched form, which is why the training
scripts do not use it), and torch.bmm in bfloat16 (oneDNN). A large square matmul gives the machine's peak for
reference. Each line also as `RESULT matmul=<path> shape=<E>x<rows>x<K>x<N> gflops=<float>`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.perf import keep_freed_memory, machine_description  # noqa: E402


def timed(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rates(e: int, rows: int, k: int, n: int) -> dict[str, float]:
    x, w = torch.randn(e, rows, k), torch.randn(e, k, n)
    w_t = w.transpose(1, 2).contiguous()  # oneDNN's linear wants [out, in]
    flop = 2 * e * rows * k * n
    out = {"bmm_fp32_mkl": flop / timed(lambda: torch.bmm(x, w))}
    if torch.backends.mkldnn.is_available():
        linear = torch.ops.mkldnn._linear_pointwise
        out["onednn_fp32_per_member"] = flop / timed(
            lambda: [linear(x[j], w_t[j], None, "none", [], "") for j in range(e)]
        )
    xb, wb = x.bfloat16(), w.bfloat16()
    out["bmm_bf16"] = flop / timed(lambda: torch.bmm(xb, wb))
    return {name: f / 1e9 for name, f in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    print(f"MACHINE {machine_description()}", flush=True)
    shapes = [  # (label, E, rows, K, N)
        ("spacql cn layer 2, 1 chunk", 10, 1620, 64, 64),
        ("spacql cn layer 2, unchunked", 10, 30720, 64, 64),
        ("spacql cn layer 1 (actions, K = n*d)", 10, 1620, 6, 64),
        ("cfcql cn layer 2, 1 chunk", 2, 8190, 64, 64),
        ("cfcql halfcheetah layer 2, 1 chunk", 2, 2040, 256, 256),
        ("square (machine peak)", 1, 2048, 1024, 1024),
    ]
    print(f"threads={torch.get_num_threads()}  GFLOP/s per path")
    for label, e, rows, k, n in shapes:
        r = rates(e, rows, k, n)
        print(
            f"{label:36s} [{e} x {rows} x {k}] @ [{k} x {n}]: "
            + "  ".join(f"{p} {v:6.1f}" for p, v in r.items())
        )
        for path, v in r.items():
            print(f"RESULT matmul={path} shape={e}x{rows}x{k}x{n} gflops={v:.1f}")


if __name__ == "__main__":
    main()
