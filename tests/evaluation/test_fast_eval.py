"""The fast inference decoder (``hf_sam_peft.evaluation.fast_decoder``) against the plain float32 path.

On a tiny random SAM the fast path runs without autocast (its random logits are ~1e-4, below bf16's
resolution, so only the arithmetic restructuring is tested there: it must reproduce the plain path to
float32 rounding); on LiteMedSAM, when installed, with bf16 where the CPU runs it natively (the default),
against the documented tolerance (per-object mask IoU >= 0.99 on average). No timings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_sam_peft.evaluation.fast_decoder import (
    decode_objects,
    fast_decoder_supported,
    image_tokens,
)
from hf_sam_peft.evaluation.interactive import evaluate_interactive, iter_object_rounds
from hf_sam_peft.evaluation.predictor import SamPredictor
from hf_sam_peft.sam_forward.forward import decode
from hf_sam_peft.sam_forward.frames import Prompts


def tiny_model(seed: int = 0):
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import tiny_sam_config

    torch.manual_seed(seed)
    return SamModel(tiny_sam_config(hidden_size=64, num_hidden_layers=2, image_size=256)).eval()


def blob_row(seed: int, size: int = 96, n: int = 4) -> dict:
    """A synthetic image of ``n`` bright discs and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), dtype=np.int64)
    for i in range(1, n + 1):
        cy, cx, r = rng.integers(15, size - 15), rng.integers(15, size - 15), rng.integers(6, 12)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = i
    image = (rng.random((size, size)) * 60 + (labels > 0) * 150).astype(np.uint8)
    return {"image": image, "labels": labels, "id": str(seed)}


def fp32_fast(model) -> SamPredictor:
    predictor = SamPredictor(model)
    predictor.autocast_dtype = None  # the restructured arithmetic alone (see the module docstring)
    return predictor


def gt_masks(labels: np.ndarray) -> torch.Tensor:
    ids = np.unique(labels)
    ids = ids[ids != 0]
    return torch.from_numpy(labels)[None] == torch.from_numpy(ids)[:, None, None]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(-1).double()
    union = (a | b).flatten(1).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def test_fast_path_is_the_default() -> None:
    model = tiny_model()
    assert SamPredictor(model).fast and not SamPredictor(model, fast=False).fast
    assert fast_decoder_supported(model)
    with pytest.raises(TypeError, match="fast"):
        SamPredictor(model, fast="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("start", ["point", "box"])
def test_fast_matches_plain_every_round(start: str) -> None:
    """Per round, on the plain path's prompts: same low-res logits (float32 rounding) and the same masks."""
    model = tiny_model()
    row = blob_row(1)
    plain, fast = SamPredictor(model, fast=False), fp32_fast(model)
    plain.set_image(row["image"])
    fast.set_image(row["image"])
    assert fast.tokens is not None and plain.tokens is None
    rounds = 0
    for r in iter_object_rounds(plain, gt_masks(row["labels"]), start, 3, torch.Generator().manual_seed(0)):
        multimask = start == "point" and r.index == 0
        prompts = {"points": r.points, "labels": r.labels, "boxes": r.boxes}
        low_plain, iou_plain = plain._decode_low_res(multimask=multimask, **prompts)
        low_fast, iou_fast = fast._decode_low_res(multimask=multimask, **prompts)
        scale = low_plain.detach().abs().max()
        torch.testing.assert_close(low_fast, low_plain, rtol=1e-4, atol=1e-5 * float(scale))
        torch.testing.assert_close(iou_fast, iou_plain, rtol=1e-4, atol=1e-6)
        masks = fast.predict_best(multimask=multimask, **prompts)
        assert masks.shape == r.masks.shape
        assert float(mask_iou(masks, r.masks).mean()) >= 0.99
        logits, iou = fast.predict(multimask=multimask, **prompts)  # full-resolution answer, all K masks
        assert logits.shape[:2] == iou.shape and logits.shape[-2:] == row["labels"].shape
        rounds += 1
    assert rounds == 4


def test_caches_are_per_image() -> None:
    """An image's results do not depend on the image the predictor saw before (nothing leaks between images).

    (Correction points are seeded by the row index, so the second image is compared at the same index.)
    """
    model = tiny_model()
    rows = [blob_row(2), blob_row(3, size=80)]
    together = evaluate_interactive(SamPredictor(model), rows, n_corrections=2, progress=False)
    first_alone = evaluate_interactive(SamPredictor(model), rows[:1], n_corrections=2, progress=False)
    second_after_other = evaluate_interactive(SamPredictor(model), [blob_row(6), rows[1]], n_corrections=2, progress=False)
    for image, alone in ((together["images"][0], first_alone["images"][0]), (together["images"][1], second_after_other["images"][1])):
        assert image["box"] == alone["box"]
        assert image["point"] == alone["point"]
    predictor = SamPredictor(model)
    predictor.set_image(rows[0]["image"])
    first = predictor.tokens
    predictor.set_image(rows[1]["image"])
    assert predictor.tokens is not first and not torch.equal(predictor.tokens.keys, first.keys)


def test_mask_input_bypasses_the_shared_first_layer() -> None:
    """A per-object mask input (dense embedding) makes image tokens differ per object: layer 0 runs per object."""
    model = tiny_model()
    torch.manual_seed(1)
    embeddings = torch.randn(1, 32, 16, 16)
    n = 3
    points, labels = torch.rand(1, n, 2, 2) * 255, torch.tensor([[[1, 0]] * n])
    masks = torch.randn(1, n, 1, 64, 64)
    with torch.no_grad():
        low, iou = decode(model, embeddings, Prompts(points, labels), False, mask_inputs=masks, use_mask=torch.tensor([True]))
        dense = model.prompt_encoder.mask_embed(masks[0])
        tokens = image_tokens(model, embeddings)
        low_fast, iou_fast = decode_objects(model, tokens, points[0][:, None], labels[0][:, None], None, False, dense=dense)
        low_cached, _ = decode_objects(model, tokens, points[0][:, None], labels[0][:, None], None, False)
    torch.testing.assert_close(low_fast, low[0], rtol=1e-4, atol=1e-5 * float(low.abs().max()))
    torch.testing.assert_close(iou_fast, iou[0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(low_cached, low_fast)  # the mask input did change the answer


def test_wrapped_decoder_projection_falls_back_to_the_forward() -> None:
    """An adapter wrapping a decoder attention projection is decoded through the model's own forward."""
    from torch import nn

    class Wrapped(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.base = linear

        def forward(self, x):
            return self.base(x) * 1.5

    model = tiny_model()
    layer = model.mask_decoder.transformer.layers[1].cross_attn_token_to_image
    layer.k_proj = Wrapped(layer.k_proj)
    assert not fast_decoder_supported(model)
    row = blob_row(4)
    fast, plain = fp32_fast(model), SamPredictor(model, fast=False)
    fast.set_image(row["image"])
    plain.set_image(row["image"])
    assert fast.tokens is None
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
    torch.testing.assert_close(fast.predict(boxes=boxes)[0], plain.predict(boxes=boxes)[0])


def test_modules_to_save_decoder_copy_is_used() -> None:
    """With peft's trainable copy of the mask decoder (``modules_to_save``) the fast path runs that copy."""
    import hf_sam_peft

    model = hf_sam_peft.apply_method(tiny_model(), "freeze_encoder")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name and "mask_decoder" in name:
                param.add_(0.05 * torch.randn_like(param))
    assert fast_decoder_supported(model)
    row = blob_row(5)
    fast, plain = fp32_fast(model), SamPredictor(model, fast=False)
    fast.set_image(row["image"])
    plain.set_image(row["image"])
    assert fast.tokens is not None
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [30.0, 20.0, 90.0, 70.0]])
    low_fast, _ = fast._decode_low_res(None, None, boxes, False)
    low_plain, _ = plain._decode_low_res(None, None, boxes, False)
    torch.testing.assert_close(low_fast, low_plain, rtol=1e-4, atol=1e-5 * float(low_plain.abs().max()))


def _lite_medsam_and_tile():
    try:
        from hf_sam_peft.demo import stardist_nuclei, stardist_splits
        from hf_sam_peft.modeling.base_models import load_base_model

        model = load_base_model("lite_medsam")[0].eval()
        row = stardist_splits(*stardist_nuclei())["test"][0]
    except Exception as err:  # the medsam-lite / stardist wheels are optional extras
        pytest.skip(f"LiteMedSAM or the demo tile is not available: {str(err).splitlines()[0][:100]}")
    return model, row


def test_lite_medsam_fast_masks_agree_within_tolerance() -> None:
    """LiteMedSAM on the demo tile (6 objects, box and point start, 2 corrections), default fast path
    (float32): per-object IoU with the plain float32 masks >= 0.99 on average, per round."""
    model, row = _lite_medsam_and_tile()
    plain, fast = SamPredictor(model, point_multimask=False, fast=False), SamPredictor(model, point_multimask=False)
    plain.set_image(row["image"])
    fast.set_image(row["image"])
    gt = gt_masks(row["labels"])[:6]
    for start in ("box", "point"):
        for r in iter_object_rounds(plain, gt, start, 2, torch.Generator().manual_seed(0)):
            prompts = {"points": r.points, "labels": r.labels, "boxes": r.boxes}
            masks = fast.predict_best(multimask=start == "point" and r.index == 0, **prompts)
            assert float(mask_iou(masks, r.masks).mean()) >= 0.99, (start, r.index)


def test_objects_in_groups_get_what_they_get_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouping objects per decoder pass (``objects_per_pass``) does not change any object's answer."""
    import hf_sam_peft.evaluation.fast_decoder as fast_decoder

    # SAM's 64 x 64 grid with 32 upscaled channels: 8 MiB per object, two objects per pass
    assert fast_decoder.objects_per_pass((64, 64), 32) == 2
    assert fast_decoder.objects_per_pass((128, 128), 32) == 1
    model = tiny_model()
    torch.manual_seed(2)
    embeddings = torch.randn(1, 32, 16, 16)
    n = 5
    points, labels = torch.rand(n, 1, 3, 2) * 255, torch.tensor([[[1, 0, 1]]] * n)
    tokens = image_tokens(model, embeddings)
    together = decode_objects(model, tokens, points, labels, None, True)
    assert fast_decoder.objects_per_pass(tokens.size, 32) >= n  # the tiny grid fits all in one pass
    monkeypatch.setattr(fast_decoder, "_GROUP_BYTES", 1)  # one object per pass
    alone = decode_objects(model, tokens, points, labels, None, True)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
