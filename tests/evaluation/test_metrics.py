"""mSA and Dice: hand-computed cases, an exhaustive-matching oracle, evaluate wrappers, real labels."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from skimage.measure import label

from hf_sam_peft.evaluation.metrics import (
    DEFAULT_THRESHOLDS,
    average_over_images,
    dice_score,
    match_counts,
    mean_segmentation_accuracy,
    metric_path,
    segmentation_accuracy_at,
)
from tests.conftest import shared_dataset

N_THRESHOLDS = 10  # 0.50, 0.55, ..., 0.95


def _canvas(shape=(40, 60)) -> np.ndarray:
    return np.zeros(shape, dtype=np.int32)


def _n_thresholds_at_most(iou: float) -> int:
    return int(np.count_nonzero(DEFAULT_THRESHOLDS <= iou))


# --------------------------------------------------------------------------------------------- hand cases


def test_perfect_match_with_different_label_values_is_one():
    gt, pred = _canvas(), _canvas()
    for (rows, cols), gt_id, pred_id in zip(
        [((2, 12), (3, 13)), ((20, 30), (5, 20)), ((5, 15), (30, 55))], [5, 9, 200], [1, 2, 3]
    ):
        gt[slice(*rows), slice(*cols)] = gt_id
        pred[slice(*rows), slice(*cols)] = pred_id
    assert mean_segmentation_accuracy(pred, gt) == 1.0
    assert dice_score(pred, gt) == 1.0


def test_bool_mask_is_one_object():
    gt = _canvas()
    gt[0:10, 0:10] = 3
    gt[20:30, 20:30] = 8
    mask = gt == 3
    # TP 1, FP 0, FN 1 at every threshold
    assert mean_segmentation_accuracy(mask, gt) == pytest.approx(1 / 2)
    assert mean_segmentation_accuracy(gt, gt > 0) == 1.0  # the two blobs of the mask are two components


def test_disjoint_objects_score_zero():
    gt, pred = _canvas(), _canvas()
    gt[0:10, 0:10] = 1
    pred[20:30, 20:30] = 1
    assert mean_segmentation_accuracy(pred, gt) == 0.0
    assert match_counts(pred, gt)[0].tolist() == [0, 1, 1]
    assert dice_score(pred, gt) == 0.0


def test_split_object():
    # gt: one 10x25 object (250 px); prediction splits it into 180 px + 70 px -> IoUs 0.72 and 0.28.
    gt, pred = _canvas(), _canvas()
    gt[0:10, 0:25] = 4
    pred[0:10, 0:18] = 1
    pred[0:10, 18:25] = 2
    passing = _n_thresholds_at_most(180 / 250)
    assert passing == 5  # 0.50 ... 0.70
    # where it passes: TP 1, FP 1, FN 0 -> 1/2
    expected = passing * (1 / 2) / N_THRESHOLDS
    assert mean_segmentation_accuracy(pred, gt) == pytest.approx(expected)
    assert segmentation_accuracy_at(pred, gt, 0.5) == pytest.approx(0.5)
    assert segmentation_accuracy_at(pred, gt, 0.75) == 0.0


def test_merged_objects_match_one_to_one():
    # gt: 170 px + 80 px touching objects; prediction merges them (250 px) -> IoUs 0.68 and 0.32.
    gt, pred = _canvas(), _canvas()
    gt[0:10, 0:17] = 1
    gt[0:10, 17:25] = 2
    pred[0:10, 0:25] = 7
    # where IoU 0.68 passes: TP 1, FP 0, FN 1 -> 1/2
    expected = _n_thresholds_at_most(170 / 250) * (1 / 2) / N_THRESHOLDS
    assert mean_segmentation_accuracy(pred, gt) == pytest.approx(expected) == pytest.approx(0.2)


def test_equal_merge_at_exactly_half_counts_one_match():
    # Both gt objects have IoU exactly 0.5 with the merged prediction: only one may be matched (one-to-one),
    # and only at the first threshold (IoU >= 0.5 is inclusive).
    gt, pred = _canvas(), _canvas()
    gt[0:10, 0:10] = 1
    gt[0:10, 10:20] = 2
    pred[0:10, 0:20] = 1
    _, per_threshold = mean_segmentation_accuracy(pred, gt, return_per_threshold=True)
    assert per_threshold == pytest.approx([1 / 2] + [0.0] * 9)


def test_thresholds_are_elfs_floating_point_values():
    # IoU exactly 0.6 fails elf's third threshold (np.arange gives 0.6000000000000001): we keep that.
    gt, pred = _canvas(), _canvas()
    gt[0:10, 0:10] = 1
    pred[0:10, 0:6] = 1
    _, per_threshold = mean_segmentation_accuracy(pred, gt, return_per_threshold=True)
    assert per_threshold == pytest.approx([1.0, 1.0] + [0.0] * 8)


def test_non_consecutive_labels():
    # gt ids 1000 and 2 (100 px each); pred 17 = the first exactly, pred 3 = 72 px inside the second (IoU 0.72).
    gt, pred = _canvas(), _canvas()
    gt[0:10, 0:10] = 1000
    gt[20:30, 20:30] = 2
    pred[0:10, 0:10] = 17
    pred[20:28, 20:29] = 3
    passing = _n_thresholds_at_most(0.72)
    # thresholds <= 0.72: TP 2 -> SA 1; above: TP 1, FP 1, FN 1 -> SA 1/3
    expected = (passing * 1.0 + (N_THRESHOLDS - passing) / 3) / N_THRESHOLDS
    assert mean_segmentation_accuracy(pred, gt) == pytest.approx(expected) == pytest.approx(2 / 3)


def test_ground_truth_is_relabelled_to_connected_components():
    # One gt id on two separate blobs counts as two objects (micro-sam calls skimage.measure.label first).
    gt, pred = _canvas(), _canvas()
    gt[0:10, 0:10] = 3
    gt[20:30, 20:30] = 3
    pred[0:10, 0:10] = 1
    pred[20:30, 20:30] = 2
    assert mean_segmentation_accuracy(pred, gt) == 1.0
    assert match_counts(pred, gt)[0].tolist() == [2, 0, 0]


@pytest.mark.parametrize(
    "pred_empty, gt_empty, expected", [(True, False, 0.0), (False, True, 0.0), (True, True, 0.0)]
)
def test_empty_images(pred_empty, gt_empty, expected):
    # elf returns 0 whenever nothing is matched, including an empty prediction of an empty image.
    gt, pred = _canvas(), _canvas()
    if not gt_empty:
        gt[0:10, 0:10] = 1
    if not pred_empty:
        pred[0:10, 0:10] = 1
    assert mean_segmentation_accuracy(pred, gt) == expected
    assert dice_score(pred, gt) == expected


def test_low_threshold_needs_optimal_not_greedy_matching():
    # One row: A=[0,10), B=[10,20); Q=[0,4) (IoU 0.4 with A), P=[4,16) (IoU 0.375 with both A and B).
    # At t=0.3 an optimal matching pairs Q-A and P-B: TP 2.
    gt, pred = np.zeros((1, 20), np.int64), np.zeros((1, 20), np.int64)
    gt[0, 0:10], gt[0, 10:20] = 1, 2
    pred[0, 0:4], pred[0, 4:16] = 1, 2
    assert match_counts(pred, gt, thresholds=[0.3]).tolist() == [[2, 0, 0]]
    assert segmentation_accuracy_at(pred, gt, 0.3) == 1.0


def _exhaustive_true_positives(pred: np.ndarray, gt: np.ndarray, threshold: float) -> int:
    """Independent oracle: dense per-object IoU and the best of all one-to-one assignments."""
    pred_ids = [i for i in np.unique(pred) if i != 0]
    gt_ids = [i for i in np.unique(gt) if i != 0]
    iou = np.array(
        [[np.sum((pred == p) & (gt == g)) / np.sum((pred == p) | (gt == g)) for g in gt_ids] for p in pred_ids]
    ).reshape(len(pred_ids), len(gt_ids))
    if min(iou.shape) == 0:
        return 0
    small, large = (iou, iou.shape[1]) if iou.shape[0] <= iou.shape[1] else (iou.T, iou.shape[0])
    return max(
        sum(small[row, col] >= threshold for row, col in enumerate(cols))
        for cols in itertools.permutations(range(large), small.shape[0])
    )


def _random_rectangles(rng: np.random.Generator, n: int, shape=(8, 9)) -> np.ndarray:
    image = np.zeros(shape, dtype=np.int64)
    for value in rng.choice(np.arange(1, 50), size=n, replace=False):
        r, c = rng.integers(0, shape[0] - 1), rng.integers(0, shape[1] - 1)
        image[r : r + rng.integers(1, 5), c : c + rng.integers(1, 5)] = value
    return image


def test_matches_exhaustive_oracle_on_random_images():
    rng = np.random.default_rng(0)
    thresholds = [0.2, 0.35, 0.5, 0.75]
    for _ in range(60):
        gt = label(_random_rectangles(rng, 4))  # the oracle sees connected components, like the metric
        pred = _random_rectangles(rng, 4)
        counts = match_counts(pred, gt, thresholds)
        expected = [_exhaustive_true_positives(pred, gt, t) for t in thresholds]
        assert counts[:, 0].tolist() == expected
        n_pred, n_true = len(np.unique(pred[pred > 0])), len(np.unique(gt[gt > 0]))
        assert (counts[:, 1] == n_pred - counts[:, 0]).all() and (counts[:, 2] == n_true - counts[:, 0]).all()


def test_thousands_of_objects_fast():
    # 50 x 50 grid of 6x6 objects (2500) in a 400x400 image.
    gt = np.zeros((400, 400), dtype=np.uint32)
    ids = np.arange(1, 2501).reshape(50, 50)
    gt.reshape(50, 8, 50, 8)[:, 1:7, :, 1:7] = ids[:, None, :, None]
    permutation = np.concatenate([[0], np.random.default_rng(1).permutation(2500) + 1]).astype(np.uint32)
    pred = permutation[gt]
    start = time.perf_counter()
    assert mean_segmentation_accuracy(pred, gt) == 1.0
    half = np.where(gt % 2 == 0, gt, 0)  # drop every odd object: TP 1250, FN 1250 at every threshold
    assert mean_segmentation_accuracy(half, gt) == pytest.approx(0.5)
    assert time.perf_counter() - start < 5.0


# --------------------------------------------------------------------------------------------- dice


def test_dice_partial_overlap_and_labels_as_foreground():
    gt, pred = _canvas(), _canvas()
    pred[0:2, 0:2] = 5  # 4 px
    gt[0:1, 0:2] = 1  # 2 px inside the prediction
    assert dice_score(pred, gt) == pytest.approx(2 * 2 / (4 + 2))
    assert dice_score(pred > 0, gt.astype(bool)) == pytest.approx(2 / 3)


def test_average_over_images_is_per_image_mean():
    big_gt = _canvas()
    big_gt[0:20, 0:20] = 1
    small_gt, small_pred = _canvas(), _canvas()
    small_gt[0:2, 0:2] = 1
    small_pred[0:2, 0:1] = 1  # dice 2/3
    score = average_over_images(dice_score, [big_gt, small_pred], [big_gt, small_gt])
    assert score == pytest.approx((1.0 + 2 / 3) / 2)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "pred, gt, error, match",
    [
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), int), TypeError, "prediction .*integer"),
        (np.zeros((4, 4), int), np.zeros((4, 4), np.float64), TypeError, "ground_truth .*integer"),
        (np.zeros((4, 4), int), np.zeros((4, 5), int), ValueError, "shape"),
        (np.zeros((2, 4, 4), int), np.zeros((2, 4, 4), int), ValueError, "prediction must be a 2D"),
        (np.zeros((4, 4), int), -np.ones((4, 4), int), ValueError, "ground_truth must not contain negative"),
    ],
)
def test_bad_inputs_raise(pred, gt, error, match):
    with pytest.raises(error, match=match):
        mean_segmentation_accuracy(pred, gt)
    with pytest.raises(error, match=match):
        dice_score(pred, gt)


def test_bad_thresholds_and_lists_raise():
    image = np.ones((4, 4), int)
    with pytest.raises(ValueError, match="thresholds"):
        mean_segmentation_accuracy(image, image, thresholds=[0.0, 0.5])
    with pytest.raises(ValueError, match="same length"):
        average_over_images(dice_score, [image], [])
    with pytest.raises(ValueError, match="at least one"):
        average_over_images(dice_score, [], [])
    with pytest.raises(ValueError, match="name must be one of"):
        metric_path("accuracy")


# --------------------------------------------------------------------------------------------- evaluate


def _example_images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(3)
    gts, preds = [], []
    for shape in [(30, 40), (25, 25), (40, 32)]:
        gt = _canvas(shape)
        pred = _canvas(shape)
        for i in range(1, 5):
            r, c = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
            gt[r : r + 8, c : c + 8] = i * 10
            pred[r + rng.integers(0, 3) : r + 8, c : c + 8 - rng.integers(0, 3)] = i
        gts.append(gt)
        preds.append(pred)
    return preds, gts


def test_evaluate_metrics_match_plain_functions(monkeypatch, tmp_path):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preds, gts = _example_images()

    msa = evaluate.load(metric_path("mean_segmentation_accuracy"), cache_dir=str(tmp_path))
    for pred, gt in zip(preds, gts):
        msa.add(predictions=pred, references=gt)
    result = msa.compute()
    expected = average_over_images(mean_segmentation_accuracy, preds, gts)
    assert 0.0 < expected < 1.0  # a case that exercises partial matches
    assert result["mean_segmentation_accuracy"] == pytest.approx(expected)
    assert result["sa50"] == pytest.approx(average_over_images(segmentation_accuracy_at, preds, gts, threshold=0.5))
    assert len([key for key in result if key.startswith("sa")]) == N_THRESHOLDS

    custom = msa.compute(predictions=preds, references=gts, thresholds=[0.5, 0.75])
    assert set(custom) == {"mean_segmentation_accuracy", "sa50", "sa75"}
    assert custom["mean_segmentation_accuracy"] == pytest.approx(
        average_over_images(mean_segmentation_accuracy, preds, gts, thresholds=[0.5, 0.75])
    )

    dice = evaluate.load(metric_path("dice"), cache_dir=str(tmp_path))
    result = dice.compute(predictions=preds, references=gts)
    assert result["dice"] == pytest.approx(average_over_images(dice_score, preds, gts))


# --------------------------------------------------------------------------------------------- real labels


def test_real_instance_labels():
    tifffile = pytest.importorskip("tifffile")
    paths = sorted((shared_dataset("dsb2018_stage1test_fluo_nuclei") / "val" / "labels").glob("*.tif"))
    if not paths:
        pytest.skip("no label files in the dsb2018 val split")
    for path in paths:
        gt = tifffile.imread(path)
        ids = np.unique(gt)[1:]
        assert mean_segmentation_accuracy(gt, gt) == 1.0
        # Drop two objects: TP n-2, FP 0, FN 2 at every threshold.
        kept = np.where(np.isin(gt, ids[:2]), 0, gt)
        assert mean_segmentation_accuracy(kept, gt) == pytest.approx((len(ids) - 2) / len(ids))


def test_real_labels_with_multi_piece_ids_are_relabelled():
    tifffile = pytest.importorskip("tifffile")
    paths = sorted((shared_dataset("usiigaci_phase_contrast_cells") / "train" / "labels").glob("*.tif"))
    for path in paths:
        gt = tifffile.imread(path)
        components = label(gt)
        if components.max() > len(np.unique(gt)) - 1:
            break
    else:
        pytest.skip("no usiigaci label image with an id split into several pieces")
    assert mean_segmentation_accuracy(components, gt) == 1.0
    assert mean_segmentation_accuracy(gt, gt) < 1.0  # the prediction is not relabelled, as in micro-sam
