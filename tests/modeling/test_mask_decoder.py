"""Our decoder paths compute transformers' mask decoder: the fused two-way transformer (training; outputs and
gradients) and evaluation's cached, folded path (hf_sam_peft.evaluation.fast_decoder), each against
transformers' own ``SamModel`` forward; the override list, the version check and the fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import SamModel
from transformers.models.sam.modeling_sam import SamTwoWayTransformer

from hf_sam_peft.evaluation.fast_decoder import decode_objects, fast_decoder_supported, image_tokens
from hf_sam_peft.modeling import mask_decoder
from hf_sam_peft.modeling.layout import contiguous_output
from hf_sam_peft.modeling.mask_decoder import (
    OVERRIDES,
    SamFusedTwoWayTransformer,
    channels_last_call,
    overrides_apply,
    set_decoder_projections,
    shared_position_shifts,
    token_layout,
    transformers_checked,
)
from hf_sam_peft.modeling.sam import tiny_sam_config


def tiny_sam(dtype=torch.float64) -> SamModel:
    torch.manual_seed(0)
    model = SamModel(tiny_sam_config()).to(dtype).train()
    for module in model.mask_decoder.transformer.modules():  # biases matter for the linearity argument
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.bias, std=0.1)
    return model


def prompts(model: SamModel, dtype=torch.float64, objects: int = 3) -> dict:
    side = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(1)
    size = model.config.prompt_encoder_config.image_embedding_size * 4
    return {
        "image_embeddings": torch.randn(objects, model.config.vision_config.output_channels, size // 4, size // 4,
                                        generator=gen, dtype=dtype),
        "input_points": torch.rand(objects, 1, 2, 2, generator=gen, dtype=dtype) * side,
        "input_labels": torch.tensor([[[1, 0]]] * objects),
        "input_masks": torch.randn(objects, 1, size, size, generator=gen, dtype=dtype),
        "multimask_output": True,
    }


def _assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], shared_scale: bool = False) -> None:
    """Equal up to float32 rounding. One fused projection and three separate ones are different matrix products
    (blocking, kernels), so bit equality is not guaranteed; the tolerance is relative to each output's max |x|,
    and for gradients to the largest gradient (some, e.g. key biases, are exactly 0 in exact arithmetic)."""
    assert len(got) == len(expected)
    common = max(e.abs().max().item() for e in expected)
    for actual, reference in zip(got, expected):
        scale = common if shared_scale else reference.abs().max().item()
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6 * scale)


def outputs_and_grads(model: SamModel, inputs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    emb = inputs["image_embeddings"].clone().requires_grad_(True)
    out = model(**{**inputs, "image_embeddings": emb})
    weights = torch.linspace(-1, 1, out.pred_masks.numel(), dtype=out.pred_masks.dtype)
    loss = (out.pred_masks.flatten() * weights).sum() + out.iou_scores.square().sum()
    params = [p for p in model.mask_decoder.parameters() if p.requires_grad]
    basis = model.shared_image_embedding.positional_embedding  # a parameter in transformers, trainable in tiny_sam
    params += [basis] if basis.requires_grad else []
    return [out.pred_masks.detach(), out.iou_scores.detach()], list(torch.autograd.grad(loss, [emb, *params]))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_fused_transformer_matches_transformers_outputs_and_gradients(attention):
    model = tiny_sam()
    model.mask_decoder.config._attn_implementation = attention
    inputs = prompts(model)
    ref_out, ref_grads = outputs_and_grads(model, inputs)
    assert set_decoder_projections(model, fused=True)
    assert type(model.mask_decoder.transformer) is SamFusedTwoWayTransformer
    out, grads = outputs_and_grads(model, inputs)
    _assert_close(out, ref_out)
    _assert_close(grads, ref_grads, shared_scale=True)
    assert max(g.abs().max() for g in grads) > 0


def test_switch_is_reversible_and_keeps_the_state_dict():
    model = tiny_sam()
    keys = list(model.state_dict())
    assert set_decoder_projections(model, fused=True)
    assert not set_decoder_projections(model, fused=True)  # already switched
    assert list(model.state_dict()) == keys
    assert set_decoder_projections(model, fused=False)
    assert type(model.mask_decoder.transformer) is SamTwoWayTransformer


def test_wrapped_projection_falls_back_to_transformers_forward():
    from peft import LoraConfig, get_peft_model

    model = tiny_sam()
    config = LoraConfig(r=2, target_modules=r".*transformer\.layers\.0\.cross_attn_token_to_image\.k_proj", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    inputs = prompts(model)
    ref_out, _ = outputs_and_grads(peft_model, inputs)
    set_decoder_projections(model, fused=True)
    out, _ = outputs_and_grads(peft_model, inputs)  # the adapter's contribution is kept
    _assert_close(out, ref_out)


def test_shared_position_shifts_give_the_per_call_outputs_and_gradients():
    model = tiny_sam()
    inputs = prompts(model)
    set_decoder_projections(model, fused=True)
    ref_out, ref_grads = outputs_and_grads(model, inputs)
    with shared_position_shifts(model) as shared:
        assert shared is not None
        used = []
        matches = shared.matches
        shared.matches = lambda positions: used.append(matches(positions)) or used[-1]
        out, grads = outputs_and_grads(model, inputs)
        assert used == [True]  # the model's own positions: the shared projections were used
        assert all(t.shape[0] == 1 for t in shared.shifts.tensors())  # one image, broadcast over objects
    assert not hasattr(model.mask_decoder.transformer, "_shared_positions")
    _assert_close(out, ref_out)
    _assert_close(grads, ref_grads, shared_scale=True)


def test_shared_position_shifts_fall_back_for_other_positions_and_unfused_decoders():
    model = tiny_sam()
    with shared_position_shifts(model) as shared:  # transformers' own transformer: nothing to share
        assert shared is None
    set_decoder_projections(model, fused=True)
    transformer = model.mask_decoder.transformer
    inputs = prompts(model, objects=2)
    tokens = torch.randn(2, 1, 5, transformer.config.hidden_size, dtype=torch.float64)
    positions = model.get_image_wide_positional_embeddings().repeat(2, 1, 1, 1)
    other = positions + 0.5
    with torch.no_grad():
        reference = transformer(tokens, inputs["image_embeddings"], other, None)
        with shared_position_shifts(model) as shared:
            assert shared.matches(token_layout(positions)) and not shared.matches(token_layout(other))
            got = transformer(tokens, inputs["image_embeddings"], other, None)
    _assert_close(list(got), list(reference))
    with pytest.raises(RuntimeError, match="boom"), shared_position_shifts(model):
        raise RuntimeError("boom")
    assert not hasattr(transformer, "_shared_positions")


def test_detached_shifts_carry_the_gradient_into_the_projection_weights():
    model = tiny_sam()
    set_decoder_projections(model, fused=True)
    inputs = prompts(model)
    _, ref_grads = outputs_and_grads(model, inputs)
    params = [p for p in model.mask_decoder.parameters() if p.requires_grad]
    params.append(model.shared_image_embedding.positional_embedding)
    with shared_position_shifts(model, detach=True) as shared:
        leaves, graph = shared.leaves(), shared.graph.tensors()
        assert all(leaf.grad_fn is None and leaf.requires_grad for leaf in leaves)
        emb = inputs["image_embeddings"].clone().requires_grad_(True)
        out = model(**{**inputs, "image_embeddings": emb})
        weights = torch.linspace(-1, 1, out.pred_masks.numel(), dtype=out.pred_masks.dtype)
        loss = (out.pred_masks.flatten() * weights).sum() + out.iou_scores.square().sum()
        grads = torch.autograd.grad(loss, [emb, *params, *leaves], allow_unused=True)
    emb_grad, param_grads, leaf_grads = grads[0], grads[1:1 + len(params)], grads[1 + len(params):]
    # the shifts' gradients sent through their graph once complete the projection weights' gradients
    via_shifts = torch.autograd.grad(graph, params, leaf_grads, allow_unused=True)
    total = [(g if g is not None else torch.zeros_like(p)) + (v if v is not None else 0)
             for p, g, v in zip(params, param_grads, via_shifts)]
    _assert_close([emb_grad, *total], ref_grads, shared_scale=True)


def sharp_tiny_sam() -> SamModel:
    """:func:`tiny_sam` in float32, eval mode, with unit-gain decoder projections (std ``1/sqrt(fan_in)``) so
    that the attentions are far from uniform: with the random init (std 0.02) softmax rows are near-constant
    and a 0.1% error in the fused keys moved the masks by 5e-7 of their scale (below rounding); with this
    init rounding gives 1e-6 and that error 4e-4 (measured), against the test's 1e-5."""
    model = tiny_sam(torch.float32).eval()
    torch.manual_seed(4)
    for module in model.mask_decoder.transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1 / module.in_features**0.5)
    return model


def reference_and_prompts(model: SamModel, multimask: bool, mask_input: bool, objects: int = 3):
    """transformers' own forward (``SamModel`` -> ``SamMaskDecoder``) for ``objects`` objects of one image with
    points and a box each (and a mask input each when ``mask_input``): ``(masks (N, K, h', w'), iou (N, K))``
    and the inputs."""
    gen = torch.Generator().manual_seed(3)
    side = model.config.vision_config.image_size
    grid = model.config.prompt_encoder_config.image_embedding_size
    channels = model.config.vision_config.output_channels
    embedding = torch.randn(1, channels, grid, grid, generator=gen)
    points = torch.rand(objects, 1, 3, 2, generator=gen) * side
    labels = torch.tensor([[[1, 0, 1]]] * objects)
    corner = torch.rand(objects, 1, 2, generator=gen) * side / 2
    boxes = torch.cat([corner, corner + side / 3], dim=-1)  # (N, 1, 4)
    masks = torch.randn(objects, 1, 4 * grid, 4 * grid, generator=gen) if mask_input else None
    inputs = {"image_embeddings": embedding.expand(objects, -1, -1, -1), "input_points": points,
              "input_labels": labels, "input_boxes": boxes, "input_masks": masks, "multimask_output": multimask}
    with torch.no_grad():
        out = model(**inputs)
    return (out.pred_masks[:, 0], out.iou_scores[:, 0]), inputs


def _assert_float32_close(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    """Equal to float32 rounding: another order of the same arithmetic; tolerance relative to each output's max |x|."""
    for actual, reference in zip(got, expected):
        assert actual.shape == reference.shape
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("mask_input", [False, True], ids=["no_mask", "mask_input"])
@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
@pytest.mark.parametrize("path", ["fused", "cached"])
def test_decoder_paths_match_transformers_forward(path, multimask, mask_input):
    """Training's fused path (inside ``shared_position_shifts``, as a training step) and evaluation's cached path
    (``image_tokens`` + ``decode_objects``; the mask input as its dense embedding) give transformers' masks
    and IoU predictions, points + boxes, with and without mask inputs, single- and multimask, float32."""
    model = sharp_tiny_sam()
    expected, inputs = reference_and_prompts(model, multimask, mask_input)
    with torch.no_grad():
        if path == "fused":
            assert set_decoder_projections(model, fused=True)
            with shared_position_shifts(model) as shared:
                assert shared is not None
                out = model(**inputs)
            got = (out.pred_masks[:, 0], out.iou_scores[:, 0])
        else:
            assert fast_decoder_supported(model)
            tokens = image_tokens(model, inputs["image_embeddings"][:1])
            dense = None if inputs["input_masks"] is None else model.prompt_encoder.mask_embed(inputs["input_masks"])
            got = decode_objects(model, tokens, inputs["input_points"], inputs["input_labels"], inputs["input_boxes"],
                                 multimask, dense=dense)
    assert expected[0].shape[1] == (3 if multimask else 1) and expected[0].abs().max() > 0
    _assert_float32_close(got, expected)


def test_every_listed_override_exists_and_is_public():
    assert len({o.name for o in OVERRIDES}) == len(OVERRIDES)
    for override in OVERRIDES:
        assert override.name in mask_decoder.__all__ and hasattr(mask_decoder, override.name), override.name
        assert override.replaces and override.reason


def test_transformers_version_check_warns_once_on_an_unchecked_release(monkeypatch):
    import transformers

    transformers_checked.cache_clear()
    try:
        monkeypatch.setattr(transformers, "__version__", mask_decoder.CHECKED_TRANSFORMERS[0])
        assert transformers_checked()
        transformers_checked.cache_clear()
        monkeypatch.setattr(transformers, "__version__", "4.40.0")
        with pytest.warns(RuntimeWarning, match=r"transformers 4\.40\.0.*checked against"):
            assert not transformers_checked()
        assert not transformers_checked()  # cached: one warning per process
    finally:
        transformers_checked.cache_clear()


def test_missing_transformers_internals_fall_back_to_transformers_forward(monkeypatch):
    """An attribute the overrides read that a transformers release no longer has: both paths step aside."""
    model = tiny_sam(torch.float32).eval()
    expected, inputs = reference_and_prompts(model, multimask=True, mask_input=False)
    set_decoder_projections(model, fused=True)
    assert overrides_apply(model.mask_decoder.transformer) and fast_decoder_supported(model)
    monkeypatch.setattr(mask_decoder, "_ATTENTION_ATTRS", (*mask_decoder._ATTENTION_ATTRS, "renamed_in_a_release"))
    assert not overrides_apply(model.mask_decoder.transformer) and not fast_decoder_supported(model)
    with torch.no_grad(), shared_position_shifts(model) as shared:
        assert shared is None
        out = model(**inputs)
    torch.testing.assert_close(out.pred_masks[:, 0], expected[0], rtol=0, atol=0)  # transformers' own forward


def test_channels_last_call_skips_only_the_layout_hook():
    conv = nn.ConvTranspose2d(4, 3, kernel_size=2, stride=2)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    plain = conv(x)
    conv.register_forward_hook(contiguous_output)
    assert conv(x).is_contiguous()  # the hook, as training uses it
    skipped = channels_last_call(conv, x)
    assert skipped.stride() == plain.stride()  # the convolution's own layout, no copy
    torch.testing.assert_close(skipped, plain, rtol=0, atol=0)
    seen = []
    conv.register_forward_hook(lambda module, args, output: seen.append(True))
    channels_last_call(conv, x)  # any other hook: the module runs with all its hooks
    assert seen == [True]
