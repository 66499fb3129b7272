"""The one intensity normalisation for SAM inputs, used by dataset building, training and evaluation."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def normalize_image(image: np.ndarray, percentiles: Sequence[float] | None = None) -> np.ndarray:
    """Map a 2D grey or RGB image to ``uint8 H x W x 3`` in [0, 255], the input SAM was trained on.

    Follows micro-sam's ``_to_image``: uint8 images keep their values (SAM expects 8-bit intensities, so no
    stretching); any other dtype is min-max scaled per image to [0, 255] (in float64, so that any finite range
    keeps its grey levels, ±3e38 included); grey is copied to 3 channels.
    ``percentiles=(low, high)`` clips to those per-image percentiles before min-max scaling (off by default,
    as in micro-sam) and then applies to uint8 input too. A constant image maps to zeros.

    The result is a uint8 RGB image, so applying the function twice changes nothing: datasets store
    normalised images and callers may normalise again safely.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image: expected a numpy array, got {type(image).__name__}")
    # H x W x 1 is grey: squeezed so that it is copied to three channels below
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"image: expected H x W or H x W x 3, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise TypeError(f"image: expected a numeric array, got dtype {image.dtype}")
    if percentiles is not None:
        low, high = (float(p) for p in percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles: expected 0 <= low < high <= 100, got {tuple(percentiles)}")
        values = image.astype(np.float64)
        lo, hi = np.percentile(values, [low, high])
        image = _min_max(np.clip(values, lo, hi), lo, hi)
    # uint8 passes untouched (no stretch): what makes a second call the identity on stored rows
    elif image.dtype != np.uint8:
        values = image.astype(np.float64)
        image = _min_max(values, float(values.min()), float(values.max()))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image)


def _min_max(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Scale [lo, hi] to [0, 255] uint8 (rounded); a zero range gives zeros.

    In float64, with both ends halved first: ``hi - lo`` of a float32 image spanning ±3e38 is inf in float32
    (every pixel then lands on one of two grey levels), and of a float64 one spanning ±1e308 in float64.
    """
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("image: holds NaN or inf values")
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    half_range = hi / 2 - lo / 2  # finite for any finite lo < hi
    scaled = (values / 2 - lo / 2) * (255.0 / half_range)
    # rounded to the nearest level; micro-sam's _to_image (micro_sam/util.py) truncates ((x * 255).astype("uint8")),
    # so a level may be one above the reference's
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
