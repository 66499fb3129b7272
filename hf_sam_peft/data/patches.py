"""Where patches are cut from a 2D image, and cutting them (with zero padding for small images)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def grid_starts(size: int, patch: int) -> list[int]:
    """Start offsets of the fewest patches that cover ``size`` pixels, spread evenly (they overlap when
    ``patch`` does not divide ``size``; the last patch ends at the border). One start (0) if size <= patch."""
    if size <= patch:
        return [0]
    n = math.ceil(size / patch)
    # round() rounds halves to even (50.5 -> 50); starts are part of row ids and cached tables, so changing the
    # rounding changes every grid row
    return sorted({int(round(i * (size - patch) / (n - 1))) for i in range(n)})


def grid_positions(shape: Sequence[int], patch_shape: Sequence[int]) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the covering grid, row-major."""
    return [(y, x) for y in grid_starts(shape[0], patch_shape[0]) for x in grid_starts(shape[1], patch_shape[1])]


def random_position(shape: Sequence[int], patch_shape: Sequence[int], rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly random top-left corner with the patch inside the image (0 on axes where it does not fit),
    as torch_em samples training patches."""
    # + 1: integers' high is exclusive, so the last start is reachable (torch_em's randint(0, sh - psh) misses it)
    return tuple(int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape[:2], patch_shape))  # type: ignore


def crop(array: np.ndarray, position: Sequence[int], patch_shape: Sequence[int]) -> np.ndarray:
    """Cut ``patch_shape`` at ``position`` from the first two axes, zero-padding bottom/right where the
    image is smaller than the patch (padding is background in labels and 0 in images)."""
    y, x = position
    h, w = patch_shape
    # slicing past the end stops at the border, so only images smaller than the patch need padding: zeros at the
    # bottom / right, as torch_em pads them (ImageCollectionDataset._ensure_patch_shape, image_collection_dataset.py)
    out = array[y : y + h, x : x + w]
    pad_h, pad_w = h - out.shape[0], w - out.shape[1]
    if pad_h or pad_w:
        out = np.pad(out, [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2))
    return out
