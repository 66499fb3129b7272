"""The device-dependent choices of the speed options ("auto"), resolved where the step runs."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from hf_sam_peft.sam_forward.precision import fast_autocast_dtype, native_autocast_dtype
from hf_sam_peft.speed.options import AUTOCAST_DTYPES, EfficiencyOptions


def resolve_autocast_dtype(option: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``device`` (``"auto"``: bf16 where the hardware runs it natively and faster than
    float32, else None: :func:`hf_sam_peft.sam_forward.precision.fast_autocast_dtype`)."""
    device = torch.device(device)
    if option is None:
        return None
    if option != "auto":
        return AUTOCAST_DTYPES[option]
    return fast_autocast_dtype(device)


def resolve_checkpoint_encoder(option: bool | str, device: torch.device | str) -> bool:
    """``checkpoint_encoder`` for a step on ``device``: "auto" is on for a CPU without native bf16.

    There the step cannot use bf16 autocast (emulated bf16 is slower than float32), so the encoder's saved
    activations are float32; recomputing them in backward cut a ViT-B step's peak memory by 40% for at most a
    tenth more CPU time (``benchmarks/RESULTS.md``).
    """
    if option != "auto":
        return bool(option)
    device = torch.device(device)
    return device.type == "cpu" and native_autocast_dtype(device) is None


def resolve_mlp_recompute(options: EfficiencyOptions, device: torch.device | str) -> str | None:
    """``encoder_mlp_recompute`` for a step on ``device``: None wherever the encoder is checkpointed (that
    recomputes whole blocks); else "auto" is "hidden" where the step trains in float32 on a CPU (no native or
    no faster bf16)."""
    device = torch.device(device)
    if resolve_checkpoint_encoder(options.checkpoint_encoder, device):
        return None
    option = options.encoder_mlp_recompute
    if option != "auto":
        return option
    float32 = resolve_autocast_dtype(options.autocast_dtype, device) is None
    return "hidden" if device.type == "cpu" and float32 else None


def autocast_context(options: EfficiencyOptions | None, device: torch.device | str) -> ContextManager:
    """``torch.autocast`` for the step's forward, or a no-op context."""
    dtype = resolve_autocast_dtype(options.autocast_dtype, device) if options is not None else None
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


