"""build_dataset / train_val_datasets on the four real sets in ../shared/data and on tiny written sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.measure import label as connected

from hf_sam_peft.data import DataError, build_dataset, find_pairs, iter_rows, load_labels, train_val_datasets
from tests.conftest import shared_dataset

DSB = "dsb2018_stage1test_fluo_nuclei"
USIIGACI = "usiigaci_phase_contrast_cells"
HC18 = "hc18_fetal_head_ultrasound"
DROSOPHILA = "drosophila_vnc_sstem_mito_3d"
POSITION = re.compile(r"^(?P<base>.+)_y(?P<y>\d+)_x(?P<x>\d+)$")


def check_rows(ds, patch_shape=None, min_objects=1):
    """Shapes, dtypes, consecutive labels and unique ids of every row."""
    ids = []
    for row in ds:
        image, labels = row["image"], row["labels"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        assert labels.dtype == np.int32 and labels.shape == image.shape[:2]
        if patch_shape is not None:
            assert labels.shape == tuple(patch_shape)
        n = int(labels.max())
        assert n >= min_objects
        assert np.array_equal(np.unique(labels), np.arange(n + 1))
        assert Path(str(row["source"])).is_file()
        ids.append(str(row["id"]))
    assert len(ids) == len(set(ids))
    return ids


def test_dsb_grid_patches_cover_each_image_and_keep_uint8_values(tmp_path):
    root = shared_dataset(DSB)
    ds = build_dataset(root, patch_shape=(256, 256), min_size=0, with_objects_only=False, cache_dir=tmp_path)
    ids = check_rows(ds, (256, 256), min_objects=0)
    pairs = {p.id: p for p in find_pairs(root, "train")}
    coverage = {pid: np.zeros(load_labels(p.label_path).shape, bool) for pid, p in pairs.items()}
    for row_id in ids:
        match = POSITION.match(row_id)
        y, x = int(match["y"]), int(match["x"])
        coverage[match["base"]][y : y + 256, x : x + 256] = True
    assert all(c.all() for c in coverage.values())
    # 8-bit images are not stretched: the patch equals the file's pixels, in all three channels.
    row = ds[len(ds) - 1]
    match = POSITION.match(str(row["id"]))
    y, x = int(match["y"]), int(match["x"])
    source = np.asarray(Image.open(pairs[match["base"]].image_path))[y : y + 256, x : x + 256]
    for c in range(3):
        np.testing.assert_array_equal(row["image"][..., c], source)
    # min_size=0: the objects are the connected pieces of the file's ids (same foreground).
    file_labels = load_labels(pairs[match["base"]].label_path)[y : y + 256, x : x + 256]
    np.testing.assert_array_equal(row["labels"] > 0, file_labels > 0)
    assert row["labels"].max() >= len(np.unique(file_labels)) - 1


def test_dsb_whole_images_of_different_shapes(tmp_path):
    root = shared_dataset(DSB)
    ds = build_dataset(root, split="val", cache_dir=tmp_path)
    check_rows(ds)
    pairs = find_pairs(root, "val")
    assert [str(r) for r in ds["id"]] == [p.id for p in pairs]
    shapes = {tuple(row["labels"].shape) for row in ds}
    assert shapes == {tuple(load_labels(p.label_path).shape) for p in pairs} and len(shapes) == 2
    rows = list(iter_rows(root, split="val"))
    for row, plain in zip(ds, rows):
        np.testing.assert_array_equal(row["image"], plain["image"])
        np.testing.assert_array_equal(row["labels"], plain["labels"])


def test_min_size_filter(tmp_path):
    root = shared_dataset(DSB)
    small = build_dataset(root, max_images=3, min_size=0, cache_dir=tmp_path / "a")
    large = build_dataset(root, max_images=3, min_size=200, cache_dir=tmp_path / "b")
    n_small = sum(int(r["labels"].max()) for r in small)
    n_large = sum(int(r["labels"].max()) for r in large)
    assert n_large < n_small
    for row in large:
        sizes = np.bincount(row["labels"].ravel())[1:]
        assert sizes.min() >= 200


def test_random_patches_are_deterministic_per_seed(tmp_path):
    root = shared_dataset(USIIGACI)
    kwargs = dict(patch_shape=(512, 512), n_patches_per_image=3, max_images=1)
    first = build_dataset(root, seed=3, cache_dir=tmp_path / "a", **kwargs)
    again = build_dataset(root, seed=3, cache_dir=tmp_path / "b", **kwargs)
    other = build_dataset(root, seed=4, cache_dir=tmp_path / "c", **kwargs)
    ids = check_rows(first, (512, 512))
    assert len(first) == 3 and [str(i) for i in again["id"]] == ids
    np.testing.assert_array_equal(first[:]["image"], again[:]["image"])
    np.testing.assert_array_equal(first[:]["labels"], again[:]["labels"])
    assert [str(i) for i in other["id"]] != ids
    for row_id in ids:
        match = POSITION.match(row_id)
        assert 0 <= int(match["y"]) <= 1022 - 512 and 0 <= int(match["x"]) <= 1024 - 512
    # max_images does not change the patches drawn for an image (one generator per image id).
    more = build_dataset(root, seed=3, cache_dir=tmp_path / "d", **{**kwargs, "max_images": 2})
    assert [str(i) for i in more["id"]][:3] == ids


def test_objects_only_filter(tmp_path):
    root = shared_dataset(HC18)
    kwargs = dict(patch_shape=(256, 256), max_images=2)
    kept = build_dataset(root, with_objects_only=True, cache_dir=tmp_path / "a", **kwargs)
    every = build_dataset(root, with_objects_only=False, cache_dir=tmp_path / "b", **kwargs)
    check_rows(kept, (256, 256))
    counts = [int(r["labels"].max()) for r in every]
    assert len(every) > len(kept) and 0 in counts
    assert len(kept) == sum(c > 0 for c in counts)
    with pytest.raises(DataError, match="no rows"):
        build_dataset(root, min_size=10**7, cache_dir=tmp_path / "c", **kwargs)


def test_semantic_mode_on_hc18(tmp_path):
    root = shared_dataset(HC18)
    ds = build_dataset(root, patch_shape=(512, 512), label_mode="semantic", max_images=2, cache_dir=tmp_path)
    check_rows(ds, (512, 512))
    assert "semantic" in ds.column_names
    for row in ds:
        assert row["semantic"].dtype == np.int32 and set(np.unique(row["semantic"])) <= {0, 1}
        np.testing.assert_array_equal(row["semantic"] > 0, row["labels"] > 0)
    assert "semantic" not in build_dataset(root, max_images=1, cache_dir=tmp_path / "i").column_names


def test_volume_is_split_into_relabelled_slices(tmp_path):
    root = shared_dataset(DROSOPHILA)
    ds = build_dataset(root, split="val", min_size=0, with_objects_only=False, cache_dir=tmp_path)
    assert len(ds) == 20
    assert [str(i) for i in ds["id"]] == [f"stack1_q10_z{z:03d}" for z in range(20)]
    volume = load_labels(find_pairs(root, "val")[0].label_path)
    manifest = {m["split"]: m for m in json.loads((root / "manifest.json").read_text())}
    counts = []
    for z, row in enumerate(ds):
        labels = row["labels"]
        assert labels.shape == (512, 512)
        np.testing.assert_array_equal(labels > 0, volume[z] > 0)
        for k in range(1, int(labels.max()) + 1):
            assert connected(labels == k).max() == 1  # each object is one 2D piece
        counts.append(int(labels.max()))
    # The dataset's own per-slice 2D object counts; slice 0 has 12 pieces of 8 3D ids.
    assert counts == manifest["val"]["n_2d_objects_per_slice"]
    assert counts[0] > len(np.unique(volume[0])) - 1
    patches = build_dataset(root, patch_shape=(256, 256), cache_dir=tmp_path / "p")
    check_rows(patches, (256, 256))
    assert all(re.match(r"stack1_q00_z\d{3}_y\d+_x\d+$", str(i)) for i in patches["id"])


def test_train_val_from_folders(tmp_path):
    root = shared_dataset(USIIGACI)
    splits = train_val_datasets(root, patch_shape=(512, 512), n_patches_per_image=1, max_images=2, cache_dir=tmp_path)
    assert set(splits) == {"train", "val"}
    assert {Path(str(s)).parent.parent.name for s in splits["val"]["source"]} == {"val"}
    assert {Path(str(s)).parent.parent.name for s in splits["train"].slices["source"]} == {"train"}
    assert Path(splits["train"][0]["source"]).parent.parent.name == "train"
    assert len(splits["train"]) == 2 and len(splits["val"]) == 2
    fixed = train_val_datasets(root, patch_shape=(512, 512), n_patches_per_image=1, max_images=2, random_train=False,
                               cache_dir=tmp_path)
    assert len(fixed["train"]) == 2 and "id" in fixed["train"].column_names


def write_pair(root: Path, split: str, name: str, image: np.ndarray, labels: np.ndarray, image_ext: str = ".png"):
    for folder in ("images", "labels"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    image_path = root / split / "images" / f"{name}{image_ext}"
    if image_ext == ".png":
        Image.fromarray(image).save(image_path)
    else:
        tifffile.imwrite(image_path, image, photometric="minisblack")
    tifffile.imwrite(root / split / "labels" / f"{name}.tif", labels)
    return image_path


def tiny_labels(shape=(48, 64), offset=0):
    labels = np.zeros(shape, np.uint16)
    labels[4 + offset : 20 + offset, 4:20] = 1
    labels[30:44, 30:60] = 2
    return labels


def test_holdout_split_is_deterministic_and_disjoint(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        write_pair(tmp_path / "d", "train", f"img{i}", rng.integers(0, 255, (48, 64), dtype=np.uint8), tiny_labels())
    a = train_val_datasets(tmp_path / "d", val_fraction=0.2, seed=1, cache_dir=tmp_path / "a")
    b = train_val_datasets(tmp_path / "d", val_fraction=0.2, seed=1, cache_dir=tmp_path / "b")
    c = train_val_datasets(tmp_path / "d", val_fraction=0.2, seed=2, cache_dir=tmp_path / "c")
    assert len(a["train"]) == 8 and len(a["val"]) == 2
    assert set(a["train"].slice_ids).isdisjoint(map(str, a["val"]["id"]))
    assert list(map(str, a["val"]["id"])) == list(map(str, b["val"]["id"]))
    assert list(map(str, a["val"]["id"])) != list(map(str, c["val"]["id"]))
    write_pair(tmp_path / "one", "train", "only", np.zeros((48, 64), np.uint8), tiny_labels())
    with pytest.raises(DataError, match="cannot hold out"):
        train_val_datasets(tmp_path / "one", cache_dir=tmp_path / "e")


def test_rgb_grey_channel_first_and_padding(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    grey = rng.integers(0, 255, (48, 64), dtype=np.uint8)
    write_pair(tmp_path / "d", "train", "a_rgb", rgb, tiny_labels())
    write_pair(tmp_path / "d", "train", "b_grey", grey, tiny_labels())
    write_pair(tmp_path / "d", "train", "c_chw", np.moveaxis(rgb, -1, 0).copy(), tiny_labels(), image_ext=".tif")
    ds = build_dataset(tmp_path / "d", min_size=0, cache_dir=tmp_path / "c")
    rows = {str(r["id"]): r for r in ds}
    np.testing.assert_array_equal(rows["a_rgb"]["image"], rgb)
    np.testing.assert_array_equal(rows["c_chw"]["image"], rgb)
    for c in range(3):
        np.testing.assert_array_equal(rows["b_grey"]["image"][..., c], grey)
    padded = build_dataset(tmp_path / "d", patch_shape=(64, 80), cache_dir=tmp_path / "p")
    row = padded[0]
    assert row["image"].shape == (64, 80, 3) and str(row["id"]) == "a_rgb_y0_x0"
    np.testing.assert_array_equal(row["image"][:48, :64], rgb)
    assert not row["image"][48:].any() and not row["image"][:, 64:].any() and not row["labels"][48:].any()


def test_label_transform_cache_invalidation_and_option_checks(tmp_path):
    root = tmp_path / "d"
    write_pair(root, "train", "x", np.zeros((48, 64), np.uint8), tiny_labels())
    ds = build_dataset(root, min_size=0, label_transform=lambda l: (l == 2).astype(np.int32), cache_dir=tmp_path / "c")
    assert int(ds[0]["labels"].max()) == 1 and ds[0]["labels"][35, 40] == 1
    before = build_dataset(root, min_size=0, cache_dir=tmp_path / "c")[0]["labels"]
    tifffile.imwrite(root / "train" / "labels" / "x.tif", tiny_labels(offset=10))
    after = build_dataset(root, min_size=0, cache_dir=tmp_path / "c")[0]["labels"]
    assert not np.array_equal(before, after)  # the cache sees the edited file
    for bad in (dict(patch_shape=(0, 5)), dict(patch_shape=(5,)), dict(min_size=-1), dict(label_mode="boxes"),
                dict(n_patches_per_image=2), dict(max_images=0), dict(label_transform=3)):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            build_dataset(root, cache_dir=tmp_path / "c", **bad)


# --------------------------------------------------------------------------------------------- issue 15


def _nan_dataset(root: Path, split: str = "train", value: float = np.nan) -> Path:
    """Two float images, the second holding one non-finite pixel; returns the bad image's path."""
    rng = np.random.default_rng(0)
    write_pair(root, split, "a_good", rng.random((48, 64)).astype(np.float32), tiny_labels(), image_ext=".tif")
    bad = rng.random((48, 64)).astype(np.float32)
    bad[10, 10] = value
    return write_pair(root, split, "b_bad", bad, tiny_labels(), image_ext=".tif")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_images_stop_every_builder_with_one_line_naming_the_file(tmp_path, value):
    """build_dataset, train_val_datasets (fixed val rows and the training slices table), the training split
    without val/ and iter_rows (the evaluate path): one line `<path>: image holds NaN or inf values`, never
    datasets' multi-line DatasetGenerationError."""
    bad = _nan_dataset(tmp_path / "d", value=value)
    expected = f"{bad}: image holds NaN or inf values"
    calls = {
        "build_dataset": lambda: build_dataset(tmp_path / "d", min_size=0, cache_dir=tmp_path / "c1"),
        "patches": lambda: build_dataset(tmp_path / "d", patch_shape=(16, 16), cache_dir=tmp_path / "c2"),
        "holdout": lambda: train_val_datasets(tmp_path / "d", val_fraction=0.5, seed=0, cache_dir=tmp_path / "c3"),
        "iter_rows": lambda: list(iter_rows(tmp_path / "d", "train", min_size=0)),
    }
    for name, call in calls.items():
        with pytest.raises(DataError) as info:
            call()
        assert str(info.value) == expected, name
    # a bad training image with a clean val/ split: the training slices table is where it is found
    rng = np.random.default_rng(1)
    write_pair(tmp_path / "d", "val", "v", rng.random((48, 64)).astype(np.float32), tiny_labels(), image_ext=".tif")
    for random_train in (True, False):
        with pytest.raises(DataError) as info:
            train_val_datasets(tmp_path / "d", cache_dir=tmp_path / f"c{random_train}", random_train=random_train)
        assert str(info.value) == expected


def test_a_non_finite_slice_cached_before_the_check_names_its_file(tmp_path):
    """Training tables cached before files were checked may hold NaN: the served patch names the file."""
    from hf_sam_peft.data import DataOptions
    from hf_sam_peft.data.builder import _make_row

    image = np.random.default_rng(0).random((48, 64)).astype(np.float32)
    image[5, 5] = np.nan
    options = DataOptions(patch_shape=(16, 16), min_size=0)
    with pytest.raises(DataError, match=re.escape("some/file.tif: image holds NaN or inf values")):
        _make_row(image, tiny_labels(), (0, 0), options, "some/file.tif")
    row = _make_row(image, tiny_labels(), (16, 16), options, "some/file.tif")
    assert row["image"].dtype == np.uint8  # a patch without the bad pixel is fine


def test_errors_raised_while_generating_are_not_wrapped_by_datasets(tmp_path):
    """A ValueError / TypeError from inside the generator (here a label_transform) comes out as itself."""
    root = tmp_path / "d"
    write_pair(root, "train", "x", np.zeros((48, 64), np.uint8), tiny_labels())

    def transform(labels):
        raise ValueError("my transform cannot take this")

    with pytest.raises(ValueError, match="^my transform cannot take this$"):
        build_dataset(root, min_size=0, label_transform=transform, cache_dir=tmp_path / "c")
