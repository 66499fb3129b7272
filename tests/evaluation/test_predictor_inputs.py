"""SamPredictor checks prompts where they enter: every bad prompt is a one-line ValueError naming the argument
and what was expected (issue 15; rows in tests/BAD_INPUTS.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_sam_peft.evaluation.predictor import SamPredictor, check_prompts

H, W = 24, 40
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def predictor(tiny_sam):
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    return predictor


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message and message
    return message


GOOD_POINTS, GOOD_LABELS = torch.tensor([[[5.0, 6.0]]]), torch.tensor([[1]])

BAD_PROMPTS = [
    # points outside the image: x in [0, W), y in [0, H)
    (dict(points=[[[W, 3.0]]], labels=[[1]]), r"points\[0, 0\] = \(x, y\) \(40.0, 3.0\) lies outside the 40 x 24 image"),
    (dict(points=[[[3.0, H]]], labels=[[1]]), "lies outside the 40 x 24 image"),
    (dict(points=[[[-0.5, 3.0]]], labels=[[1]]), "expected 0 <= x < 40, 0 <= y < 24"),
    (dict(points=[[[1.0, 1.0], [2.0, -1.0]]], labels=[[1, 0]]), r"points\[0, 1\]"),
    # non-finite points
    (dict(points=[[[NAN, 3.0]]], labels=[[1]]), r"points\[0, 0\] = \[nan, 3.0\] is not finite"),
    (dict(points=[[[3.0, INF]]], labels=[[1]]), "is not finite"),
    # labels other than 0 / 1
    (dict(points=[[[3.0, 3.0]]], labels=[[2]]), r"labels\[0, 0\] = 2: point labels must be 1 \(positive\) or 0 \(negative\)"),
    (dict(points=[[[3.0, 3.0], [4.0, 4.0]]], labels=[[1, -1]]), r"labels\[0, 1\] = -1"),
    (dict(points=[[[3.0, 3.0]]], labels=[[0.5]]), "labels"),
    # wrong shapes
    (dict(points=[[3.0, 3.0]], labels=[[1]]), r"points must be \(N, P, 2\) and labels \(N, P\), got \(1, 2\)"),
    (dict(points=[[[3.0, 3.0, 1.0]]], labels=[[1]]), r"points must be \(N, P, 2\)"),
    (dict(points=[[[3.0, 3.0]]], labels=[1]), r"labels \(N, P\), got \(1, 1, 2\) and \(1,\)"),
    (dict(points=torch.zeros(1, 0, 2), labels=torch.zeros(1, 0)), "at least one point per object"),
    (dict(points=[[["a", "b"]]], labels=[[1]]), "points must be a tensor or array of numbers"),
    (dict(points=[[[3.0, 3.0]]], labels=None), "points and labels must be given together"),
    (dict(), "predict needs points"),
    # boxes: inverted / empty, non-finite, outside the image, wrong shapes
    (dict(boxes=[[10.0, 5.0, 4.0, 9.0]]), r"boxes\[0\] = \(10.0, 5.0, 4.0, 9.0\) is empty or inverted"),
    (dict(boxes=[[1.0, 5.0, 4.0, 5.0]]), r"x0 < x1 and y0 < y1"),
    (dict(boxes=[[1.0, 1.0, 4.0, 4.0], [2.0, 2.0, 2.0, 9.0]]), r"boxes\[1\]"),
    (dict(boxes=[[1.0, NAN, 4.0, 9.0]]), r"boxes\[0\] = \[1.0, nan, 4.0, 9.0\] is not finite"),
    (dict(boxes=[[1.0, 1.0, INF, 9.0]]), "is not finite"),
    (dict(boxes=[[1.0, 1.0, W + 1.0, 9.0]]), r"reaches outside the 40 x 24 image \(expected 0 <= x0 < x1 <= 40"),
    (dict(boxes=[[-2.0, 1.0, 5.0, 9.0]]), "reaches outside"),
    (dict(boxes=[1.0, 1.0, 5.0, 9.0]), r"boxes must be \(N, 4\)"),
    (dict(points=[[[3.0, 3.0]], [[4.0, 4.0]]], labels=[[1], [1]], boxes=[[1.0, 1.0, 5.0, 9.0]]), "N matching the points"),
]


@pytest.mark.parametrize("prompts, match", BAD_PROMPTS)
def test_bad_prompts_are_one_line_value_errors(predictor, prompts, match):
    with pytest.raises(ValueError, match=match) as info:
        predictor.predict(**prompts)
    one_line(info)


def test_prompts_on_the_edge_of_the_image_are_fine(predictor):
    """The last pixel's point and a box with exclusive maxima W, H (boxes_from_masks' convention) pass."""
    points = torch.tensor([[[W - 1.0, H - 1.0], [0.0, 0.0]]])
    logits, iou = predictor.predict(points, torch.tensor([[1, 0]]), torch.tensor([[0.0, 0.0, W, H]]))
    assert logits.shape == (1, 1, H, W) and iou.shape == (1, 1)
    logits, _ = predictor.predict(np.array([[[2.5, 3.5]]]), np.array([[True]]), multimask=True)
    assert logits.shape == (1, 3, H, W)
    # check_prompts is the one place: usable without a model too
    points, labels, boxes = check_prompts([[[1, 2]]], [[0]], [[0, 0, 1, 1]], (H, W))
    assert points.shape == (1, 1, 2) and labels.shape == (1, 1) and boxes.shape == (1, 4)


@pytest.mark.parametrize(
    "image, error, match",
    [
        (np.zeros((0, 0, 3), np.uint8), ValueError, r"at least one pixel \(H, W >= 1\), got shape \(0, 0, 3\)"),
        (np.zeros((0, 16), np.uint8), ValueError, "at least one pixel"),
        (np.zeros((16, 0), np.float32), ValueError, "at least one pixel"),
        (np.zeros((16,), np.uint8), ValueError, r"\(H, W\) or \(H, W, 1\|3\)"),
        (np.zeros((8, 8, 4), np.uint8), ValueError, r"\(H, W\) or \(H, W, 1\|3\)"),
        (np.full((8, 8), np.nan, np.float32), ValueError, "image holds NaN or inf values"),
        (np.array([[1.0, np.inf], [0.0, 0.0]]), ValueError, "image holds NaN or inf values"),
        (np.array([["a", "b"]]), TypeError, "real numbers"),
    ],
)
def test_bad_images_in_set_image(tiny_sam, image, error, match):
    predictor = SamPredictor(tiny_sam)
    with pytest.raises(error, match=match) as info:
        predictor.set_image(image)
    one_line(info)
    assert predictor.embeddings is None  # nothing half-set


def test_predict_before_set_image(tiny_sam):
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(tiny_sam).predict(GOOD_POINTS, GOOD_LABELS)
