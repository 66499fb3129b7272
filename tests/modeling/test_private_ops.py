"""torch's private CPU flash operators: probed once against the public SDPA; where they do not work as called,
SAM's fused encoder attention takes the public path with the same outputs and gradients, and says so once."""

from __future__ import annotations

import pytest
import torch

from hf_sam_peft.modeling import attention, private_ops
from tests.modeling.test_attention import pair, run


def test_the_probe_accepts_this_torch():
    private_ops.cpu_flash_attention_available.cache_clear()
    assert private_ops.cpu_flash_attention_available()  # torch 2.13.0 is among CHECKED_TORCH


def test_a_changed_operator_falls_back_to_the_public_path_with_the_same_result(monkeypatch):
    eager, fused = pair(0)
    x = torch.randn(2, 8, 8, 48, dtype=torch.float64)
    lean_out, lean_grads = run(fused, x)

    def changed_schema(*args, **kwargs):  # e.g. a torch release that renames or reorders an argument
        raise TypeError("_scaled_dot_product_flash_attention_for_cpu() got an unexpected keyword argument 'scale'")

    monkeypatch.setattr(private_ops, "cpu_flash_attention", changed_schema)
    private_ops.cpu_flash_attention_available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="falls back to the public scaled_dot_product_attention"):
            assert not private_ops.cpu_flash_attention_available()
        monkeypatch.setattr(attention, "cpu_flash_attention", changed_schema)  # never called on the fallback
        out, grads = run(fused, x)
    finally:
        private_ops.cpu_flash_attention_available.cache_clear()
    assert torch.allclose(out, lean_out, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, lean_grads))


def test_a_wrong_result_is_refused_too(monkeypatch):
    real = private_ops.cpu_flash_attention
    monkeypatch.setattr(private_ops, "cpu_flash_attention", lambda q, k, v: (lambda o, l: (o * 2, l))(*real(q, k, v)))
    private_ops.cpu_flash_attention_available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="results differ"):
            assert not private_ops.cpu_flash_attention_available()
    finally:
        private_ops.cpu_flash_attention_available.cache_clear()


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "bf16 autocast"])
def test_the_probe_holds_wherever_the_first_attention_call_runs(context):
    """Evaluation's first encoder call runs under no_grad / inference_mode, training's under autocast: the probe
    builds its own graph in float32 there."""
    wrapper = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    private_ops.cpu_flash_attention_available.cache_clear()
    try:
        with wrapper():
            assert private_ops.cpu_flash_attention_available()
    finally:
        private_ops.cpu_flash_attention_available.cache_clear()


def test_a_first_call_inside_activation_checkpointing_recomputes_alike():
    """The probe's own graph stays out of checkpointing's saved-tensor hooks: without that the forward saved 26
    tensors and the recomputation (probe cached) 21, and backward failed (seen on an AVX2 run of the trainer)."""
    from torch.utils.checkpoint import checkpoint

    eager, fused = pair(0)
    x = torch.randn(2, 8, 8, 48, dtype=torch.float64, requires_grad=True)
    private_ops.cpu_flash_attention_available.cache_clear()
    try:
        out = checkpoint(lambda t: fused(t)[0], x, use_reentrant=False)
        out.sum().backward()
    finally:
        private_ops.cpu_flash_attention_available.cache_clear()
    reference = x.detach().clone().requires_grad_(True)
    fused(reference)[0].sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-10)
