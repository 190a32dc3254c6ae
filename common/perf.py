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
