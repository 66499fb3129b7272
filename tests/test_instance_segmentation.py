"""Decoder maps -> instances: known synthetic objects, tiling without seams, grid search, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt, gaussian_filter

from hf_sam_peft.evaluation.metrics import mean_segmentation_accuracy
from hf_sam_peft.instance_segmentation import (
    distances_to_instances,
    grid_search_watershed,
    predict_tiled,
    segment_tiled,
)


def _discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: float) -> np.ndarray:
    """Discs; where two overlap, each pixel goes to the nearer centre (so some objects touch)."""
    rows, cols = np.indices(shape)
    distances = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    labels = np.argmin(distances, axis=0) + 1
    labels[distances.min(axis=0) > radius] = 0
    return labels.astype(np.int32)


def _target_maps(labels: np.ndarray) -> np.ndarray:
    """(foreground, centre distance, inverted boundary distance) per object, each normalised to [0, 1].

    Distances are 1 on the background, as in micro-sam's targets (torch_em's distance_fill_value).
    """
    maps = np.ones((3,) + labels.shape, dtype=np.float32)
    maps[0] = labels > 0
    rows, cols = np.indices(labels.shape)
    for object_id in np.unique(labels)[1:]:
        mask = labels == object_id
        centre = np.hypot(rows - rows[mask].mean(), cols - cols[mask].mean())[mask]
        inside = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1][mask]
        maps[1][mask] = centre / centre.max()
        maps[2][mask] = 1 - inside / inside.max()
    return maps


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray]:
    centres = [(20, 20), (20, 42), (42, 30), (60, 70)]  # the first three touch each other
    labels = _discs((84, 96), centres, radius=12.5)
    return labels, _target_maps(labels)


def test_known_objects_are_recovered(scene):
    labels, maps = scene
    segmentation = distances_to_instances(*maps)
    assert segmentation.dtype == np.uint32
    assert segmentation.max() == 4
    assert sorted(np.unique(segmentation)) == [0, 1, 2, 3, 4]
    assert mean_segmentation_accuracy(segmentation, labels) == 1.0


def test_without_smoothing_too(scene):
    labels, maps = scene
    segmentation = distances_to_instances(*maps, foreground_smoothing=0, distance_smoothing=0)
    assert segmentation.max() == 4
    assert mean_segmentation_accuracy(segmentation, labels) == 1.0


def test_min_size_drops_small_objects_and_relabels(scene):
    labels, maps = scene
    labels = labels.copy()
    labels[68:78, 4:14] = 9  # a 100 px square
    maps = _target_maps(labels)
    with_small = distances_to_instances(*maps)
    assert with_small.max() == 5
    filtered = distances_to_instances(*maps, min_size=200)  # the discs have ~490 px
    assert filtered.max() == 4 and sorted(np.unique(filtered)) == [0, 1, 2, 3, 4]
    assert not filtered[68:78, 4:14].any()


def test_foreground_threshold_masks_everything():
    maps = np.full((3, 20, 20), 0.2, dtype=np.float32)
    assert distances_to_instances(*maps).max() == 0  # foreground 0.2 < 0.5: no objects


@pytest.mark.parametrize(
    "maps, kwargs, error, match",
    [
        ((np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 9))), {}, ValueError, "same shape"),
        ((np.zeros((2, 8, 8)), np.zeros((8, 8)), np.zeros((8, 8))), {}, ValueError, "foreground must be a 2D"),
        ((np.zeros((8, 8)), np.zeros((8, 8), dtype=object), np.zeros((8, 8))), {}, TypeError, "center_distances"),
        ((np.zeros((8, 8)),) * 3, {"min_size": -1}, ValueError, "min_size"),
        ((np.zeros((8, 8)),) * 3, {"distance_smoothing": -1.0}, ValueError, "distance_smoothing"),
    ],
)
def test_bad_inputs_raise(maps, kwargs, error, match):
    with pytest.raises(error, match=match):
        distances_to_instances(*maps, **kwargs)


# --------------------------------------------------------------------------------------------- tiling

RADIUS_CAP = 8.0


def _local_predictor(calls: list[tuple[int, ...]]):
    """A location-equivariant 'model' whose receptive field (8 px + 3 px blur) fits in a 16 px halo."""

    def predict(tile: np.ndarray) -> np.ndarray:
        calls.append(tile.shape)
        grey = tile if tile.ndim == 2 else tile.mean(axis=-1)
        foreground = (grey > 0.5).astype(np.float32)
        boundary = 1 - np.clip(distance_transform_edt(foreground) / RADIUS_CAP, 0, 1)
        centre = gaussian_filter(boundary, sigma=1.0, mode="mirror", truncate=3.0)
        return np.stack([foreground, centre, boundary]).astype(np.float32)

    return predict


@pytest.fixture
def big_image() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = [(int(r), int(c)) for r, c in zip(rng.integers(8, 172, 40), rng.integers(8, 202, 40))]
    labels = _discs((180, 210), centres, radius=7.5)
    return labels, (labels > 0).astype(np.float32)


def test_tiled_prediction_has_no_seams(big_image):
    _, image = big_image
    calls: list[tuple[int, ...]] = []
    predict = _local_predictor(calls)
    whole = predict(image)
    calls.clear()
    tiled = predict_tiled(predict, image, tile_shape=(48, 64), halo=(16, 16))
    assert len(calls) == 4 * 4  # ceil(180 / 48) x ceil(210 / 64) tiles
    assert set(calls) == {(48 + 32, 64 + 32)}  # every tile is full-size, also at the borders
    np.testing.assert_array_equal(tiled, whole)


def test_tiling_without_halo_would_show_seams(big_image):
    _, image = big_image
    predict = _local_predictor([])
    assert not np.array_equal(predict_tiled(predict, image, (48, 64), (0, 0)), predict(image))


def test_segment_tiled_equals_untiled(big_image):
    labels, image = big_image
    predict = _local_predictor([])
    untiled = distances_to_instances(*predict(image), min_size=10)
    tiled = segment_tiled(predict, image, tile_shape=(48, 64), halo=(16, 16), min_size=10)
    np.testing.assert_array_equal(tiled, untiled)
    assert tiled.max() > 10
    rgb = segment_tiled(predict, np.repeat(image[..., None], 3, axis=-1), (48, 64), (16, 16), min_size=10)
    np.testing.assert_array_equal(rgb, untiled)


def test_image_smaller_than_tile_is_one_call():
    calls: list[tuple[int, ...]] = []
    image = np.zeros((30, 20), dtype=np.float32)
    predict_tiled(_local_predictor(calls), image, tile_shape=(64, 64), halo=(8, 8))
    assert calls == [(30, 20)]


@pytest.mark.parametrize(
    "image, tile_shape, halo, predict_fn, match",
    [
        (np.zeros((4, 4, 4, 4)), (8, 8), (0, 0), None, "image must have shape"),
        (np.zeros((32, 32)), (0, 8), (0, 0), None, "tile_shape must be positive"),
        (np.zeros((32, 32)), (8, 8), (-1, 0), None, "halo non-negative"),
        (np.zeros((32, 32)), (8, 8), (2, 2), lambda tile: np.zeros((3, 5, 5)), "predict_fn must return"),
    ],
)
def test_tiling_bad_inputs_raise(image, tile_shape, halo, predict_fn, match):
    predict_fn = predict_fn or _local_predictor([])
    with pytest.raises(ValueError, match=match):
        predict_tiled(predict_fn, image, tile_shape, halo)


def test_segment_tiled_needs_three_channels():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        segment_tiled(lambda tile: np.zeros((2,) + tile.shape), np.zeros((16, 16)), (8, 8), (2, 2))


# --------------------------------------------------------------------------------------------- grid search


def test_grid_search_scores_agree_with_direct_post_processing(scene):
    labels, maps = scene
    other_labels = _discs((70, 70), [(20, 20), (20, 43), (50, 35)], radius=12.0)
    predictions = [maps, _target_maps(other_labels)]
    ground_truths = [labels, other_labels]
    grids = dict(
        center_distance_thresholds=[0.5, 0.05],
        boundary_distance_thresholds=[0.5],
        distance_smoothings=[1.0, 2.0],
        min_sizes=[50, 450, 5000],  # the touching discs are cut below 450 px, the free ones are not
    )
    result = grid_search_watershed(predictions, ground_truths, **grids)
    assert len(result.scores) == 2 * 1 * 2 * 3
    for params, score in result.scores:
        direct = np.mean(
            [
                mean_segmentation_accuracy(
                    distances_to_instances(
                        *p,
                        center_distance_threshold=params["center_distance_threshold"],
                        boundary_distance_threshold=params["boundary_distance_threshold"],
                        distance_smoothing=params["distance_smoothing"],
                        min_size=params["min_size"],
                    ),
                    gt,
                )
                for p, gt in zip(predictions, ground_truths)
            ]
        )
        assert score == pytest.approx(direct)
    assert result.score == 1.0
    assert result.params["min_size"] == 50  # 5000 removes every object
    assert result.params["center_distance_threshold"] == 0.5
    assert result.score == max(score for _, score in result.scores)
    assert min(score for _, score in result.scores) == 0.0
    partial = [score for params, score in result.scores if params["min_size"] == 450]
    assert any(0.0 < score < 1.0 for score in partial)


def test_grid_search_bad_inputs_raise(scene):
    _, maps = scene
    with pytest.raises(ValueError, match="equal length"):
        grid_search_watershed([maps], [])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        grid_search_watershed([maps[:2]], [np.zeros(maps.shape[1:], int)])
    with pytest.raises(ValueError, match="min_size"):
        grid_search_watershed([maps], [np.zeros(maps.shape[1:], int)], min_sizes=[])


# --------------------------------------------------------------------------------------------- real labels


def test_training_targets_of_real_labels_round_trip():
    """The UNETR targets of real nuclei (hf_sam_peft.training.ais) post-process back into the same nuclei."""
    tifffile = pytest.importorskip("tifffile")
    from hf_sam_peft.training.ais import distance_targets
    from tests.conftest import shared_dataset

    paths = sorted((shared_dataset("dsb2018_stage1test_fluo_nuclei") / "val" / "labels").glob("*.tif"))
    if not paths:
        pytest.skip("no label files in the dsb2018 val split")
    for path in paths:
        labels = tifffile.imread(path)
        targets = distance_targets(labels, min_size=0)
        segmentation = distances_to_instances(*targets, foreground_smoothing=0, distance_smoothing=0)
        assert segmentation.max() == len(np.unique(labels)) - 1
        assert mean_segmentation_accuracy(segmentation, labels) == 1.0
