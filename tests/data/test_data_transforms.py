"""normalize_image, to_instances and patch positions."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label as connected

from hf_sam_peft.data import grid_positions, grid_starts, normalize_image, to_instances
from hf_sam_peft.data.patches import crop, random_position


def test_normalize_uint8_grey_is_copied_to_three_channels_unchanged():
    image = np.random.default_rng(0).integers(10, 200, (12, 17), dtype=np.uint8)
    out = normalize_image(image)
    assert out.shape == (12, 17, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], image)  # no stretching of 8-bit data (micro-sam)


def test_normalize_other_dtypes_min_max_and_idempotent():
    rng = np.random.default_rng(1)
    image = rng.integers(1000, 40000, (16, 16), dtype=np.uint16)
    out = normalize_image(image)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    order = np.argsort(image.ravel(), kind="stable")
    assert np.all(np.diff(out[..., 0].ravel()[order].astype(int)) >= 0)  # monotonic
    np.testing.assert_array_equal(normalize_image(out), out)
    rgb = rng.random((8, 9, 3)).astype(np.float32) * 5 - 2
    out = normalize_image(rgb)
    expected = np.round((rgb - rgb.min()) / (rgb.max() - rgb.min()) * 255)
    np.testing.assert_allclose(out, expected, atol=1)  # joint scaling over channels, not per channel
    np.testing.assert_array_equal(normalize_image(np.full((4, 4), 3.5)), np.zeros((4, 4, 3), np.uint8))
    np.testing.assert_array_equal(normalize_image(out[..., :1]), normalize_image(out[..., 0]))


def test_normalize_percentiles_clip_outliers():
    image = np.tile(np.arange(100, dtype=np.float32), (2, 1))
    image[0, 0] = 1e6
    out = normalize_image(image, percentiles=(1, 99))
    assert out.max() == 255 and out.min() == 0
    assert (out[..., 0] == 255).sum() > 1  # the outlier no longer squeezes the rest to 0


@pytest.mark.parametrize(
    "bad, error",
    [(np.zeros((4, 4, 2)), ValueError), (np.zeros((2, 4, 4, 3)), ValueError), ([[1, 2]], TypeError)],
)
def test_normalize_rejects_bad_input(bad, error):
    with pytest.raises(error):
        normalize_image(bad)
    with pytest.raises(ValueError, match="percentiles"):
        normalize_image(np.zeros((4, 4)), percentiles=(50, 10))
    with pytest.raises(ValueError, match="NaN"):
        normalize_image(np.array([[np.nan, 1.0]]))


def test_to_instances_splits_pieces_drops_small_and_numbers_consecutively():
    labels = np.zeros((20, 20), np.uint16)
    labels[1:6, 1:6] = 7  # 25 px
    labels[10:15, 10:15] = 7  # same id, second piece -> second object
    labels[1:3, 15:18] = 9  # 6 px -> removed
    labels[16:20, 0:10] = 300
    labels[16:20, 10:14] = 301  # touches 300 but is a different id -> separate object
    out = to_instances(labels, min_size=25)
    assert out.dtype == np.int32
    assert sorted(np.unique(out).tolist()) == [0, 1, 2, 3]
    assert out[1, 1] != out[10, 10] and out[1, 1] > 0 and out[10, 10] > 0
    assert out[1, 15] == 0
    assert out[17, 5] != out[17, 12]
    for k in range(1, 4):
        assert connected(out == k).max() == 1
    assert to_instances(labels, min_size=0).max() == 5


def test_to_instances_semantic_classes_become_objects():
    semantic = np.zeros((10, 30), np.uint8)
    semantic[2:8, 2:8] = 1
    semantic[2:8, 12:18] = 1
    semantic[2:8, 22:28] = 2
    out = to_instances(semantic)
    assert out.max() == 3
    np.testing.assert_array_equal(out > 0, semantic > 0)
    with pytest.raises(ValueError, match="min_size"):
        to_instances(semantic, min_size=-1)
    with pytest.raises(TypeError):
        to_instances(semantic.astype(np.float32))


@pytest.mark.parametrize("size, patch", [(1024, 512), (1022, 512), (540, 512), (696, 256), (256, 256), (100, 256)])
def test_grid_starts_cover_the_axis_with_fewest_patches(size, patch):
    starts = grid_starts(size, patch)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert len(starts) == max(1, -(-size // patch))
    if size >= patch:
        assert starts[-1] + patch == size
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + patch] = True
        assert covered.all()


def test_grid_positions_random_position_and_crop_padding():
    assert grid_positions((540, 800), (512, 512)) == [(0, 0), (0, 288), (28, 0), (28, 288)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        y, x = random_position((300, 700), (256, 512), rng)
        assert 0 <= y <= 44 and 0 <= x <= 188
    assert random_position((100, 100), (256, 256), rng) == (0, 0)
    image = np.ones((100, 120, 3), np.uint8)
    patch = crop(image, (0, 0), (128, 128))
    assert patch.shape == (128, 128, 3) and patch[:100, :120].all() and not patch[100:].any()
