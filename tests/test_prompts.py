"""Prompt and correction samplers: where points land, what boxes contain, fallbacks, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_sam_peft.prompts import (
    NEGATIVE_MARGIN,
    boxes_from_masks,
    correction_points,
    sample_objects,
    sample_point_prompts,
)
from tests.conftest import shared_dataset


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def at(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values of ``masks`` (N, H, W) at the (x, y) points (N, P, 2) -> (N, P)."""
    n = torch.arange(masks.shape[0])[:, None]
    return masks[n, points[..., 1].long(), points[..., 0].long()]


def disk_masks() -> torch.Tensor:
    """Three objects in a 64x80 image: two disks and a rectangle."""
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(80), indexing="ij")
    disk1 = (ys - 20) ** 2 + (xs - 20) ** 2 <= 36
    disk2 = (ys - 40) ** 2 + (xs - 55) ** 2 <= 100
    rect = (ys >= 50) & (ys < 58) & (xs >= 5) & (xs < 30)
    return torch.stack([disk1, disk2, rect])


@pytest.fixture
def dsb_labels() -> list[torch.Tensor]:
    import tifffile

    folder = shared_dataset("dsb2018_stage1test_fluo_nuclei") / "train" / "labels"
    files = sorted(folder.glob("*.tif"))[:3]
    return [torch.from_numpy(tifffile.imread(f).astype(np.int64)) for f in files]


def test_sample_objects_real_labels(dsb_labels):
    masks = sample_objects(dsb_labels, 7, gen())
    assert [m.shape for m in masks] == [(7, *lab.shape) for lab in dsb_labels]
    for lab, objs in zip(dsb_labels, masks):
        ids = [int(torch.unique(lab[m])[0]) for m in objs]
        assert all(len(torch.unique(lab[m])) == 1 for m in objs)  # each mask is exactly one instance
        assert len(set(ids)) == 7 and 0 not in ids  # without replacement, never background
        assert all(torch.equal(m, lab == i) for m, i in zip(objs, ids))
    again = sample_objects(dsb_labels, 7, gen())
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
    other = sample_objects(dsb_labels, 7, gen(1))
    assert not all(torch.equal(a, b) for a, b in zip(masks, other))


def test_sample_objects_cuts_to_smallest_count():
    a = torch.zeros(8, 8, dtype=torch.long)
    a[0, 0], a[2, 2], a[4, 4] = 1, 2, 3
    b = torch.zeros(8, 8, dtype=torch.long)
    b[1, 1], b[5, 5] = 4, 9
    masks = sample_objects(torch.stack([a, b]), 25, gen())
    assert [m.shape[0] for m in masks] == [2, 2]
    assert [m.shape[0] for m in sample_objects([a, b], None, gen())] == [2, 2]
    assert sorted(int(b[m].item()) for m in sample_objects([b], None, gen())[0]) == [4, 9]
    with pytest.raises(ValueError, match="n_objects"):
        sample_objects([a], 0)
    with pytest.raises(ValueError, match="labels"):
        sample_objects(torch.zeros(8, 8), 2)


def test_point_prompts_positives_inside_negatives_outside():
    masks = disk_masks()
    points, labels = sample_point_prompts(masks, 3, 4, gen())
    assert points.shape == (3, 7, 2) and labels.shape == (3, 7)
    assert labels[:, :3].eq(1).all() and labels[:, 3:].eq(0).all()
    assert at(masks, points[:, :3]).all()
    assert not at(masks, points[:, 3:]).any()
    # disks: negatives outside the object dilated by the margin, inside its box widened by the margin
    # (the rectangle dilated by the margin fills its widened box: its negatives fall back to the background)
    masks, points = masks[:2], points[:2]
    dilated = F.max_pool2d(masks[:, None].float(), 2 * NEGATIVE_MARGIN + 1, 1, NEGATIVE_MARGIN)[:, 0].bool()
    assert not at(dilated, points[:, 3:]).any()
    boxes = boxes_from_masks(masks, jitter=0.0)
    x, y = points[:, 3:, 0], points[:, 3:, 1]
    assert (x >= boxes[:, None, 0] - NEGATIVE_MARGIN).all() and (x < boxes[:, None, 2] + NEGATIVE_MARGIN).all()
    assert (y >= boxes[:, None, 1] - NEGATIVE_MARGIN).all() and (y < boxes[:, None, 3] + NEGATIVE_MARGIN).all()
    # positives are drawn without replacement
    assert all(len({tuple(p) for p in obj.tolist()}) == 3 for obj in points[:, :3])
    assert all(len({tuple(p) for p in obj.tolist()}) == 4 for obj in points[:, 3:])


def test_point_prompts_reproducible_and_batched():
    masks = disk_masks()
    first = sample_point_prompts(masks, 2, 2, gen(3))
    assert all(torch.equal(a, b) for a, b in zip(first, sample_point_prompts(masks, 2, 2, gen(3))))
    assert not torch.equal(first[0], sample_point_prompts(masks, 2, 2, gen(4))[0])
    batched, labels = sample_point_prompts(torch.stack([masks, masks]), 1, 1, gen())
    assert batched.shape == (2, 3, 2, 2) and labels.shape == (2, 3, 2)


def test_point_prompts_fallbacks():
    tiny = torch.zeros(1, 20, 20, dtype=torch.bool)
    tiny[0, 5, 7] = True  # one pixel: all positives repeat it
    points, _ = sample_point_prompts(tiny, 3, 0, gen())
    assert points[0].tolist() == [[7.0, 5.0]] * 3
    big = torch.ones(1, 20, 20, dtype=torch.bool)
    big[0, 19, 19] = False  # no ring left around the object: negatives fall back to the background
    points, labels = sample_point_prompts(big, 0, 2, gen())
    assert points[0].tolist() == [[19.0, 19.0]] * 2 and labels.eq(0).all()
    with pytest.raises(ValueError, match="at least one pixel"):
        sample_point_prompts(torch.zeros(1, 4, 4, dtype=torch.bool), 1, 0)
    with pytest.raises(ValueError, match="n_pos"):
        sample_point_prompts(big, 0, 0)


def test_positive_points_cover_the_object():
    """Over many draws every pixel of a small object is hit (no centre bias, no unreachable pixels)."""
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 3:6, 4:7] = True
    g = gen()
    hits = {tuple(sample_point_prompts(mask, 1, 0, g)[0][0, 0].tolist()) for _ in range(200)}
    assert hits == {(float(x), float(y)) for y in range(3, 6) for x in range(4, 7)}


def test_boxes_exact_and_jittered():
    masks = disk_masks()
    exact = boxes_from_masks(masks, jitter=0.0)
    assert exact.tolist() == [[14, 14, 27, 27], [45, 30, 66, 51], [5, 50, 30, 58]]  # exclusive maxima
    jittered = boxes_from_masks(masks, 0.025, gen())
    side = torch.stack([exact[:, 2] - exact[:, 0], exact[:, 3] - exact[:, 1]] * 2, dim=1)
    grow = (jittered - exact) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert (grow >= 0).all() and (grow <= (0.025 * side).round() + 1).all()  # pushed out, never in
    assert torch.equal(jittered, boxes_from_masks(masks, 0.025, gen()))
    big = boxes_from_masks(masks, 0.5, gen(2))
    assert (big[:, :2] >= 0).all() and (big[:, 2] <= 80).all() and (big[:, 3] <= 64).all()  # clipped
    assert not torch.equal(big, exact)


def test_correction_points_in_error_regions():
    gt = disk_masks()
    pred = gt.clone()
    pred[0, 14:18, :] = False  # false negatives in object 0
    pred[1, 0:3, 0:5] = True  # false positives for object 1
    points, labels = correction_points(pred, gt, gen())
    assert points.shape == (3, 2, 2) and labels.tolist() == [[1, 0]] * 3
    fn, fp = gt & ~pred, pred & ~gt
    assert at(fn[:1], points[:1, :1]).all()
    assert at(fp[1:2], points[1:2, 1:]).all()
    # fallbacks: no false negatives -> a true positive; no false positives -> the box widened by 3 px minus gt
    assert at(gt[1:], points[1:, :1]).all()
    ring_x, ring_y = points[[0, 2], 1, 0], points[[0, 2], 1, 1]
    boxes = boxes_from_masks(gt[[0, 2]], jitter=0.0)
    assert not at(gt[[0, 2]], points[[0, 2], 1:]).any()
    assert ((ring_x >= boxes[:, 0] - 3) & (ring_x < boxes[:, 2] + 3)).all()
    assert ((ring_y >= boxes[:, 1] - 3) & (ring_y < boxes[:, 3] + 3)).all()
    again = correction_points(pred, gt, gen())
    assert torch.equal(points, again[0])


def test_correction_points_background_fallback_and_validation():
    gt = torch.ones(1, 6, 6, dtype=torch.bool)
    gt[0, 5, 5] = False  # the widened box holds nothing but the object: negative goes to the background
    points, _ = correction_points(gt.clone(), gt, gen())
    assert points[0, 1].tolist() == [5.0, 5.0]
    with pytest.raises(ValueError, match="same shape"):
        correction_points(gt[0], gt)
    with pytest.raises(ValueError, match="at least one pixel"):
        correction_points(gt, torch.zeros_like(gt))


def test_single_pick_is_uniform_over_the_first_nonempty_region_and_builds_fallbacks_lazily():
    from hf_sam_peft.prompts import _pick_one

    region = torch.zeros(3, 12, dtype=torch.bool)
    region[0, [1, 4, 7, 10]] = True  # row 0: four candidate pixels
    region[2, 5] = True  # row 2: one; row 1: empty -> fallback
    fallback = torch.zeros(3, 12, dtype=torch.bool)
    fallback[:, 11] = True
    calls = []

    def lazy() -> torch.Tensor:
        calls.append(1)
        return fallback

    generator = gen(3)
    picks = torch.cat([_pick_one([region, lazy], generator) for _ in range(4000)], dim=1)
    counts = torch.bincount(picks[0], minlength=12)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 4, 7, 10}
    assert counts[[1, 4, 7, 10]].min() > 850 and counts[[1, 4, 7, 10]].max() < 1150  # ~1000 each
    assert (picks[1] == 11).all() and (picks[2] == 5).all()
    assert len(calls) == 4000  # built only because row 1 needed it ...
    calls.clear()
    _pick_one([region[[0, 2]], lazy], gen())
    assert not calls  # ... and not at all when every row has a pixel in the first region
    with pytest.raises(ValueError, match="no pixel available"):
        _pick_one([torch.zeros(2, 5, dtype=torch.bool)], gen())


def test_row_counts_per_row_and_in_one_reduction_agree():
    """The CPU's row-by-row count and the one-reduction count GPUs get: the same integers, and the same picks."""
    from hf_sam_peft.prompts import _pick_one, _row_counts
    from hf_sam_peft.row_loops import force_row_by_row, row_by_row

    masks = torch.rand(25, 64 * 64, generator=gen(5)) < torch.linspace(0, 1, 25)[:, None]
    masks[3] = False
    expected = masks.sum(-1)
    assert row_by_row(masks)  # the default on a CPU
    picks = {}
    for per_row in (True, False):
        with force_row_by_row(per_row):
            assert row_by_row(masks) is per_row
            assert torch.equal(_row_counts(masks), expected)
            assert _row_counts(masks[:0]).shape == (0,)
            picks[per_row] = _pick_one([masks, torch.ones_like(masks)], gen(6))
    assert torch.equal(picks[True], picks[False])
    assert row_by_row(masks)  # restored
    with pytest.raises(TypeError, match="enabled"):
        with force_row_by_row("yes"):
            pass


# ------------------------------------------------------------------------------------------ centre points


def test_center_of_a_disc_and_a_rectangle():
    from hf_sam_peft.prompts import center_points

    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(50), indexing="ij")
    disc = (xx - 21) ** 2 + (yy - 17) ** 2 <= 8**2
    rect = torch.zeros(40, 50, dtype=torch.bool)
    rect[5:16, 30:45] = True  # 11 x 15: 6 px from the boundary on row 10, cols 35..39; the first wins
    points, labels = center_points(torch.stack([disc, rect]))
    assert points.shape == (2, 1, 2) and points.dtype == torch.float32
    assert labels.shape == (2, 1) and labels.eq(1).all() and labels.dtype == torch.long
    assert points[:, 0].tolist() == [[21.0, 17.0], [35.0, 10.0]]
    square = torch.zeros(40, 50, dtype=torch.bool)
    square[5:16, 30:41] = True  # 11 x 11: one centre
    assert center_points(square)[0].tolist() == [[35.0, 10.0]]


def test_center_ties_go_to_the_first_pixel_in_raster_order():
    from hf_sam_peft.prompts import center_points

    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[4:8, 6:14] = True  # 4 rows x 8 cols: rows 5 and 6, cols 7..12 all lie 2 px from the boundary
    points, _ = center_points(mask)
    assert points.tolist() == [[7.0, 5.0]]
    two = torch.zeros(20, 20, dtype=torch.bool)
    two[12:15, 2:5] = True  # two equal squares: the upper-left one wins
    two[2:5, 12:15] = True
    assert center_points(two)[0].tolist() == [[13.0, 3.0]]


def test_center_of_an_object_touching_the_border_stays_off_the_border():
    from hf_sam_peft.prompts import center_points

    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[:, :9] = True  # a strip along the left border: the border counts as boundary, so x = 4
    mask[0:5, 20:30] = True  # and a block in the top-right corner (a second blob: still one object)
    full = torch.ones(7, 7, dtype=torch.bool)  # an object filling the image: its middle
    points, _ = center_points(mask)
    assert points.tolist() == [[4.0, 4.0]]  # 5 px from the border and the strip's edge; first row of the plateau
    assert center_points(full)[0].tolist() == [[3.0, 3.0]]


def test_center_is_always_inside_the_object_and_handles_leading_dims():
    from hf_sam_peft.prompts import center_points

    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    ring = ((xx - 32) ** 2 + (yy - 32) ** 2 <= 20**2) & ((xx - 32) ** 2 + (yy - 32) ** 2 >= 12**2)
    crescent = ((xx - 30) ** 2 + (yy - 30) ** 2 <= 15**2) & ((xx - 38) ** 2 + (yy - 30) ** 2 > 12**2)
    noise = torch.rand(64, 64, generator=generator) > 0.6
    noise[0, 0] = True
    single = torch.zeros(64, 64, dtype=torch.bool)
    single[63, 0] = True
    masks = torch.stack([ring, crescent, noise, single]).reshape(2, 2, 64, 64)
    points, labels = center_points(masks)
    assert points.shape == (2, 2, 1, 2) and labels.shape == (2, 2, 1)
    flat, xy = masks.reshape(4, 64, 64), points.reshape(4, 2).long()
    assert all(bool(flat[i, xy[i, 1], xy[i, 0]]) for i in range(4))
    assert xy[3].tolist() == [0, 63]
    with pytest.raises(ValueError, match="at least one pixel"):
        center_points(torch.zeros(1, 8, 8, dtype=torch.bool))


def test_center_points_are_fast_for_many_objects():
    import time

    from hf_sam_peft.prompts import center_points

    labels = torch.zeros(1024, 1024, dtype=torch.long)
    for i in range(100):
        y, x = divmod(i, 10)
        labels[y * 100 + 10 : y * 100 + 60, x * 100 + 5 : x * 100 + 70] = i + 1
    masks = labels[None] == torch.arange(1, 101)[:, None, None]
    start = time.perf_counter()
    points, _ = center_points(masks)
    assert time.perf_counter() - start < 5.0  # ~0.1 s on 2 CPU cores
    assert points[0, 0].tolist() == [29.0, 34.0]  # rows 10..59, cols 5..69: plateau on row 34, first col 29
