"""Reading files and every bad-data case: errors must name the offending file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from hf_sam_peft.data import DataError, build_dataset, find_pairs, load_image, load_labels, load_pair


def write_pair(root: Path, split: str, name: str, image: np.ndarray, labels: np.ndarray, image_ext: str = ".tif"):
    """Write one image/label pair in the dataset layout; returns (image_path, label_path)."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "labels").mkdir(parents=True, exist_ok=True)
    image_path = root / split / "images" / f"{name}{image_ext}"
    label_path = root / split / "labels" / f"{name}.tif"
    if image_ext == ".png":
        Image.fromarray(image).save(image_path)
    else:
        tifffile.imwrite(image_path, image)
    tifffile.imwrite(label_path, labels)
    return image_path, label_path


def blob_labels(shape=(32, 40), dtype=np.uint16) -> np.ndarray:
    labels = np.zeros(shape, dtype=dtype)
    labels[2:12, 3:13] = 1
    labels[15:30, 20:35] = 2
    return labels


def test_load_image_grey_rgb_rgba_palette_png(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g.png"), grey)
    np.testing.assert_array_equal(load_image(tmp_path / "c.png"), rgb)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)  # alpha dropped
    palette = load_image(tmp_path / "p.png")
    assert palette.shape == (20, 30, 3) and palette.dtype == np.uint8


def test_load_image_channel_first_and_volumes(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 60000, (20, 30, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "cf.tif", np.moveaxis(rgb, -1, 0), photometric="minisblack")
    np.testing.assert_array_equal(load_image(tmp_path / "cf.tif"), rgb)
    # A 3-slice grey volume looks like channel-first RGB; the label shape decides.
    volume = rng.integers(0, 255, (3, 20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "v3.tif", volume, photometric="minisblack")
    assert load_image(tmp_path / "v3.tif").shape == (20, 30, 3)
    np.testing.assert_array_equal(load_image(tmp_path / "v3.tif", spatial_shape=(3, 20, 30)), volume)
    # Z x H x W and Z x C x H x W volumes.
    tifffile.imwrite(tmp_path / "v.tif", rng.random((5, 20, 30), dtype=np.float32))
    assert load_image(tmp_path / "v.tif").shape == (5, 20, 30)
    zchw = rng.integers(0, 255, (5, 3, 20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "zc.tif", zchw, photometric="minisblack")
    np.testing.assert_array_equal(load_image(tmp_path / "zc.tif"), np.moveaxis(zchw, 1, -1))


def test_load_image_rejects_two_channels(tmp_path):
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((5, 2, 20, 30), np.uint8))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "two.tif"))):
        load_image(tmp_path / "two.tif")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint32])
def test_load_labels_keeps_integer_dtypes(tmp_path, dtype):
    labels = blob_labels(dtype=dtype)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    out = load_labels(tmp_path / "l.tif")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, labels)


def test_load_labels_float_bool_and_singleton_axes(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", blob_labels().astype(np.float32))
    out = load_labels(tmp_path / "f.tif")
    assert np.issubdtype(out.dtype, np.integer)
    np.testing.assert_array_equal(out, blob_labels())
    tifffile.imwrite(tmp_path / "s.tif", blob_labels()[None])
    assert load_labels(tmp_path / "s.tif").shape == (32, 40)
    Image.fromarray(blob_labels(dtype=np.uint8) > 0).save(tmp_path / "b.png")
    binary = load_labels(tmp_path / "b.png")
    assert binary.dtype == np.uint8 and set(np.unique(binary)) == {0, 1}


@pytest.mark.parametrize(
    "labels, message",
    [
        (blob_labels().astype(np.float32) + 0.5, "non-integer float"),
        (blob_labels().astype(np.int32) - 1, "negative"),
    ],
)
def test_load_labels_rejects_bad_values(tmp_path, labels, message):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, labels)
    with pytest.raises(DataError, match=message) as info:
        load_labels(path)
    assert str(path) in str(info.value)


def test_load_labels_rejects_colour_png(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="one channel") as info:
        load_labels(tmp_path / "rgb.png")
    assert str(tmp_path / "rgb.png") in str(info.value)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_corrupt_and_missing_files_name_the_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"this is not an image at all")
    for reader in (load_image, load_labels):
        with pytest.raises(DataError, match="could not read") as info:
            reader(path)
        assert str(path) in str(info.value)
    with pytest.raises(DataError, match="not found") as info:
        load_image(tmp_path / "absent.tif")
    assert str(tmp_path / "absent.tif") in str(info.value)


def test_find_pairs_sorted_and_ignores_other_files(tmp_path):
    for name in ("b", "a"):
        write_pair(tmp_path, "train", name, np.zeros((32, 40), np.uint8), blob_labels())
    (tmp_path / "train" / "images" / "README.txt").write_text("notes")
    (tmp_path / "train" / "images" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "train" / "labels" / "orphan.tif").write_bytes(b"x")
    pairs = find_pairs(tmp_path, "train")
    assert [p.id for p in pairs] == ["a", "b"]
    assert pairs[0].label_path == tmp_path / "train" / "labels" / "a.tif"


def test_missing_label_file_names_the_image(tmp_path):
    image_path, label_path = write_pair(tmp_path, "train", "x", np.zeros((32, 40), np.uint8), blob_labels())
    write_pair(tmp_path, "train", "y", np.zeros((32, 40), np.uint8), blob_labels())
    label_path.unlink()
    for call in (lambda: find_pairs(tmp_path, "train"), lambda: build_dataset(tmp_path, cache_dir=tmp_path / "c")):
        with pytest.raises(DataError, match="no label file") as info:
            call()
        assert str(image_path) in str(info.value)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "labels").mkdir()
    with pytest.raises(DataError, match="no images") as info:
        build_dataset(tmp_path, cache_dir=tmp_path / "c")
    assert str(tmp_path / "train" / "images") in str(info.value)
    with pytest.raises(DataError, match="split folder"):
        find_pairs(tmp_path, "val")
    with pytest.raises(DataError, match="does not exist"):
        find_pairs(tmp_path / "nowhere", "train")
    (tmp_path / "test" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "test" / "labels"))):
        find_pairs(tmp_path, "test")


def test_shape_mismatch_names_the_image(tmp_path):
    image_path, _ = write_pair(tmp_path, "train", "m", np.zeros((30, 40), np.uint8), blob_labels())
    pairs = find_pairs(tmp_path, "train")
    with pytest.raises(DataError, match="does not match its label shape") as info:
        load_pair(pairs[0])
    assert str(image_path) in str(info.value)
    with pytest.raises(DataError, match=re.escape(str(image_path))):
        build_dataset(tmp_path, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("case", ["float", "negative", "corrupt"])
def test_bad_files_inside_build_raise_data_error_naming_the_file(tmp_path, case):
    write_pair(tmp_path, "train", "good", np.zeros((32, 40), np.uint8), blob_labels())
    labels = {"float": blob_labels().astype(np.float64) * 0.3, "negative": blob_labels().astype(np.int16) - 3}
    _, label_path = write_pair(tmp_path, "train", "zbad", np.zeros((32, 40), np.uint8), labels.get(case, blob_labels()))
    if case == "corrupt":
        label_path.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError) as info:
        build_dataset(tmp_path, min_size=0, cache_dir=tmp_path / "c")
    assert str(label_path) in str(info.value)


def test_duplicate_ids_are_rejected(tmp_path):
    write_pair(tmp_path, "train", "d", np.zeros((32, 40), np.uint8), blob_labels())
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(tmp_path / "train" / "images" / "d.png")
    with pytest.raises(DataError, match="share the id 'd'"):
        find_pairs(tmp_path, "train")


# --------------------------------------------------------------------------------------------- issue 15


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_non_finite_image_is_one_line_naming_the_file(tmp_path, value, dtype):
    image = np.random.default_rng(0).random((32, 40)).astype(dtype)
    image[3, 4] = value
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, image)
    with pytest.raises(DataError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: image holds NaN or inf values"
    rgb = np.repeat(image[..., None], 3, axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    with pytest.raises(DataError, match="NaN or inf"):
        load_image(tmp_path / "rgb.tif", spatial_shape=(32, 40))
    image[3, 4] = 0.5  # finite floats are fine
    tifffile.imwrite(path, image)
    assert load_image(path).dtype == dtype


def test_bool_tiff_labels_and_images_read_as_uint8(tmp_path):
    """load_labels promises "bool becomes uint8": also for a TIFF that tifffile wrote from a bool array (a
    bilevel TIFF, read back as bool), in 2D and 3D; load_image and image_dtype_of agree."""
    from hf_sam_peft.data.io import image_dtype_of, spatial_shape_of

    mask = blob_labels() > 0
    tifffile.imwrite(tmp_path / "b.tif", mask)
    assert tifffile.imread(tmp_path / "b.tif").dtype == bool  # the case being tested
    labels = load_labels(tmp_path / "b.tif")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, mask.astype(np.uint8))
    volume = np.stack([mask, ~mask, np.zeros_like(mask)])
    tifffile.imwrite(tmp_path / "v.tif", volume)
    labels = load_labels(tmp_path / "v.tif")
    assert labels.dtype == np.uint8 and labels.shape == (3, 32, 40)
    np.testing.assert_array_equal(labels, volume.astype(np.uint8))
    assert spatial_shape_of(tmp_path / "v.tif") == (3, 32, 40)
    image = load_image(tmp_path / "b.tif")
    assert image.dtype == np.uint8 and image_dtype_of(tmp_path / "b.tif") == np.uint8
    # a whole dataset of bool label TIFFs builds
    write_pair(tmp_path / "d", "train", "m", np.zeros((32, 40), np.uint8), mask)
    ds = build_dataset(tmp_path / "d", min_size=0, cache_dir=tmp_path / "c")
    assert len(ds) == 1 and ds[0]["labels"].max() == 2  # two blobs -> two objects


def _dangling(folder: Path, name: str) -> Path:
    link = folder / name
    link.symlink_to(folder / "missing_target.tif")
    return link


def _looping(folder: Path, name: str) -> Path:
    link = folder / name
    other = folder / f".{name}.loop"
    link.symlink_to(other)
    other.symlink_to(link)
    return link


@pytest.mark.parametrize("make", [_dangling, _looping], ids=["dangling", "looping"])
@pytest.mark.parametrize("folder", ["images", "labels"])
def test_broken_symlinks_in_data_folders_are_errors_naming_them(tmp_path, make, folder):
    """A broken image / label symlink is an error naming it, never a silently smaller dataset."""
    write_pair(tmp_path, "train", "a", np.zeros((32, 40), np.uint8), blob_labels())
    write_pair(tmp_path, "train", "b", np.zeros((32, 40), np.uint8), blob_labels())
    (tmp_path / "train" / folder / ("b.tif")).unlink()
    link = make(tmp_path / "train" / folder, "b.tif")
    expected = "dangling symlink" if make is _dangling else "symlink that loops"
    for call in (lambda: find_pairs(tmp_path, "train"), lambda: build_dataset(tmp_path, cache_dir=tmp_path / "c")):
        with pytest.raises(DataError, match=expected) as info:
            call()
        assert str(link) in str(info.value) and "\n" not in str(info.value)
    reader = load_image if folder == "images" else load_labels
    with pytest.raises(DataError, match=expected):
        reader(link)


def test_working_symlinks_and_broken_links_with_other_suffixes(tmp_path):
    """Valid symlinks are followed; a broken link that is not named like a data file is ignored as before."""
    image_path, label_path = write_pair(tmp_path / "real", "train", "a", np.zeros((32, 40), np.uint8), blob_labels())
    for folder in ("images", "labels"):
        (tmp_path / "d" / "train" / folder).mkdir(parents=True)
    (tmp_path / "d" / "train" / "images" / "a.tif").symlink_to(image_path)
    (tmp_path / "d" / "train" / "labels" / "a.tif").symlink_to(label_path)
    _dangling(tmp_path / "d" / "train" / "images", "notes.txt")
    _dangling(tmp_path / "d" / "train" / "images", ".hidden.tif")
    assert [p.id for p in find_pairs(tmp_path / "d", "train")] == ["a"]
