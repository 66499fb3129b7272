"""Interactive evaluation: the protocol (rounds, prompts per round), scoring, determinism and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_sam_peft.evaluation.interactive import (
    assemble_instances,
    evaluate_interactive,
    iter_object_rounds,
    segment_from_labels,
)
from hf_sam_peft.evaluation.predictor import SamPredictor
from hf_sam_peft.prompts import boxes_from_masks
from tests.conftest import shared_dataset

DSB = "dsb2018_stage1test_fluo_nuclei"


def small_rows(n: int = 2, size: int = 96) -> list[dict]:
    """Crops of real dsb2018 validation images (a handful of nuclei each) to keep the tiny model fast."""
    from hf_sam_peft.data import iter_rows, to_instances

    rows = []
    for row in iter_rows(shared_dataset(DSB), "val", min_size=0):
        labels = to_instances(row["labels"][:size, :size])
        if labels.max() >= 3:
            rows.append({"image": row["image"][:size, :size], "labels": labels, "id": row["id"]})
        if len(rows) == n:
            return rows
    pytest.skip(f"fewer than {n} crops with objects in {DSB}")


class Oracle:
    """A prompt predictor that knows the ground truth: it returns the object under the prompt.

    ``perfect_after`` rounds make it exact; before that it returns the object's mask shrunk to its top half,
    so round 0 is imperfect and the corrections are what fixes it.
    """

    def __init__(self, rows: list[dict], perfect_after: int = 0) -> None:
        self.labels = [np.asarray(r["labels"]) for r in rows]
        self.perfect_after = perfect_after
        self.calls: list[tuple[int, bool, bool]] = []  # (points per object, box given, multimask)
        self.current = -1

    def set_image(self, image: np.ndarray) -> None:
        self.current += 1
        assert self.labels[self.current].shape == np.asarray(image).shape[:2]

    def predict(self, points=None, labels=None, boxes=None, multimask=False):
        gt = torch.from_numpy(self.labels[self.current])
        n_points = 0 if points is None else points.shape[1]
        self.calls.append((n_points, boxes is not None, multimask))
        if boxes is not None:
            ids = []
            for box in boxes:
                x0, y0, x1, y1 = (int(v) for v in box)
                inside = torch.unique(gt[y0:y1, x0:x1])
                inside = inside[inside != 0]
                ids.append(next(int(i) for i in inside if torch.equal(boxes_from_masks(gt == i, jitter=0.0), box)))
        else:
            ids = [int(gt[int(p[0, 1]), int(p[0, 0])]) for p in points]
        masks = torch.stack([gt == i for i in ids])
        rounds_done = n_points // 2 if boxes is not None else (n_points - 1) // 2
        if rounds_done < self.perfect_after:
            rows = torch.arange(gt.shape[0])[None, :, None]
            tops = torch.stack([torch.nonzero(m)[:, 0].min() for m in masks])[:, None, None]
            bottoms = torch.stack([torch.nonzero(m)[:, 0].max() for m in masks])[:, None, None]
            masks = masks & (rows <= (tops + bottoms) // 2)
        logits = masks.float() * 20 - 10
        k = 3 if multimask else 1
        iou = torch.zeros(len(ids), k)
        iou[:, -1] = 1.0  # the exact mask is the last one, and the one with the highest predicted IoU
        noise = torch.where(torch.arange(k)[None, :, None, None] == k - 1, logits[:, None], -10.0)
        return noise, iou


def test_perfect_oracle_scores_one():
    rows = small_rows()
    # chunks of two objects: the image is assembled from several decoder calls
    result = evaluate_interactive(Oracle(rows), rows, batch_size=2, keep_segmentations=True, progress=False)
    for metric in ("msa", "dice", "iou"):
        assert result[metric] == {"point": 1.0, "ip": 1.0, "box": 1.0, "ib": 1.0}
    first, last = result["segmentations"]["box"][1]
    assert first.shape == last.shape == rows[1]["labels"].shape and last.max() == rows[1]["labels"].max()


def test_corrections_fix_an_imperfect_first_prompt_and_ip_is_round_seven():
    rows = small_rows()
    oracle = Oracle(rows, perfect_after=7)  # exact only once 7 corrections were added
    result = evaluate_interactive(oracle, rows, n_corrections=7, progress=False)
    assert result["msa"]["ip"] == 1.0 and result["msa"]["ib"] == 1.0
    assert result["msa"]["point"] < 1.0 and result["iou"]["box"] < 1.0
    assert len(result["rounds"]["point"]["iou"]) == 8
    assert result["rounds"]["point"]["iou"][6] < 1.0 == result["rounds"]["point"]["iou"][7]
    # Prompts per call: point start 1, 3, ..., 15 points (multimask only first); box start the box + 0, 2, ..., 14.
    per_image = 2 * 8  # one chunk per image (few objects), two starts, eight rounds
    first = oracle.calls[:per_image]
    assert first[:8] == [(1 + 2 * k, False, k == 0) for k in range(8)]
    assert first[8:] == [(2 * k, True, False) for k in range(8)]


def test_tiny_sam_table_is_complete_and_seeded(tiny_sam):
    rows = small_rows()
    result = evaluate_interactive(tiny_sam, rows, seed=3, batch_size=4, progress=False)
    for metric in ("msa", "dice", "iou"):
        assert set(result[metric]) == {"point", "box", "ip", "ib"}
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in result[metric].values())
        for start in ("point", "box"):
            assert len(result["rounds"][start][metric]) == 8
    assert result["n_images"] == 2 and result["n_objects"] == sum(int(r["labels"].max()) for r in rows)
    assert result["rounds"]["point"]["msa"][7] == result["msa"]["ip"]
    assert result["rounds"]["box"]["dice"][0] == result["dice"]["box"]
    again = evaluate_interactive(tiny_sam, rows, seed=3, batch_size=4, progress=False)
    assert again["rounds"] == result["rounds"]
    other = evaluate_interactive(tiny_sam, rows, seed=4, batch_size=4, progress=False, starts=("point",))
    assert other["rounds"]["point"] != result["rounds"]["point"]  # other seed, other prompts
    assert "box" not in other["msa"] and "ib" not in other["msa"]


def test_rounds_accumulate_points_from_the_prediction(tiny_sam):
    row = small_rows(1)[0]
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(row["image"])
    labels = torch.from_numpy(row["labels"])
    gt = labels[None] == torch.arange(1, int(labels.max()) + 1)[:, None, None]
    generator = torch.Generator().manual_seed(0)
    rounds = list(iter_object_rounds(predictor, gt, "point", 7, generator))
    assert [r.index for r in rounds] == list(range(8))
    for k, r in enumerate(rounds):
        assert r.n_points == 1 + 2 * k and r.masks.shape == gt.shape and r.masks.dtype == torch.bool
        assert r.labels[:, 0].eq(1).all() and r.labels[:, 1:].eq(torch.tensor([1, 0]).repeat(k)).all()
        if k:
            assert torch.equal(r.points[:, :-2], rounds[k - 1].points)  # earlier points are kept
            new_pos, new_neg = r.points[:, -2].long(), r.points[:, -1].long()
            prev = rounds[k - 1].masks
            idx = torch.arange(gt.shape[0])
            # the positive lands in a missed pixel where there is one, the negative in a false positive
            missed = (gt & ~prev)[idx, new_pos[:, 1], new_pos[:, 0]]
            has_missed = (gt & ~prev).flatten(1).any(-1)
            assert torch.equal(missed, has_missed)
            wrong = (prev & ~gt)[idx, new_neg[:, 1], new_neg[:, 0]]
            assert torch.equal(wrong, (prev & ~gt).flatten(1).any(-1))
    boxes = list(iter_object_rounds(predictor, gt, "box", 2, generator))
    assert [r.n_points for r in boxes] == [0, 2, 4]
    assert torch.equal(boxes[0].boxes, boxes_from_masks(gt, jitter=0.0))


def test_segment_from_labels_with_oracle_returns_the_objects():
    rows = small_rows(1)
    segmentation = segment_from_labels(Oracle(rows), rows[0]["image"], rows[0]["labels"])
    assert segmentation.dtype == np.uint32 and segmentation.shape == rows[0]["labels"].shape
    from hf_sam_peft.evaluation.metrics import mean_segmentation_accuracy

    assert mean_segmentation_accuracy(segmentation, rows[0]["labels"]) == 1.0


def test_assemble_instances_overlap_rule():
    shape = (10, 10)
    big = np.zeros(shape, bool)
    big[2:8, 2:8] = True
    small = np.zeros(shape, bool)
    small[4:6, 4:6] = True
    # the small object is pasted after the big one (largest first) and so stays visible
    out = assemble_instances([small, big], shape)
    assert set(np.unique(out)) == {0, 1, 2} and len(np.unique(out[4:6, 4:6])) == 1 and out[4, 4] != out[2, 2]
    # an object larger than the background is taken for background (µSAM's with_background rule)
    huge = np.ones(shape, bool)
    huge[0] = False
    out = assemble_instances([huge, small], shape)
    assert out[0, 0] == 0 and out[9, 9] == 0 and out[4, 4] == 1 and out.max() == 1
    assert assemble_instances([], shape).max() == 0


def test_assemble_instances_splits_masks_into_connected_components():
    from hf_sam_peft.evaluation.metrics import mean_segmentation_accuracy

    shape = (12, 12)
    two_blobs = np.zeros(shape, bool)
    two_blobs[1:4, 1:4] = two_blobs[7:10, 7:10] = True
    diagonal = np.zeros(shape, bool)
    diagonal[1, 8] = diagonal[2, 9] = True  # touching at a corner: one object (full connectivity)
    out = assemble_instances([two_blobs, diagonal], shape)
    assert out.dtype == np.uint32 and out.max() == 3
    assert out[1, 1] == 1 and out[1, 8] == out[2, 9] == 2 and out[7, 7] == 3  # ids in raster order
    # a mask of two blobs scores as two objects against a ground truth of the two blobs
    truth = np.zeros(shape, np.int32)
    truth[1:4, 1:4], truth[7:10, 7:10] = 1, 2
    assert mean_segmentation_accuracy(assemble_instances([two_blobs], shape), truth) == 1.0
    # a smaller object pasted on top of a larger one can cut it in two: two segments remain of the larger
    bar = np.zeros(shape, bool)
    bar[5:7, 0:12] = True
    cut = np.zeros(shape, bool)
    cut[4:8, 5:7] = True
    out = assemble_instances([cut, bar], shape)
    assert out.max() == 3 and out[5, 0] != out[5, 11] and out[5, 5] not in (out[5, 0], out[5, 11], 0)
    # overlapping objects touching side by side keep separate ids
    left = np.zeros(shape, bool)
    left[2:6, 2:7] = True
    right = np.zeros(shape, bool)
    right[2:6, 5:10] = True
    out = assemble_instances([left, right], shape)
    assert out.max() == 2 and out[3, 2] != out[3, 9] and out[3, 5] == out[3, 9]  # equal sizes: input order


def test_assemble_instances_drops_the_segment_dominating_the_background():
    shape = (10, 10)
    everything = np.ones(shape, bool)
    dot = np.zeros(shape, bool)
    dot[5, 5] = True
    out = assemble_instances([everything, dot], shape)
    assert out.max() == 1 and out[5, 5] == 1 and np.count_nonzero(out) == 1
    # the rule applies to connected components: the larger of a two-blob mask's halves can dominate
    halves = np.zeros(shape, bool)
    halves[:, :7] = True
    halves[:, 9] = True  # 70 + 10 pixels vs 20 of background
    out = assemble_instances([halves], shape)
    assert out.max() == 1 and np.array_equal(out > 0, np.pad(np.ones((10, 1), bool), ((0, 0), (9, 0))))
    # an object smaller than the background stays
    assert assemble_instances([dot], shape).max() == 1


def test_semantic_rows_score_dice_per_class():
    labels = np.zeros((32, 32), np.int32)
    labels[2:10, 2:10], labels[20:30, 20:30] = 1, 2
    semantic = np.where(labels == 1, 3, np.where(labels == 2, 5, 0)).astype(np.int32)
    row = {"image": np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8), "labels": labels, "semantic": semantic}
    result = evaluate_interactive(Oracle([row]), [row], n_corrections=1, progress=False)
    assert result["dice"]["box"] == 1.0

    class Empty(Oracle):
        def predict(self, *args, **kwargs):
            logits, iou = super().predict(*args, **kwargs)
            return torch.full_like(logits, -10.0), iou

    assert evaluate_interactive(Empty([row]), [row], n_corrections=0, progress=False)["dice"]["point"] == 0.0


@pytest.mark.parametrize(
    "row, error, match",
    [
        ({"image": np.zeros((8, 8)), "labels": np.ones((8, 8), np.float32)}, TypeError, "integer"),
        ({"image": np.zeros((8, 8)), "labels": np.ones((2, 8, 8), np.int32)}, ValueError, "2D"),
        ({"image": np.zeros((8, 9)), "labels": np.ones((8, 8), np.int32)}, ValueError, "does not match"),
        ({"image": np.zeros((8, 8))}, ValueError, "'labels'"),
    ],
)
def test_bad_rows_give_clear_errors(row, error, match):
    with pytest.raises(error, match=match):
        evaluate_interactive(Oracle([{"labels": np.ones((8, 8), np.int32)}]), [row], progress=False)


def test_bad_arguments():
    rows = [{"image": np.zeros((8, 8)), "labels": np.zeros((8, 8), np.int32)}]
    with pytest.raises(ValueError, match="no image with objects"):
        evaluate_interactive(Oracle(rows), rows, progress=False)
    with pytest.raises(ValueError, match="starts"):
        evaluate_interactive(Oracle(rows), rows, starts=("mask",), progress=False)
    with pytest.raises(ValueError, match="n_corrections"):
        evaluate_interactive(Oracle(rows), rows, n_corrections=-1, progress=False)
    with pytest.raises(TypeError, match="prompt predictor"):
        evaluate_interactive(object(), rows, progress=False)
