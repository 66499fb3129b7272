"""QLoRA's frozen 4-bit image encoder: every encoder `nn.Linear` becomes a bitsandbytes `Linear4bit`."""

from __future__ import annotations

import torch
from torch import nn

from ..base import find_image_encoder

QUANT_TYPES = ("nf4", "fp4")


def _bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "QLoRA needs bitsandbytes for 4-bit weights: pip install 'hf-sam-peft[quant]' (bitsandbytes>=0.45)"
        ) from exc
    return bnb


def quantize_image_encoder(
    model: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Replace every Linear of the image encoder by a frozen 4-bit `bnb.nn.Linear4bit` (in place).

    nf4 (QLoRA's paper) is the default; fp4 is bitsandbytes' default, which micro-sam used. On CPUs with
    AVX512-BF16, bitsandbytes repacks weights after an eval forward and later training forwards fail; we turn
    that path off per layer (DESIGN §8).
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    bnb = _bitsandbytes()
    encoder = find_image_encoder(model)
    # the exact type: a Linear4bit (an nn.Linear subclass) or a peft-wrapped layer is not quantized again
    targets = [(n, m) for n, m in encoder.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ValueError("the image encoder has no full-precision nn.Linear left to quantize")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        device = linear.weight.device
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, quant_type=quant_type,
        )
        # full-precision data on the CPU: Params4bit quantizes when it is moved (`q.to(device)` below)
        q.weight = bnb.nn.Params4bit(linear.weight.data.float().cpu().clone(), requires_grad=False, quant_type=quant_type)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        # bitsandbytes' CPU repacking after an eval forward breaks later training forwards; Linear4bit.__init__
        # turns it on per layer wherever the CPU has AVX512-BF16
        if hasattr(q, "support_avx512bf16_for_cpu"):
            q.support_avx512bf16_for_cpu = False
        try:
            q = q.to(device)
        except Exception as exc:  # pragma: no cover - hardware dependent
            raise RuntimeError(
                f"bitsandbytes could not quantize to 4-bit on {device} ({exc}); QLoRA needs a bitsandbytes build "
                "with 4-bit support for this device (CUDA GPU, or a CPU build >= 0.45)"
            ) from exc
        if not getattr(q.weight, "bnb_quantized", False):
            raise RuntimeError(f"bitsandbytes did not quantize {name} to 4-bit on {device}; QLoRA needs 4-bit support")
        setattr(parent, child, q)
    return model
