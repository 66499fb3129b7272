"""NIfTI (.nii / .nii.gz) images and labels read directly: axes, pairing by id, pair checks, optional nibabel.

Files are written with nibabel into tmp_path. Volumes are built in our order ``(z, y, x)`` and written as
``volume.T`` (nibabel's ``(x, y, z)``); shapes are asymmetric (4 x 32 x 24) so that a wrong axis order fails.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="nibabel is the optional NIfTI reader (pip install 'hf-sam-peft[nifti]')")

from hf_sam_peft.data import (
    DataError, build_dataset, find_pairs, load_image, load_labels, load_pair, train_val_datasets,
)
from hf_sam_peft.data.io import file_id, image_dtype_of, spatial_shape_of, suffix_of

SHAPE = (4, 32, 24)  # (z, y, x) = Z x H x W


def write_nifti(
    path: Path, volume_zyx: np.ndarray, affine: np.ndarray | None = None, slope: float | None = None
) -> Path:
    """Write a (z, y, x[, c]) array as NIfTI, i.e. nibabel's (x, y, z[, c]) order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = tuple(range(min(volume_zyx.ndim, 3) - 1, -1, -1)) + tuple(range(3, volume_zyx.ndim))
    image = nib.Nifti1Image(volume_zyx.transpose(axes), np.eye(4) if affine is None else affine)
    image.header.set_data_dtype(volume_zyx.dtype)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    nib.save(image, path)
    return path


def make_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 MRI-like image and uint8 labels with objects in slices 1 and 3 only (0 and 2 are empty)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-500, 1500, SHAPE).astype(np.int16)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 4:14, 3:9] = 1
    labels[3, 18:30, 10:22] = 2
    return image, labels


def write_case(root: Path, split: str, case: str, suffix: str = ".nii.gz", seed: int = 0,
               label_affine: np.ndarray | None = None, label_shape: tuple[int, ...] | None = None) -> tuple[Path, Path]:
    image, labels = make_volume(seed)
    if label_shape is not None:
        labels = np.zeros(label_shape, np.uint8)
    image_path = write_nifti(root / split / "images" / f"{case}{suffix}", image)
    label_path = write_nifti(root / split / "labels" / f"{case}{suffix}", labels, affine=label_affine)
    return image_path, label_path


@pytest.mark.parametrize("suffix, compressed", [(".nii", False), (".nii.gz", True)])
def test_reads_nifti_as_z_y_x(tmp_path, suffix, compressed):
    image, labels = make_volume()
    image_path = write_nifti(tmp_path / f"image{suffix}", image)
    label_path = write_nifti(tmp_path / f"labels{suffix}", labels)
    with open(image_path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == compressed  # the case really is (un)compressed
    read = load_image(image_path)
    assert read.shape == SHAPE and read.dtype == np.int16
    np.testing.assert_array_equal(read, image)
    # the documented mapping in nibabel's terms: slice z of ours is nibabel's [:, :, z], transposed to (y, x)
    on_disk = np.asanyarray(nib.load(image_path).dataobj)
    assert on_disk.shape == (24, 32, 4)
    for z in range(SHAPE[0]):
        np.testing.assert_array_equal(read[z], on_disk[:, :, z].T)
    read_labels = load_labels(label_path)
    np.testing.assert_array_equal(read_labels, labels)
    assert np.issubdtype(read_labels.dtype, np.integer)
    # the header-only functions agree with what the readers return
    assert spatial_shape_of(label_path) == SHAPE
    assert image_dtype_of(image_path) == read.dtype


def test_header_dtype_follows_nibabel_scaling(tmp_path):
    """image_dtype_of decides whether the training table stores uint8: it must match the scaled read."""
    plain = write_nifti(tmp_path / "plain.nii.gz", np.arange(96, dtype=np.uint8).reshape(4, 4, 6))
    scaled = write_nifti(tmp_path / "scaled.nii.gz", np.arange(96, dtype=np.uint8).reshape(4, 4, 6), slope=2.0)
    assert image_dtype_of(plain) == load_image(plain).dtype == np.uint8
    assert image_dtype_of(scaled) == load_image(scaled).dtype and np.issubdtype(image_dtype_of(scaled), np.floating)
    np.testing.assert_array_equal(load_image(scaled), 2.0 * np.arange(96).reshape(4, 4, 6))


def test_two_d_and_channel_nifti(tmp_path):
    """A 2D slice stored as (x, y, 1) is H x W; a 4th axis of 3 is channels, kept last."""
    flat = np.arange(32 * 24, dtype=np.float32).reshape(1, 32, 24)
    path = write_nifti(tmp_path / "flat.nii", flat)
    assert load_image(path).shape == (32, 24) and spatial_shape_of(path) == (32, 24)
    np.testing.assert_array_equal(load_image(path), flat[0])
    rgb = np.random.default_rng(2).integers(0, 255, (*SHAPE, 3)).astype(np.uint8)
    np.testing.assert_array_equal(load_image(write_nifti(tmp_path / "rgb.nii.gz", rgb), spatial_shape=SHAPE), rgb)


def test_float_labels(tmp_path):
    _, labels = make_volume()
    whole = load_labels(write_nifti(tmp_path / "whole.nii.gz", labels.astype(np.float32)))
    assert np.issubdtype(whole.dtype, np.integer)
    np.testing.assert_array_equal(whole, labels)
    bad_path = write_nifti(tmp_path / "interpolated.nii.gz", labels.astype(np.float32) * 0.5)
    with pytest.raises(DataError, match="non-integer float values") as info:
        load_labels(bad_path)
    assert str(bad_path) in str(info.value) and "\n" not in str(info.value)


def test_nan_image_is_rejected(tmp_path):
    image = make_volume()[0].astype(np.float32)
    image[2, 5, 5] = np.nan
    path = write_nifti(tmp_path / "nan.nii.gz", image)
    with pytest.raises(DataError, match="NaN or inf") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_double_suffix_ids():
    assert suffix_of("case1.nii.gz") == ".nii.gz" and file_id("case1.nii.gz") == "case1"
    assert suffix_of("Case.V2.NII.GZ") == ".nii.gz" and file_id("Case.V2.NII.GZ") == "Case.V2"
    assert suffix_of("case1.nii") == ".nii" and file_id("case1.nii") == "case1"
    assert suffix_of("a.tif") == ".tif" and file_id("a.tif") == "a"
    assert suffix_of("notes.tar.gz") == ".gz"


def test_folder_of_nifti_pairs_to_slice_rows(tmp_path):
    root = tmp_path / "data"
    write_case(root, "train", "case1", ".nii.gz", seed=0)
    write_case(root, "train", "case2", ".nii", seed=1)
    (root / "train" / "images" / "notes.gz").write_text("not data")  # .gz alone is not a data suffix
    pairs = find_pairs(root, "train")
    assert [p.id for p in pairs] == ["case1", "case2"]
    assert [p.image_path.name for p in pairs] == ["case1.nii.gz", "case2.nii"]
    image, labels = load_pair(pairs[0])
    expected_image, expected_labels = make_volume(0)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(labels, expected_labels)

    every = build_dataset(root, "train", min_size=0, with_objects_only=False, cache_dir=tmp_path / "c1")
    assert list(every["id"]) == [f"case{c}_z{z:03d}" for c in (1, 2) for z in range(SHAPE[0])]
    assert all(np.asarray(row).shape == SHAPE[1:] for row in every["labels"])
    for row_labels, z in zip(every["labels"][:4], range(4)):  # orientation survives the builder
        np.testing.assert_array_equal(np.asarray(row_labels) > 0, expected_labels[z] > 0)
    # empty slices exist as rows above; the object filter drops them
    with_objects = build_dataset(root, "train", min_size=0, cache_dir=tmp_path / "c2")
    assert list(with_objects["id"]) == ["case1_z001", "case1_z003", "case2_z001", "case2_z003"]


def test_training_sampler_skips_empty_slices(tmp_path):
    root = tmp_path / "data"
    write_case(root, "train", "case1", seed=0)
    write_case(root, "val", "case2", seed=1)
    splits = train_val_datasets(root, min_size=0, augment="none", cache_dir=tmp_path / "c")
    train = splits["train"]
    assert len(train.slice_ids) == SHAPE[0]  # every slice is in the table, the empty ones too
    served = {train[i]["id"] for i in range(len(train))}
    assert served <= {"case1_z001", "case1_z003"} and served
    assert list(splits["val"]["id"]) == ["case2_z001", "case2_z003"]


@pytest.mark.parametrize("recipe", ["motum", "mice_tumseg"])
def test_medical_recipe_reads_a_nifti_folder(tmp_path, recipe):
    """The 3D medical recipes, pointed at a folder of .nii.gz pairs as their `obtain` text says: no conversion."""
    from hf_sam_peft.data.recipes import dataset_kwargs, load_dataset_recipe

    root = tmp_path / "data"
    write_case(root, "train", "sub-0001", seed=0)
    write_case(root, "val", "sub-0036", seed=1)
    kwargs = {**dataset_kwargs(load_dataset_recipe(recipe)), "root": root}
    splits = train_val_datasets(cache_dir=tmp_path / "c", **kwargs)
    served = {splits["train"][i]["id"].split("_y")[0] for i in range(len(splits["train"]))}
    assert served and served <= {"sub-0001_z001", "sub-0001_z003"}
    assert [i.split("_y")[0] for i in splits["val"]["id"]] == ["sub-0036_z001", "sub-0036_z003"]


def _one_line_naming_both(err: pytest.ExceptionInfo, image_path: Path, label_path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(image_path) in message and str(label_path) in message
    return message


def test_shape_mismatch_names_both_files(tmp_path):
    image_path, label_path = write_case(tmp_path, "train", "a", label_shape=(5, 32, 24))
    with pytest.raises(DataError, match="differ in shape") as info:
        load_pair(find_pairs(tmp_path, "train")[0])
    assert "24x32x4 vs 24x32x5" in _one_line_naming_both(info, image_path, label_path)
    with pytest.raises(DataError, match="differ in shape") as info:  # surfaced as itself by build_dataset
        build_dataset(tmp_path, "train", cache_dir=tmp_path / "c")
    _one_line_naming_both(info, image_path, label_path)


def test_affine_mismatch_names_both_files(tmp_path):
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])  # same voxel grid size, other world positions
    image_path, label_path = write_case(tmp_path, "train", "a", label_affine=coarse)
    with pytest.raises(DataError, match="differ in affine") as info:
        load_pair(find_pairs(tmp_path, "train")[0])
    _one_line_naming_both(info, image_path, label_path)


def test_affine_rounding_is_tolerated(tmp_path):
    """Two tools writing one grid differ by float32 rounding; that is not a mismatch."""
    nearly = np.eye(4)
    nearly[:3, 3] = 1e-5
    write_case(tmp_path, "train", "a", label_affine=nearly)
    image, labels = load_pair(find_pairs(tmp_path, "train")[0])
    assert image.shape == labels.shape == SHAPE


def test_missing_nibabel_gives_the_install_hint(tmp_path, monkeypatch):
    image_path, label_path = write_case(tmp_path, "train", "a")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # `import nibabel` now raises ImportError
    pairs = find_pairs(tmp_path, "train")  # listing files needs no nibabel
    assert [p.id for p in pairs] == ["a"]
    calls = {
        "load_image": lambda: load_image(image_path),
        "load_labels": lambda: load_labels(label_path),
        "spatial_shape_of": lambda: spatial_shape_of(label_path),
        "image_dtype_of": lambda: image_dtype_of(image_path),
        "load_pair": lambda: load_pair(pairs[0]),
    }
    for name, call in calls.items():
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert 'pip install "hf-sam-peft[nifti]"' in message and "\n" not in message, name
        assert str(image_path) in message or str(label_path) in message, name


def test_nifti_file_that_is_not_nifti(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header"))
    for call in (load_image, load_labels, spatial_shape_of, image_dtype_of):
        with pytest.raises(DataError, match="could not read") as info:
            call(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
