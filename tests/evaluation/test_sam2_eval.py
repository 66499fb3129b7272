"""Evaluation with a tiny SAM 2 (``Sam2Model``): SamPredictor against SAM 2's own pipeline written out by hand,
the interactive protocol (point, box, I_P, I_B) with mSA, and AIS with a UNETR head on real nuclei."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Sam2Model

from hf_sam_peft.evaluation.ais import evaluate_ais, predict_ais_maps, tiling_for
from hf_sam_peft.evaluation.fast_decoder import fast_decoder_supported
from hf_sam_peft.evaluation.interactive import evaluate_interactive
from hf_sam_peft.evaluation.predictor import SamPredictor, image_size_of
from hf_sam_peft.modeling.sam2 import tiny_sam2_config
from hf_sam_peft.sam_forward import sam2_preprocess
from tests.conftest import shared_dataset
from tests.evaluation.test_interactive_eval import DSB, small_rows

FEATURES = (32, 16, 8, 8)  # a small UNETR: the architecture of the paper, fewer channels


@pytest.fixture
def tiny_sam2() -> Sam2Model:
    torch.manual_seed(0)
    return Sam2Model(tiny_sam2_config()).eval()


def test_predictor_is_sam2s_pipeline(tiny_sam2):
    """Square resize, per-axis prompt mapping, token-0 single mask / three masks, one resize back."""
    row = small_rows(1, size=120)[0]
    image = row["image"][:, :90]  # non-square: 120 x 90
    height, width = image.shape[:2]
    assert not fast_decoder_supported(tiny_sam2) and image_size_of(tiny_sam2) == 256
    predictor = SamPredictor(tiny_sam2)
    predictor.set_image(image)
    assert predictor.tokens is None  # SAM 2 decodes through the model's forward
    points = torch.tensor([[[30.0, 40.0]], [[60.0, 100.0]]])
    labels = torch.ones(2, 1, dtype=torch.long)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0], [40.0, 60.0, 90.0, 120.0]])
    logits, iou = predictor.predict(points, labels, multimask=True)
    box_logits, box_iou = predictor.predict(boxes=boxes)
    assert logits.shape == (2, 3, height, width) and iou.shape == (2, 3) and box_logits.shape == (2, 1, height, width)

    scale = torch.tensor([256 / width, 256 / height])
    with torch.no_grad():
        embeddings = tiny_sam2.get_image_embeddings(sam2_preprocess(image, 256)[0][None])
        out = tiny_sam2(image_embeddings=embeddings, input_points=(points * scale)[None], input_labels=labels[None])
        tiny_sam2.train()  # the single-mask token 0 (see hf_sam_peft.sam_forward.forward)
        box_out = tiny_sam2(image_embeddings=embeddings, input_boxes=(boxes * scale.repeat(2))[None],
                            multimask_output=False)
        tiny_sam2.eval()
    expected = F.interpolate(out.pred_masks[0], (height, width), mode="bilinear", align_corners=False)
    expected_box = F.interpolate(box_out.pred_masks[0], (height, width), mode="bilinear", align_corners=False)
    scale_of = expected.abs().max().item()
    assert torch.allclose(logits, expected, atol=1e-4 * scale_of) and torch.allclose(iou, out.iou_scores[0], atol=1e-5)
    assert torch.allclose(box_logits, expected_box, atol=1e-4 * expected_box.abs().max().item())
    assert torch.allclose(box_iou, box_out.iou_scores[0], atol=1e-5)
    best = predictor.predict_best(points, labels, multimask=True)
    assert torch.equal(best, logits[torch.arange(2), iou.argmax(-1)] > 0)
    plain = SamPredictor(tiny_sam2, fast=False)
    plain.set_image(image)
    assert torch.equal(plain.predict(points, labels, multimask=True)[0], logits)


def test_interactive_protocol_point_box_ip_ib(tiny_sam2):
    rows = small_rows()
    result = evaluate_interactive(tiny_sam2, rows, seed=3, batch_size=4, progress=False)
    for metric in ("msa", "dice", "iou"):
        assert set(result[metric]) == {"point", "box", "ip", "ib"}
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in result[metric].values())
        for start in ("point", "box"):
            assert len(result["rounds"][start][metric]) == 8
    assert result["n_images"] == 2 and result["n_objects"] == sum(int(r["labels"].max()) for r in rows)
    assert result["rounds"]["point"]["msa"][7] == result["msa"]["ip"]
    assert result["rounds"]["box"]["msa"][0] == result["msa"]["box"]
    again = evaluate_interactive(tiny_sam2, rows, seed=3, batch_size=2, progress=False, starts=("box",))
    assert again["rounds"]["box"]["msa"][0] == result["rounds"]["box"]["msa"][0]  # round 0 has no random draws


def _train_ais(model: torch.nn.Module, rows: list[dict], steps: int) -> list[float]:
    """A plain torch loop on the distance loss through SAM 2's stride-16 map (the joint Trainer is tested in
    tests/training/test_sam2_training.py)."""
    from hf_sam_peft.modeling.unetr import predict_distances
    from hf_sam_peft.training.ais import ais_loss, batch_distance_targets
    from hf_sam_peft.training.collate import SamInteractiveCollator

    batch = SamInteractiveCollator.from_model(model)(rows)
    targets = batch_distance_targets(batch["labels"], min_size=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        maps = torch.cat([
            predict_distances(model, batch["pixel_values"][b : b + 1], batch["reshaped_input_sizes"][b].tolist(),
                              batch["original_sizes"][b].tolist())
            for b in range(len(rows))
        ])
        loss = ais_loss(maps, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_ais_training_and_evaluation(tiny_sam2):
    from hf_sam_peft.data import iter_rows
    from hf_sam_peft.modeling.unetr import attach_unetr

    attach_unetr(tiny_sam2, features=FEATURES)
    train_rows = list(iter_rows(shared_dataset(DSB), "train", min_size=0, max_images=2))
    train_rows = [{"image": r["image"][:200, :256], "labels": r["labels"][:200, :256]} for r in train_rows]
    losses = _train_ais(tiny_sam2, train_rows, steps=8)
    assert losses[-1] < losses[0]
    model = tiny_sam2.eval()
    rows = small_rows()
    grid = {"center_distance_thresholds": [0.5], "boundary_distance_thresholds": [0.5],
            "distance_smoothings": [1.6], "min_sizes": [5]}
    ais = evaluate_ais(model, rows, val_rows=rows[:1], grid=grid, progress=False)
    assert ais["n_images"] == 2 and all(0.0 <= ais[k] <= 1.0 for k in ("msa", "sa50", "sa75"))
    # larger than the 256² input: tiled; the maps come back at the image's size
    image = np.random.default_rng(0).integers(0, 255, (300, 200), dtype=np.uint8)
    assert tiling_for(model, image.shape) is not None
    maps = predict_ais_maps(model, image)
    assert maps.shape == (3, 300, 200) and 0.0 <= maps.min() and maps.max() <= 1.0
