"""UNETR targets (per-object distances) and the Dice-based distance loss."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from skimage.draw import disk, ellipse
from skimage.segmentation import find_boundaries

from hf_sam_peft.training.ais import (
    BOUNDARY_DISTANCES,
    CENTER_DISTANCES,
    FOREGROUND,
    DistanceLoss,
    ais_loss,
    batch_distance_targets,
    distance_targets,
)


def _disc(shape=(64, 64), center=(32, 32), radius=10) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint16)
    labels[disk(center, radius, shape=shape)] = 7
    return labels


def _random_objects(n: int = 50, size: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), dtype=np.uint16)
    for object_id in range(1, n + 1):
        r, c = rng.integers(0, size, 2)
        a, b = rng.integers(3, 14, 2)
        labels[ellipse(r, c, a, b, shape=labels.shape, rotation=rng.uniform(0, np.pi))] = object_id
    return labels


def test_disc_targets_by_hand():
    labels = _disc()
    targets = distance_targets(labels)
    assert targets.shape == (3, 64, 64) and targets.dtype == np.float32
    inside = labels > 0
    np.testing.assert_array_equal(targets[FOREGROUND], inside.astype(np.float32))

    # Centre distance: Euclidean distance to the centroid (32, 32) over its maximum inside the disc.
    rows, cols = np.indices(labels.shape)
    radial = np.hypot(rows - 32, cols - 32)
    assert targets[CENTER_DISTANCES][32, 32] == 0
    np.testing.assert_allclose(targets[CENTER_DISTANCES][inside], radial[inside] / radial[inside].max(), atol=1e-6)
    assert targets[CENTER_DISTANCES][inside].max() == pytest.approx(1.0, abs=1e-6)

    # Boundary distance, inverted: 0 at the most central point, 1 on the object's inner boundary.
    boundary = find_boundaries(labels, mode="inner")
    assert targets[BOUNDARY_DISTANCES][32, 32] == 0
    np.testing.assert_allclose(targets[BOUNDARY_DISTANCES][boundary], 1.0, atol=1e-6)
    # Along a ray from the centre the boundary target grows as the boundary distance shrinks.
    ray = targets[BOUNDARY_DISTANCES][32, 32:42]
    assert np.all(np.diff(ray) > 0)
    # For a disc the distance to the boundary is ~(9 - r) px, so inverted and normalised it is ~r / 9.
    np.testing.assert_allclose(ray, np.arange(10) / 9, atol=0.06)

    # Background of the distance channels holds the reference's fill value 1; everything is in [0, 1].
    np.testing.assert_array_equal(targets[1:, ~inside], 1.0)
    assert targets.min() >= 0 and targets.max() <= 1


def test_centre_falls_back_to_most_central_point_for_non_convex_objects():
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[disk((32, 32), 20, shape=labels.shape)] = 1
    labels[disk((32, 32), 12, shape=labels.shape)] = 0  # a ring: its centroid lies in the hole
    rows, cols = np.nonzero(labels)
    centroid = (int(np.round(rows.mean())), int(np.round(cols.mean())))
    assert labels[centroid] == 0
    targets = distance_targets(labels)
    center = np.argwhere((targets[CENTER_DISTANCES] == 0) & (labels > 0))
    assert len(center) == 1
    # ... which is where the (inverted) boundary distance is 0 too.
    assert targets[BOUNDARY_DISTANCES][tuple(center[0])] == 0


def test_each_object_is_normalised_on_its_own():
    labels = np.zeros((64, 96), dtype=np.int32)
    labels[disk((32, 20), 6, shape=labels.shape)] = 1
    labels[disk((32, 64), 15, shape=labels.shape)] = 2
    targets = distance_targets(labels)
    for object_id in (1, 2):
        inside = labels == object_id
        for channel in (CENTER_DISTANCES, BOUNDARY_DISTANCES):
            assert targets[channel][inside].min() == 0
            assert targets[channel][inside].max() == pytest.approx(1.0, abs=1e-6)


def test_split_labels_become_separate_objects():
    labels = np.zeros((40, 80), dtype=np.uint8)
    labels[5:35, 5:35] = 3
    labels[5:35, 45:75] = 3  # same id, not connected
    targets = distance_targets(labels)
    assert targets[CENTER_DISTANCES][5:35, 5:35].min() == 0
    assert targets[CENTER_DISTANCES][5:35, 45:75].min() == 0


def test_min_size_drops_small_objects():
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[2:6, 2:7] = 1  # 20 px
    labels[20:26, 20:25] = 2  # 30 px
    targets = distance_targets(labels, min_size=25)
    assert targets[FOREGROUND][2:6, 2:7].sum() == 0
    np.testing.assert_array_equal(targets[1:, 2:6, 2:7], 1.0)  # treated as background
    assert targets[FOREGROUND][20:26, 20:25].all()
    assert distance_targets(labels, min_size=0)[FOREGROUND].sum() == 50
    assert distance_targets(labels, min_size=31)[FOREGROUND].sum() == 0


def test_empty_and_bool_labels():
    empty = distance_targets(np.zeros((8, 9), dtype=np.uint8))
    np.testing.assert_array_equal(empty[FOREGROUND], 0)
    np.testing.assert_array_equal(empty[1:], 1)
    mask = _disc() > 0
    np.testing.assert_array_equal(distance_targets(mask), distance_targets(_disc()))


def test_bad_label_inputs():
    with pytest.raises(TypeError, match="dtype"):
        distance_targets(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="2D"):
        distance_targets(np.zeros((2, 8, 8), dtype=np.uint16))
    with pytest.raises(ValueError, match="non-negative"):
        distance_targets(np.full((8, 8), -1, dtype=np.int32))
    with pytest.raises(TypeError, match="numpy"):
        distance_targets([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="min_size"):
        distance_targets(np.zeros((8, 8), dtype=np.uint8), min_size=-1)
    with pytest.raises(ValueError, match="shape"):
        batch_distance_targets(torch.zeros(8, 8, dtype=torch.int64))


def test_targets_are_fast_enough():
    labels = _random_objects()
    assert len(np.unique(labels)) > 40
    distance_targets(labels)  # warm-up
    best = min(_timed(distance_targets, labels) for _ in range(3))
    assert best < 0.1, f"distance_targets took {best:.3f}s for 256² with 50 objects"


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def test_batch_targets_match_single_targets():
    labels = np.stack([_random_objects(10, 64, seed) for seed in range(2)]).astype(np.int64)
    batch = batch_distance_targets(torch.from_numpy(labels)[:, None])
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    for i in range(2):
        np.testing.assert_array_equal(batch[i].numpy(), distance_targets(labels[i]))
    np.testing.assert_array_equal(batch_distance_targets(labels).numpy(), batch.numpy())


# --- loss ------------------------------------------------------------------------------------------


def _target_batch() -> torch.Tensor:
    return torch.from_numpy(np.stack([distance_targets(_random_objects(12, 64, seed)) for seed in (1, 2)]))


def test_loss_is_zero_for_perfect_prediction_and_positive_otherwise():
    target = _target_batch()
    assert ais_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    noisy = (target + 0.2 * torch.randn_like(target)).clamp(0, 1)
    assert ais_loss(noisy, target).item() > 0.01
    assert ais_loss(torch.rand_like(target), target).item() > ais_loss(noisy, target).item()


def test_loss_by_hand():
    # fg target all ones, prediction 0.5 everywhere: Dice = 2·0.5N / (0.25N + N) = 0.8 → loss 0.2.
    # Distances: target 0 everywhere, prediction 0.5: Dice = 0 → loss 1 each.
    target = torch.zeros(1, 3, 4, 5)
    target[:, FOREGROUND] = 1
    pred = torch.full((1, 3, 4, 5), 0.5)
    assert ais_loss(pred, target).item() == pytest.approx(0.2 + 1 + 1, abs=1e-6)
    # Distances equal up to a factor 2 (p = 2t): Dice = 2·2Σt² / (4Σt² + Σt²) = 0.8 → loss 0.2 each.
    target[:, 1:] = 0.25
    pred[:, FOREGROUND] = 1
    pred[:, 1:] = 0.5
    assert ais_loss(pred, target).item() == pytest.approx(0.4, abs=1e-6)


def test_distances_in_background_are_ignored_only_when_masked():
    target = _target_batch()
    pred = target.clone()
    background = target[:, FOREGROUND : FOREGROUND + 1].expand_as(target) == 0
    pred[:, 1:][background[:, 1:]] = 0.0  # wrong distances, but only in the background
    assert ais_loss(pred, target).item() == pytest.approx(0.0, abs=1e-6)
    assert ais_loss(pred, target, mask_distances_in_bg=False).item() > 0.1


def test_loss_gradients_and_module():
    target = _target_batch()
    pred = torch.rand_like(target, requires_grad=True)
    loss = DistanceLoss()(pred, target)
    assert loss.item() == pytest.approx(ais_loss(pred, target).item())
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_loss_bad_inputs():
    with pytest.raises(ValueError, match="pred"):
        ais_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="target shape"):
        ais_loss(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5))
    with pytest.raises(TypeError):
        ais_loss(np.zeros((1, 3, 4, 4)), torch.rand(1, 3, 4, 4))
