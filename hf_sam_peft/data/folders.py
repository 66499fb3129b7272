"""The on-disk layout: ``<root>/<split>/images/<id>.<png|tif>`` with ``<root>/<split>/labels/<id>.<tif|png>``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .io import IMAGE_SUFFIXES, LABEL_SUFFIXES, DataError, check_link, load_image, load_labels


@dataclass(frozen=True)
class FilePair:
    """One image file and its label file; ``id`` is the shared file stem."""

    id: str
    image_path: Path
    label_path: Path


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, list[Path]]:
    """Data files by stem; a dangling or looping symlink named like a data file is an error naming it
    (never a silently smaller dataset)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        check_link(path)
        if path.is_file():
            found.setdefault(path.stem, []).append(path)
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


def load_pair(pair: FilePair) -> tuple[np.ndarray, np.ndarray]:
    """Read a pair; the image is laid out to match the labels (``H x W[x3]`` or ``Z x H x W[x3]``)."""
    labels = load_labels(pair.label_path)
    image = load_image(pair.image_path, spatial_shape=labels.shape)
    return image, labels


def iter_slices(image: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int | None, np.ndarray, np.ndarray]]:
    """Yield ``(z, image_2d, labels_2d)``: one item with ``z=None`` for 2D data, one per slice for volumes."""
    if labels.ndim == 2:
        yield None, image, labels
        return
    for z in range(labels.shape[0]):
        yield z, image[z], labels[z]
