"""The private aten operators this package calls, in one place, each checked once before it is used.

Why private ops at all: :mod:`hf_sam_peft.modeling.attention` runs SAM's encoder attention through torch's CPU
flash-attention kernels directly, forward and backward, so that backward keeps only the unwidened tensors
(``_LeanFlashAttention``); ``F.scaled_dot_product_attention`` exposes neither the log-sum-exp the key tiles are
merged by nor a backward that takes it. These operators are not public API: their schema may change in any torch
release. So each one is probed once per process on a tiny input (a call with the arguments we pass, compared
with the public ``F.scaled_dot_product_attention``); where the probe fails the callers take the public path (the
same attention through autograd, more memory for backward) and a one-time warning says why.

Checked against torch 2.6.0, 2.11.0 and 2.13.0 (:data:`CHECKED_TORCH`).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

__all__ = ["CHECKED_TORCH", "cpu_flash_attention", "cpu_flash_attention_backward", "cpu_flash_attention_available"]

CHECKED_TORCH = ("2.6.0", "2.11.0", "2.13.0")
_FORWARD = "_scaled_dot_product_flash_attention_for_cpu"
_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def cpu_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash attention at scale 1, no mask, no dropout: ``(output, logsumexp)``."""
    # scale 1: the callers fold the softmax scale into the queries (the appended bias terms must stay unscaled)
    return getattr(torch.ops.aten, _FORWARD)(query, key, value, scale=1.0)


def cpu_flash_attention_backward(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
    logsumexp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients ``(query, key, value)`` of :func:`cpu_flash_attention` given its ``out`` and ``logsumexp``."""
    # positional 0.0, False: dropout_p and is_causal, as the forward ran
    return getattr(torch.ops.aten, _BACKWARD)(grad_out, query, key, value, out, logsumexp, 0.0, False, scale=1.0)


@functools.cache
def cpu_flash_attention_available() -> bool:
    """Whether both operators exist with the schema used here and agree with the public SDPA (probed once)."""
    try:
        # the probe runs wherever the first attention call happens (under no_grad, inference_mode, autocast, or
        # inside activation checkpointing, whose saved-tensor hooks count what the forward saves): it needs its own
        # graph, float32, and identity hooks innermost so that its tensors never reach the caller's hooks
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return _probe()
    except (AttributeError, RuntimeError, TypeError) as error:
        warnings.warn(
            f"torch {torch.__version__}: aten.{_FORWARD} / backward not usable as this package calls them "
            f"({' '.join(str(error).split())[:200]}); SAM's fused encoder attention falls back to the public "
            f"scaled_dot_product_attention (same results, more memory in backward; checked torch: {', '.join(CHECKED_TORCH)})",
            RuntimeWarning, stacklevel=2,
        )
        return False


def _probe() -> bool:
    """Both operators on a tiny input against the public SDPA's output and gradients (raises where they differ)."""
    # its own generator: the probe runs at the first attention call, and drawing from the global RNG there would
    # shift every later random draw of the run
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 1, 4, 8, generator=generator) for _ in range(3))
    grad = torch.randn(1, 1, 4, 8, generator=generator)
    out, logsumexp = cpu_flash_attention(query, key, value)
    g_query, g_key, g_value = cpu_flash_attention_backward(grad, query, key, value, out, logsumexp)
    leaves = [t.clone().requires_grad_(True) for t in (query, key, value)]
    reference = F.scaled_dot_product_attention(*leaves, scale=1.0)
    reference.backward(grad)
    # float32 (autocast is off around the probe), where the two kernels agree to rounding
    agree = torch.allclose(out, reference.detach(), atol=1e-5) and all(
        torch.allclose(ours, leaf.grad, atol=1e-5) for ours, leaf in zip((g_query, g_key, g_value), leaves))
    if not agree:
        raise RuntimeError("results differ from F.scaled_dot_product_attention")
    return True
