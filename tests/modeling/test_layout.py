"""The contiguous-layout hooks make the chosen outputs contiguous and change no value."""

from __future__ import annotations

import copy

import torch
from transformers import SamModel

from hf_sam_peft.modeling.layout import layout_modules, set_contiguous_layout
from hf_sam_peft.modeling.sam import tiny_sam_config


def test_hooks_make_outputs_contiguous_without_changing_values_under_bf16_autocast():
    torch.manual_seed(0)
    model = SamModel(tiny_sam_config()).train()
    side = model.config.vision_config.image_size
    mask_side = model.config.prompt_encoder_config.image_embedding_size * 4
    inputs = {
        "pixel_values": torch.randn(2, 3, side, side),
        "input_points": torch.rand(2, 1, 2, 2) * side,
        "input_labels": torch.tensor([[[1, 0]]] * 2),
        "input_masks": torch.randn(2, 1, mask_side, mask_side),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(**inputs)
        patches = model.vision_encoder.patch_embed(inputs["pixel_values"])
        assert not patches.is_contiguous()  # transformers' permuted view: the channel is the slowest dimension
        set_contiguous_layout(model, enabled=True)
        set_contiguous_layout(model, enabled=True)  # idempotent
        out = model(**inputs)
        assert model.vision_encoder.patch_embed(inputs["pixel_values"]).is_contiguous()
        assert model.prompt_encoder.mask_embed(inputs["input_masks"]).is_contiguous()
    assert len(layout_modules(model)) == 3
    assert all(len(m._forward_hooks) == 1 for m in layout_modules(model))
    # A contiguous copy and a permuted view may take different kernels, and under bf16 autocast one rounding flip
    # is 2^-8 relative: the outputs agree relative to their scale, not bit for bit.
    for actual, expected in ((out.pred_masks, ref.pred_masks), (out.iou_scores, ref.iou_scores)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=2e-2 * expected.abs().max().item())


def test_disabling_removes_only_this_models_hooks():
    model = SamModel(tiny_sam_config())
    set_contiguous_layout(model, enabled=True)
    clone = copy.deepcopy(model)
    set_contiguous_layout(clone, enabled=False)
    assert not any(m._forward_hooks for m in layout_modules(clone))
    assert all(m._forward_hooks for m in layout_modules(model))
