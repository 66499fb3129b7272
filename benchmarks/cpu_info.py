"""What CPU a benchmark ran on and which instruction sets torch's kernels could use: one line per table.

Benchmarks compare kernels whose speed depends on the ISA (AMX, AVX512-BF16, AVX2), and the development
machine can emulate smaller CPUs through two environment variables, each reaching a different part of torch:
- ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX512_CORE_BF16``: no AMX; ``AVX2``) caps oneDNN: the bf16/float32 matmuls,
  convolutions and linear layers torch sends to oneDNN (mkldnn), the brgemm micro-kernels inside torch's CPU
  flash-attention kernel, and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (so our bf16 autocast turns
  itself off below AVX512-BF16).
- ``ATEN_CPU_CAPABILITY`` (``avx512``, ``avx2``, ``default``) picks which build of ATen's own vectorised
  kernels runs: elementwise ops, reductions, softmax, layer norm, and the non-brgemm parts of flash attention.
A real CPU without AMX changes both; capping only oneDNN leaves ATen's AVX-512 kernels in place.
"""

from __future__ import annotations

import os
import platform

import torch

_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its flags (Linux /proc/cpuinfo; elsewhere the platform's processor string)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.machine())
    flags = next((set(l.split(":", 1)[1].split()) for l in lines if l.startswith("flags")), set())
    return model, flags


def isa_summary() -> dict[str, object]:
    """The CPU model, the ISA flags that matter here, the caps in force and what torch sees under them."""
    model, flags = cpu_flags()
    bf16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return {
        "cpu": model,
        "flags": [f for f in _FLAGS if f in flags],
        "caps": {k: os.environ[k] for k in _CAPS if os.environ.get(k)},
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bf16,
        "torch": torch.__version__,
    }


def isa_line(summary: dict[str, object] | None = None) -> str:
    """``# CPU: <model>; flags ...; caps ...; ATen kernels ...; oneDNN bf16 ...; torch ...`` for a table header."""
    s = summary or isa_summary()
    caps = ", ".join(f"{k}={v}" for k, v in s["caps"].items()) or "none"
    return (f"# CPU: {s['cpu']}; flags {' '.join(s['flags']) or 'none of ' + '/'.join(_FLAGS)}; caps {caps}; "
            f"ATen kernels {s['aten_capability']}; oneDNN bf16 {'native' if s['onednn_bf16'] else 'off'}; "
            f"torch {s['torch']}")


if __name__ == "__main__":
    print(isa_line())
