"""Process-wide CPU runtime settings that make training steps cheaper without changing what they compute.

Both are settings of the process, not of a model: the C allocator's thresholds and the floating-point
control register of the threads torch computes with. ``prepare_model`` applies them when the model trains
on a CPU (``EfficiencyOptions.retain_freed_memory`` / ``flush_denormals``); they can be called directly too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS; True where it applied.

    Why: a training step frees and re-allocates the same large activations every step. By default glibc
    serves each block above its mmap threshold (at most 32 MiB, adjusted at run time) with a fresh ``mmap``
    and gives the heap's top back as soon as a little of it is free, so every step page-faults its
    activations in again: 0.3-0.9 million faults, 1-2 s of a ViT-B step on 2 CPU cores. With blocks up to
    ``mmap_threshold`` served from the heap and ``trim_threshold`` of free top kept, the second step on
    reuses the first step's pages. Peak RSS is unchanged (the step reaches it anyway); memory freed after
    training stays with the process. A no-op off glibc.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or not 0 < value < 2**31:
            raise ValueError(f"{name} must be a positive int below 2**31 bytes, got {value!r}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def _openmp_runtime() -> str | None:
    """Path of the OpenMP runtime loaded in this process, torch's own copy first (Linux; None elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    paths = sorted(paths, key=lambda path: ("torch" not in path, path))
    return paths[0] if paths else None


def flush_denormals(enabled: bool = True) -> bool:
    """Flush denormal floats to zero (``enabled``) or stop, on this thread and torch's OpenMP threads.

    Why: arithmetic on denormals (magnitudes below 1.2e-38, which bf16 shares with float32) takes a slow
    microcode path on x86; softmax and GELU-derivative tails produce them in every step. Flushing them
    changes values only below that magnitude. ``torch.set_flush_denormal`` sets the control register of the
    calling thread alone, and OpenMP's worker threads, started at torch's first parallel op, keep their
    own: so the setting is run once inside an OpenMP parallel region of torch's runtime, on every thread
    of the team (threads started later inherit it from the main thread).

    Returns True when every thread of the team was set; False where the CPU or the runtime does not allow
    it (then at most the calling thread was set).
    """
    if not torch.set_flush_denormal(enabled):
        return False
    path = _openmp_runtime()
    try:
        parallel = ctypes.CDLL(path).GOMP_parallel if path else None
    except (OSError, AttributeError):
        parallel = None
    if parallel is None:
        return torch.get_num_threads() == 1
    threads = torch.get_num_threads()
    visited: set[int] = set()
    lock = threading.Lock()

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def body(_: int) -> None:
        torch.set_flush_denormal(enabled)
        with lock:
            visited.add(threading.get_ident())

    parallel.argtypes = [type(body), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    parallel(body, None, threads, 0)
    return len(visited) == threads


__all__ = ["flush_denormals", "retain_freed_memory"]
