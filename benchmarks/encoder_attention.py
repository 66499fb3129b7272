"""Forward + backward time of one ViT-B image-encoder attention per kernel, on the CPU at hand (issue 19).

One global-attention block (64 x 64 tokens) and one windowed block (25 windows of 14 x 14) of SAM ViT-B's
encoder, built from transformers' ``SamVisionAttention`` with random weights, switched to each kernel the
training options offer (``EfficiencyOptions.encoder_attention``: "fused", "eager", "sdpa"; "fused:S" /
"fused:none" set the fused kernel's key tile side, ``EfficiencyOptions.encoder_key_tile``), run under bf16
autocast where the CPU computes bf16 natively (as training does) and in float32. Prints the CPU line
(``cpu_info.py``) so that runs under ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` caps can be compared:

    python benchmarks/encoder_attention.py --threads 2
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/encoder_attention.py --threads 2   # no AMX
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/encoder_attention.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_info import isa_line  # noqa: E402


def attention_module(window: int):
    """ViT-B's attention for a ``window`` x ``window`` token grid (64: a global block; 14: a windowed one)."""
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionAttention

    config = SamVisionConfig(hidden_size=768, num_attention_heads=12, use_rel_pos=True)
    return SamVisionAttention(config, window_size=window)


def time_kernel(kind: str, window: int, batch: int, dtype: torch.dtype | None, repeats: int) -> tuple[float, float]:
    """Median forward and backward seconds of ``kind`` (``fused:S``: key tile side S) on ``batch`` grids of ``window``²."""
    from hf_sam_peft.modeling.attention import DEFAULT_KEY_TILE
    from hf_sam_peft.speed import set_encoder_attention

    kind, _, tile = kind.partition(":")
    key_tile = DEFAULT_KEY_TILE if not tile else None if tile == "none" else int(tile)
    torch.manual_seed(0)
    module = attention_module(window).train()
    holder = torch.nn.Module()
    holder.vision_encoder = torch.nn.ModuleList([module])
    set_encoder_attention(holder, kind, key_tile)
    x = torch.randn(batch, window, window, 768, requires_grad=True)
    forward, backward = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = module(x)[0]
        middle = time.perf_counter()
        out.float().square().mean().backward()
        end = time.perf_counter()
        if i:  # the first run warms up
            forward.append(middle - start)
            backward.append(end - middle)
    return statistics.median(forward), statistics.median(backward)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="fused,fused:none,eager,sdpa",
                        help="comma-separated: fused (default key tile), fused:S / fused:none (key tile side), eager, sdpa")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hf_sam_peft.sam_forward.precision import native_autocast_dtype

    dtypes = [native_autocast_dtype("cpu"), None] if native_autocast_dtype("cpu") is not None else [None]
    print(isa_line())
    print(f"# {args.threads} threads, median of {args.repeats} after one warm-up; load average {os.getloadavg()[0]:.1f}")
    print("| block | precision | kernel | forward (s) | backward (s) | total (s) |")
    print("|---|---|---|---:|---:|---:|")
    for block, window, batch in (("global 64x64", 64, 1), ("windowed 25 x 14x14", 14, 25)):
        for dtype in dtypes:
            for kind in args.kinds.split(","):
                fwd, bwd = time_kernel(kind, window, batch, dtype, args.repeats)
                name = "bf16 autocast" if dtype is not None else "float32"
                print(f"| {block} | {name} | {kind} | {fwd:.3f} | {bwd:.3f} | {fwd + bwd:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
