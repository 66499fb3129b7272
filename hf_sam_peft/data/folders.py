"""The on-disk layout: ``<root>/<split>/images/<id>.<png|tif|nii|nii.gz>`` with
``<root>/<split>/labels/<id>.<tif|png|nii|nii.gz>``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .io import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    DataError,
    check_link,
    file_id,
    is_nifti,
    load_image,
    load_labels,
    nifti_geometry,
    suffix_of,
)

# Voxel-to-world affines of an image and its labels must agree to this (mm, in practice): far below any voxel
# size, far above the float32 rounding of sform / qform that two tools writing one grid differ by.
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class FilePair:
    """One image file and its label file; ``id`` is the shared file stem."""

    id: str
    image_path: Path
    label_path: Path


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, list[Path]]:
    """Data files by id (:func:`~hf_sam_peft.data.io.file_id`: ``case1.nii.gz`` -> ``case1``); a dangling or
    looping symlink named like a data file is an error naming it (never a silently smaller dataset)."""
    found: dict[str, list[Path]] = {}
    # sorted: iterdir order depends on the filesystem, and pair order decides the holdout split and max_images
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or suffix_of(path) not in suffixes:
            continue
        check_link(path)
        # checked before is_file(): a dangling link is no file and would otherwise vanish from the dataset unnoticed
        if path.is_file():
            # a list per id: case1.png beside case1.tif is reported by find_pairs, never resolved by picking one
            found.setdefault(file_id(path), []).append(path)
    return found


def find_pairs(root: str | Path, split: str = "train") -> list[FilePair]:
    """List the image/label pairs of one split, sorted by id; every image must have exactly one label file.

    Files with other suffixes and hidden files are ignored; label files without an image are ignored. A
    dangling or looping symlink with an image / label suffix is a :class:`DataError` naming it.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a non-empty folder name, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"split folder {split_dir} does not exist (found splits: {present})")
    image_dir, label_dir = split_dir / "images", split_dir / "labels"
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DataError(f"expected folder {folder} (layout <root>/<split>/images + <root>/<split>/labels)")
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {image_dir}")
    labels = _files_by_stem(label_dir, LABEL_SUFFIXES)
    pairs = []
    for stem, image_paths in images.items():
        if len(image_paths) > 1:
            raise DataError(f"several images share the id {stem!r}: {[str(p) for p in image_paths]}")
        label_paths = labels.get(stem, [])
        if not label_paths:
            raise DataError(
                f"no label file for image {image_paths[0]} (looked for {label_dir / stem}"
                f"{{{','.join(LABEL_SUFFIXES)}}})"
            )
        if len(label_paths) > 1:
            raise DataError(f"several label files for image {image_paths[0]}: {[str(p) for p in label_paths]}")
        pairs.append(FilePair(stem, image_paths[0], label_paths[0]))
    return pairs


def check_nifti_pair(pair: FilePair) -> None:
    """A one-line :class:`DataError` naming both files when a NIfTI image and its NIfTI labels do not lie on
    one voxel grid: different spatial shapes, or affines differing by more than :data:`AFFINE_ATOL`. Reads the
    headers only, so a mismatch is found before a volume is decompressed. (The reference, torch_em's
    ``SegmentationDataset``, asserts equal shapes only; an affine mismatch means the labels were resampled or
    cropped differently, and slice z of one would not be slice z of the other.)"""
    (image_shape, image_affine), (label_shape, label_affine) = (
        nifti_geometry(pair.image_path), nifti_geometry(pair.label_path)
    )
    # spatial axes only, padded to three: a 2D NIfTI has two, and an image may carry a 4th (channel / time) axis
    # that its labels lack
    image_xyz, label_xyz = ((tuple(shape[:3]) + (1, 1))[:3] for shape in (image_shape, label_shape))
    if image_xyz != label_xyz:
        raise DataError(
            f"NIfTI image {pair.image_path} and labels {pair.label_path} differ in shape: (x, y, z) "
            f"{'x'.join(map(str, image_xyz))} vs {'x'.join(map(str, label_xyz))}"
        )
    # rtol=0: the translation column is in mm and often in the hundreds, where a relative tolerance would loosen
    # the check most
    if not np.allclose(image_affine, label_affine, rtol=0.0, atol=AFFINE_ATOL):
        worst = float(np.abs(image_affine - label_affine).max())
        raise DataError(
            f"NIfTI image {pair.image_path} and labels {pair.label_path} differ in affine (voxel-to-world, by up to "
            f"{worst:.4g} > {AFFINE_ATOL:g}): image {np.round(image_affine[:3], 4).tolist()} vs labels "
            f"{np.round(label_affine[:3], 4).tolist()}"
        )


def load_pair(pair: FilePair) -> tuple[np.ndarray, np.ndarray]:
    """Read a pair; the image is laid out to match the labels (``H x W[x3]`` or ``Z x H x W[x3]``).

    This is where a pair is checked: NIfTI pairs first by :func:`check_nifti_pair` (shape and affine, naming
    both files), then every pair by :func:`~hf_sam_peft.data.io.load_image` (image shape vs label shape)."""
    if is_nifti(pair.image_path) and is_nifti(pair.label_path):
        check_nifti_pair(pair)
    # labels first: their shape tells load_image whether a 3 x H x W file is RGB or a volume of three slices
    labels = load_labels(pair.label_path)
    image = load_image(pair.image_path, spatial_shape=labels.shape)
    return image, labels


def iter_slices(image: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int | None, np.ndarray, np.ndarray]]:
    """Yield ``(z, image_2d, labels_2d)``: one item with ``z=None`` for 2D data, one per slice for volumes.

    Every slice is yielded, also those without labels (common in NIfTI volumes: a tumour spans few slices).
    They are rows of the training table, where the sampler rejects them (``RandomPatchDataset`` with
    torch_em's MinInstanceSampler rule, as the reference rejects them); fixed rows drop them by the object
    filter (``with_objects_only``); evaluation skips rows without objects."""
    if labels.ndim == 2:
        yield None, image, labels
        return
    for z in range(labels.shape[0]):
        yield z, image[z], labels[z]
