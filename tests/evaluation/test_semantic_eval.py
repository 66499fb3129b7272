"""Semantic class maps: prompted object by object, scored by Dice per class, averaged per image then over images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_sam_peft.evaluation.interactive import SCORING, class_dice, evaluate_interactive, format_per_class


class ShiftedOracle:
    """Answers a box with the ground-truth object under its centre, shifted right by ``shift[object]`` pixels."""

    def __init__(self, instances: list[np.ndarray], shift: dict[tuple[int, int], int]) -> None:
        self.instances, self.shift, self.index = instances, shift, -1

    def set_image(self, image):
        self.index += 1

    def predict(self, points=None, labels=None, boxes=None, multimask=False):
        instances = torch.from_numpy(self.instances[self.index])
        out = torch.full((boxes.shape[0], 1, *instances.shape), -1.0)
        for i, box in enumerate(boxes):
            x, y = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            object_id = int(instances[y, x])
            mask = instances == object_id
            mask = torch.roll(mask, self.shift.get((self.index, object_id), 0), dims=1)
            out[i, 0][mask] = 1.0
        return out, torch.ones(boxes.shape[0], 1)


def _rows():
    # image 0: class 1 = two blobs (two objects), class 2 = one 4x4 square; image 1: class 1 only
    sem0 = np.zeros((20, 20), dtype=np.int32)
    sem0[2:6, 2:6] = 1
    sem0[2:6, 12:16] = 1
    sem0[12:16, 4:8] = 2
    inst0 = np.zeros_like(sem0)
    inst0[2:6, 2:6], inst0[2:6, 12:16], inst0[12:16, 4:8] = 1, 2, 3
    sem1 = np.zeros((20, 20), dtype=np.int32)
    sem1[8:12, 8:12] = 1
    inst1 = (sem1 > 0).astype(np.int32)
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    return [
        {"image": image, "labels": inst0, "semantic": sem0, "id": "a"},
        {"image": image, "labels": inst1, "semantic": sem1, "id": "b"},
    ], [inst0, inst1]


def test_per_class_dice_matches_a_hand_computed_case():
    rows, instances = _rows()
    # the class-2 square (16 px) predicted one pixel to the right: overlap 12 px -> Dice 2*12/32 = 0.75
    result = evaluate_interactive(
        ShiftedOracle(instances, {(0, 3): 1}), rows, n_corrections=0, starts=("box",), progress=False
    )
    assert result["scoring"] == "semantic" and "Dice per class" in SCORING["semantic"]
    image_0 = (1.0 + 0.75) / 2  # mean over the classes present in image 0
    assert result["images"][0]["box"]["dice"][0] == pytest.approx(image_0)
    assert result["dice"]["box"] == pytest.approx((image_0 + 1.0) / 2)  # then over images
    assert result["dice_per_class"]["box"] == {1: pytest.approx(1.0), 2: pytest.approx(0.75)}
    table = format_per_class(result)
    assert "| 2 | 0.750 |" in table and "Box Dice" in table


def test_class_dice_unions_the_objects_of_a_class():
    truth = np.zeros((4, 6), dtype=np.int64)
    truth[:, :2], truth[:, 4:] = 1, 1
    masks = [np.flatnonzero(truth[:, :3] > -1) // 3 * 6 + np.flatnonzero(truth[:, :3] > -1) % 3, np.array([5, 11])]
    # object 1 covers columns 0-2 (4 of its 12 px are background), object 2 two pixels of column 5
    scores = class_dice(masks, np.array([1, 1]), truth)
    predicted = np.zeros(truth.size, dtype=bool)
    predicted[masks[0]] = predicted[masks[1]] = True
    inter = (predicted & (truth.ravel() == 1)).sum()
    assert scores == {1: pytest.approx(2 * inter / (predicted.sum() + (truth == 1).sum()))}


def test_instances_say_how_they_were_scored():
    rows, instances = _rows()
    plain = [{"image": r["image"], "labels": r["labels"]} for r in rows]
    result = evaluate_interactive(ShiftedOracle(instances, {}), plain, n_corrections=0, starts=("box",), progress=False)
    assert result["scoring"] == "instances" and "dice_per_class" not in result
    assert format_per_class(result) == ""
