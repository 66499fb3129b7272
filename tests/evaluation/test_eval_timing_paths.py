"""Two models evaluated in one process (``hf-sam-peft demo``: the base, then the fine-tuned PEFT model) go
through the same predictor path, in the same mode, and the first one can be warmed up.

Behaviour only, no timings: the same decoder path (the fast decoder) for a base and a PEFT model, eval mode
and no gradients inside the predictor whatever mode the model comes in, the trainer's model-side state
(``prepare_model``: the contiguous-layout hook on the decoder's upscaling) not changing the fast path's
layout or its masks, and :func:`~hf_sam_peft.evaluation.predictor.warm_up` running the evaluation's prompt
kinds on a synthetic image while leaving no image, no mode change and no change in results behind.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hf_sam_peft.evaluation import fast_decoder
from hf_sam_peft.evaluation import predictor as predictor_module
from hf_sam_peft.evaluation.interactive import evaluate_interactive
from hf_sam_peft.evaluation.predictor import SamPredictor, warm_up
from hf_sam_peft.evaluation.resized import ResizedPredictor
from hf_sam_peft.modeling.layout import set_contiguous_layout
from hf_sam_peft.sam_forward.forward import unwrap_sam


@pytest.fixture
def tiny_lite():
    from hf_sam_peft.modeling.lite_medsam import LiteSamModel, tiny_lite_sam_config

    torch.manual_seed(0)
    return LiteSamModel(tiny_lite_sam_config()).eval()


def peft_of(model: nn.Module) -> nn.Module:
    """The demo's wrapping (LoRA on the encoder, prompt encoder and decoder trained), as returned: train mode."""
    from hf_sam_peft.methods import apply_method

    torch.manual_seed(1)
    return apply_method(copy.deepcopy(model), "lora", r=4)


def blob_row(seed: int = 0, size: int = 48, n: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), dtype=np.int64)
    for i in range(1, n + 1):
        cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(4, 8)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = i
    image = (rng.random((size, size)) * 60 + (labels > 0) * 150).astype(np.uint8)
    return {"image": image, "labels": labels, "id": str(seed)}


@pytest.fixture
def decode_paths(monkeypatch):
    """Per SamPredictor decoder call: (fast decoder?, model in training mode?, gradients enabled?)."""
    calls: list[tuple[bool, bool, bool]] = []
    original = predictor_module.decode

    def spy(model, embeddings, prompts, multimask, tokens=None, *args, **kwargs):
        calls.append((tokens is not None, model.training, torch.is_grad_enabled()))
        return original(model, embeddings, prompts, multimask, tokens, *args, **kwargs)

    monkeypatch.setattr(predictor_module, "decode", spy)
    return calls


def evaluate(model_or_predictor, rows=None) -> dict:
    predictor = model_or_predictor
    if isinstance(predictor, nn.Module):
        predictor = SamPredictor(predictor, point_multimask=False)  # as the demo's _evaluate
    return evaluate_interactive(predictor, rows or [blob_row()], n_corrections=2, progress=False)


def test_base_and_peft_model_take_the_same_predictor_path(tiny_lite, decode_paths):
    peft = peft_of(tiny_lite)
    assert peft.training and not tiny_lite.training
    evaluate(tiny_lite)
    base_calls = list(decode_paths)
    decode_paths.clear()
    evaluate(peft)
    assert base_calls and len(base_calls) == len(decode_paths)
    # the fast decoder, in eval mode, without gradients: for the base and the PEFT model alike
    assert set(base_calls) == set(decode_paths) == {(True, False, False)}
    assert peft.training and not tiny_lite.training  # each model's own mode is given back


def test_encoder_runs_in_eval_mode_without_grad(tiny_lite):
    seen: list[tuple[bool, bool]] = []
    for model in (tiny_lite, peft_of(tiny_lite), peft_of(tiny_lite).train()):
        encoder = unwrap_sam(model).vision_encoder
        handle = encoder.register_forward_pre_hook(lambda module, args: seen.append((module.training, torch.is_grad_enabled())))
        try:
            SamPredictor(model).set_image(blob_row()["image"])
        finally:
            handle.remove()
    assert seen == [(False, False)] * 3


def test_trained_model_state_keeps_the_fast_path_and_its_masks(tiny_lite, decode_paths):
    from hf_sam_peft.speed import EfficiencyOptions, prepare_model

    peft = peft_of(tiny_lite)
    plain = evaluate(peft)
    # what the trainer leaves on the model it returns (the process-wide options stay off in the test process)
    prepare_model(peft, EfficiencyOptions(retain_freed_memory=False, flush_denormals=False), "cpu")
    assert fast_decoder.fast_decoder_supported(peft)
    decode_paths.clear()
    prepared = evaluate(peft)
    assert set(decode_paths) == {(True, False, False)}
    for start in ("box", "point"):
        assert prepared["rounds"][start]["iou"] == pytest.approx(plain["rounds"][start]["iou"], abs=1e-6)


def test_layout_hook_does_not_change_the_fast_mask_head(tiny_lite):
    row = blob_row()
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [10.0, 12.0, 40.0, 44.0]])
    predictor = SamPredictor(tiny_lite)
    predictor.set_image(row["image"])
    # the strides of what the decoder's activations get: the upscaled maps stay in the layout the mask head reads
    strides: list[tuple[int, ...]] = []
    activation = fast_decoder.active_module(unwrap_sam(tiny_lite).mask_decoder).activation
    handle = activation.register_forward_pre_hook(lambda module, args: strides.append(args[0].stride()))
    try:
        without = predictor.predict(boxes=boxes)
        without_strides, strides[:] = list(strides), []
        set_contiguous_layout(unwrap_sam(tiny_lite), True)  # as the trainer's prepare_model leaves the model
        with_hook = predictor.predict(boxes=boxes)
    finally:
        handle.remove()
    assert strides == without_strides
    for a, b in zip(without, with_hook):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_warm_up_runs_the_evaluation_prompts_and_leaves_no_image(tiny_lite, decode_calls):
    peft = peft_of(tiny_lite)
    predictor = SamPredictor(peft)  # point_multimask True: the lone point asks for the three masks
    assert warm_up(predictor) is predictor
    assert decode_calls == [False, True, False, False]  # box, lone point, points, points + box
    assert predictor.embeddings is None and predictor.tokens is None and predictor.frames is None
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    assert peft.training  # mode given back
    assert all(p.grad is None for p in peft.parameters())


def test_warm_up_follows_the_predictor_point_output(tiny_lite, decode_calls):
    warm_up(SamPredictor(tiny_lite, point_multimask=False), n_objects=3)
    assert decode_calls == [False, False, False, False]


def test_warm_up_does_not_change_results(tiny_lite):
    rows = [blob_row(0), blob_row(1)]
    fresh = evaluate(tiny_lite, rows)
    warmed = warm_up(SamPredictor(tiny_lite, point_multimask=False))
    again = evaluate(warmed, rows)
    assert again["rounds"] == fresh["rounds"]
    assert again["msa"] == fresh["msa"]


@pytest.mark.parametrize("n_objects", [1, 2, 16, 17])
def test_warm_up_accepts_a_model_or_a_wrapper(tiny_lite, n_objects):
    made = warm_up(tiny_lite, n_objects=n_objects)
    assert isinstance(made, SamPredictor) and made.embeddings is None
    wrapped = ResizedPredictor(SamPredictor(tiny_lite), 32)
    assert warm_up(wrapped, n_objects=n_objects) is wrapped
    assert wrapped.predictor.embeddings is None


def test_warm_up_rejects_bad_arguments(tiny_lite):
    with pytest.raises(ValueError, match="n_objects"):
        warm_up(SamPredictor(tiny_lite), n_objects=0)

    class Oracle:
        def set_image(self, image):
            pass

        def predict(self, points=None, labels=None, boxes=None, multimask=False):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="SamPredictor"):
        warm_up(Oracle())
