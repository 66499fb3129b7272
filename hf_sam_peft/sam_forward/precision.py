"""Which reduced precision a device runs natively, and whether it is faster there: the one place training and
inference ask.

``hf_sam_peft.speed.resolve_autocast_dtype("auto", ...)`` and inference
(:mod:`hf_sam_peft.evaluation.fast_decoder`) both want "bf16 where it makes this device faster, else nothing".
Evaluation may not import ``hf_sam_peft.training`` (``tests/test_import_graph.py``), so the test lives here,
beneath both.

Why a measurement and not only the ISA (issue 19): a CPU that oneDNN reports as bf16-capable is not always
faster in bf16. With AMX (Intel Sapphire Rapids and later) a bf16 GEMM runs ~5x a float32 one; on AMD Zen 4/5
(AVX512-BF16, no AMX) bf16 steps were measured faster too; but on the development machine with AMX capped off
(``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``) oneDNN's AVX512-BF16 GEMM ran at 0.7-0.8x float32 (80 vs 118 GFLOP/s
on one thread, ViT-B's MLP shape; the probe below: 0.79x), and a ViT-B global-attention block's forward + backward took 11.3 s in bf16 vs 7.3 s
in float32 (``benchmarks/RESULTS.md``). So on a CPU without AMX, :func:`fast_autocast_dtype` times one bf16 and
one float32 GEMM of ViT-B's MLP shape once per process (~0.3 s) and keeps bf16 only where it is clearly
faster. The choice is logged; ``HF_SAM_PEFT_CPU_BF16=1`` / ``=0`` (or an explicit ``autocast_dtype``) overrides it
and makes it independent of timing, e.g. for runs that must match across machines.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch

__all__ = ["CPU_BF16_ENV", "MIN_BF16_SPEEDUP", "cpu_bf16_speedup", "fast_autocast_dtype", "native_autocast_dtype"]

logger = logging.getLogger(__name__)

CPU_BF16_ENV = "HF_SAM_PEFT_CPU_BF16"
# bf16 must beat float32 by this much: below it the choice would flip with timing noise, and float32 is exact
MIN_BF16_SPEEDUP = 1.2


def native_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """``torch.bfloat16`` where ``device`` computes it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX
    as oneDNN reports them), else None: emulated bf16 on a CPU is slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else None
    return None


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU's flags from /proc/cpuinfo (empty where it cannot be read). Read once: they do not change."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def _has_amx() -> bool:
    """Whether oneDNN may use AMX here: the CPU has it and ``ONEDNN_MAX_CPU_ISA`` does not cap it away."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    # the cap names the highest ISA oneDNN may use: only AMX-level values (e.g. AVX512_CORE_AMX) leave AMX on
    return "amx_bf16" in _cpu_flags() and (cap == "ALL" or "AMX" in cap)


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(threads: int | None = None) -> float:
    """How many times faster one bf16 GEMM of ViT-B's MLP shape (1024 x 768 @ 768 x 3072) runs than float32 on
    this CPU with ``threads`` (default: torch's current count); best of three each. Cached per process."""
    threads = threads or torch.get_num_threads()
    # the thread count is process-wide: restored in finally, so the probe leaves training's setting as it was
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # an own generator: the probe must not advance the global RNG, which seeded training draws from
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 768, generator=generator)
        w = torch.randn(3072, 768, generator=generator)
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = x.to(dtype), w.to(dtype)
            torch.nn.functional.linear(a, b)  # warm-up: oneDNN builds its kernel on first use
            times = []
            for _ in range(3):
                start = time.perf_counter()
                torch.nn.functional.linear(a, b)
                times.append(time.perf_counter() - start)
            best[dtype] = min(times)
    finally:
        torch.set_num_threads(previous)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)  # a coarse timer may read 0


def fast_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """``torch.bfloat16`` where ``device`` runs it natively *and* faster than float32, else None.

    CUDA and CPUs with AMX: the capability decides (:func:`native_autocast_dtype`). Other bf16-capable CPUs: a
    one-off measurement (:func:`cpu_bf16_speedup` ≥ :data:`MIN_BF16_SPEEDUP`), unless ``HF_SAM_PEFT_CPU_BF16`` is
    ``1`` (bf16 wherever native) or ``0`` (never on a CPU). See the module docstring for why.
    """
    device = torch.device(device)
    native = native_autocast_dtype(device)
    if native is None or device.type != "cpu":
        return native
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return native if forced == "1" else None
    if forced:
        raise ValueError(f"{CPU_BF16_ENV} must be 0 or 1 (or unset: measure), got {forced!r}")
    if _has_amx():
        return native
    return native if _bf16_pays_off() else None


@functools.lru_cache(maxsize=None)
def _bf16_pays_off() -> bool:
    """The measured choice on a CPU without AMX, made and logged once per process: training asks for its
    autocast dtype at every step, which must cost nothing and log nothing after the first."""
    speedup = cpu_bf16_speedup()
    pays = speedup >= MIN_BF16_SPEEDUP
    logger.info(
        "CPU without AMX: bf16 GEMM runs %.2fx float32 here, so autocast is %s (set %s=0/1 to choose)",
        speedup, "bf16" if pays else "off (float32)", CPU_BF16_ENV,
    )
    return pays
