"""CPU speed settings shared by the training scripts (no effect on results)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS.

    The conservative penalty allocates activation tensors of tens of MB several times per step. By default glibc
    serves such blocks with mmap and unmaps them on free, so every step page-faults them in again; measured on the
    2-core CPU this doubled SPaCQL's round time (4.9 s -> 2.6 s with one thread). Raising the mmap and trim
    thresholds keeps the memory in the heap for reuse. Returns False where glibc is not available (no effect).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
            libc.mallopt(m_trim_threshold, (1 << 31) - 1)
        )
    except (OSError, AttributeError):
        return False


def machine_description() -> str:
    """CPU model, logical CPU count and torch build: speed figures are only comparable on the same machine type."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs{gpu}, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform's guess where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def compile_backend(device) -> str | object:
    """The torch.compile backend of `--compile`: inductor; on CPU with activations saved as computed.

    Inductor's default partitioner saves each ReLU's backward mask as a bool tensor, and its CPU code stores
    bool vectors slowly on AVX2-only CPUs (measured: a compiled `(x + h) <= 0` over [10, 1024, 30, 64] took 220 ms
    against 19 ms eager), which made `--compile` slower than eager there. The default (non-recomputing) partition
    saves the float activations instead. Same graphs, same results; only what is kept for the backward differs.
    """
    if device.type != "cpu":
        return "inductor"
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    return aot_autograd(
        fw_compiler=compile_fx_inner,
        bw_compiler=compile_fx_inner,
        partition_fn=default_partition,
        decompositions=select_decomp_table(),
    )
