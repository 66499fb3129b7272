"""Reading image and label files (tif / png) into validated numpy arrays.

Every problem with a file is raised as :class:`DataError` (a ``ValueError``) whose message names the file,
so that a bad sample in a folder of thousands can be found without a debugger.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
_TIFF_SUFFIXES = (".tif", ".tiff")


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


def check_link(path: Path) -> None:
    """A one-line :class:`DataError` when ``path`` is a symlink whose target is missing or that loops."""
    if not path.is_symlink():
        return
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(f"{path} is a symlink that loops (too many levels of symbolic links)") from None
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise DataError(f"{path} is a dangling symlink: its target {target} does not exist") from None


def check_finite(array: np.ndarray, path: str | Path) -> np.ndarray:
    """``array`` itself, or a one-line :class:`DataError` naming ``path`` when it holds NaN or inf values."""
    if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
        raise DataError(f"{path}: image holds NaN or inf values")
    return array


def _read_array(path: Path, *, drop_alpha: bool) -> np.ndarray:
    """Decode a file to an array as stored; PIL's RGBA/LA drop alpha, palettes are expanded only for images."""
    check_link(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as img:
                if drop_alpha and img.mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                if drop_alpha and img.mode in ("RGBA", "LA", "PA"):
                    img = img.convert("RGB" if img.mode != "LA" else "L")
                array = np.asarray(img)
    except DataError:
        raise
    except Exception as err:  # corrupt, truncated or of an unknown format
        raise DataError(f"could not read {path}: {type(err).__name__}: {err}") from err
    return array.astype(np.uint8) if array.dtype == bool else array  # bilevel TIFF / PNG mode "1": 0 / 1


def _channel_axis_candidates(ndim_spatial: int, ndim: int) -> list[int]:
    """Axes that may hold channels: last first (channel-last is our convention), then first / after Z."""
    if ndim != ndim_spatial + 1:
        return []
    return [ndim - 1, 0] if ndim_spatial == 2 else [ndim - 1, 1, 0]


def _to_channel_last(array: np.ndarray, path: Path, spatial_shape: Sequence[int] | None) -> np.ndarray:
    """Move a channel axis (if any) last; 1 channel -> no channel axis; only 1 or 3 channels are allowed."""
    if spatial_shape is not None:
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if array.shape == spatial_shape:
            return array
        for axis in _channel_axis_candidates(len(spatial_shape), array.ndim):
            rest = array.shape[:axis] + array.shape[axis + 1 :]
            if rest == spatial_shape and array.shape[axis] in (1, 3):
                return _squeeze_grey(np.moveaxis(array, axis, -1))
        raise DataError(
            f"image {path} has shape {array.shape}, which does not match its label shape {spatial_shape} "
            "(expected the same spatial shape, optionally with 1 or 3 channels)"
        )
    if array.ndim == 2:
        return array
    if array.ndim == 3:
        if array.shape[-1] in (1, 3):
            return _squeeze_grey(array)
        if array.shape[0] in (1, 3):
            return _squeeze_grey(np.moveaxis(array, 0, -1))
        return array  # a Z x H x W volume
    if array.ndim == 4:
        if array.shape[-1] in (1, 3):
            return _squeeze_grey(array)
        if array.shape[1] in (1, 3):
            return _squeeze_grey(np.moveaxis(array, 1, -1))
    raise DataError(
        f"image {path} has shape {array.shape}; expected H x W, H x W x 3, 3 x H x W, Z x H x W or Z x H x W x 3 "
        "(convert multi-channel data to one or three channels first)"
    )


def _squeeze_grey(array: np.ndarray) -> np.ndarray:
    return array[..., 0] if array.shape[-1] == 1 else array


def load_image(path: str | Path, spatial_shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a 2D image or 3D volume, grey or RGB, channel-last.

    Returns ``H x W``, ``H x W x 3``, ``Z x H x W`` or ``Z x H x W x 3`` in the file's dtype. Channel-first
    files (``3 x H x W``, ``Z x 3 x H x W``) are transposed. Without ``spatial_shape`` a ``3 x H x W`` file is
    read as RGB; pass the label map's shape to read it as a 3-slice volume instead (no ambiguity then). PNG
    alpha channels are dropped and palette PNGs expanded to RGB; bool (bilevel) files become uint8 0 / 1.
    Float images holding NaN or inf are rejected (``<path>: image holds NaN or inf values``).
    """
    path = Path(path)
    array = _read_array(path, drop_alpha=True)
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"image {path} has non-numeric dtype {array.dtype}")
    check_finite(array, path)
    return _to_channel_last(array, path, spatial_shape)


def load_labels(path: str | Path) -> np.ndarray:
    """Read a 2D or 3D label map (instance ids or semantic classes; 0 = background) as an integer array.

    Any integer dtype is kept; bool becomes uint8; float maps are accepted only when every value is a whole
    number. Negative values, non-integral floats and multi-channel (colour) label images are rejected.
    Singleton axes (``1 x H x W``, ``H x W x 1``) are squeezed.
    """
    path = Path(path)
    labels = _read_array(path, drop_alpha=False)
    if labels.ndim >= 3 and 1 in (labels.shape[0], labels.shape[-1]):
        labels = labels[0] if labels.shape[0] == 1 else labels[..., 0]
    if labels.ndim not in (2, 3):
        raise DataError(f"label file {path} has shape {labels.shape}; expected H x W or Z x H x W")
    if labels.ndim == 3 and path.suffix.lower() not in _TIFF_SUFFIXES:
        raise DataError(f"label file {path} is a colour image {labels.shape}; labels must be one channel")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise DataError(f"label file {path} holds non-integer float values; labels must be integer ids")
        labels = labels.astype(np.int64)
    elif not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"label file {path} has dtype {labels.dtype}; expected integer ids")
    if labels.size and labels.min() < 0:
        raise DataError(f"label file {path} has negative values (min {labels.min()}); expected ids >= 0")
    return labels


def spatial_shape_of(path: str | Path) -> tuple[int, ...]:
    """Shape of a label file from its header (no pixel decoding), singleton axes squeezed as in load_labels."""
    path = Path(path)
    check_link(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
        else:
            from PIL import Image

            with Image.open(path) as img:
                shape = (img.height, img.width)
    except Exception as err:
        raise DataError(f"could not read {path}: {type(err).__name__}: {err}") from err
    if len(shape) >= 3 and 1 in (shape[0], shape[-1]):
        shape = shape[1:] if shape[0] == 1 else shape[:-1]
    return shape


_PIL_MODE_DTYPES = {"1": np.uint8, "L": np.uint8, "P": np.uint8, "RGB": np.uint8, "RGBA": np.uint8, "LA": np.uint8,
                    "PA": np.uint8, "CMYK": np.uint8, "YCbCr": np.uint8, "I;16": np.uint16, "I;16B": np.uint16,
                    "I": np.int32, "F": np.float32}


def image_dtype_of(path: str | Path) -> np.dtype:
    """The dtype :func:`load_image` returns for a file, from its header (no pixel decoding); bool counts as
    uint8 as in :func:`load_image`."""
    path = Path(path)
    check_link(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                dtype = np.dtype(tif.series[0].dtype)
        else:
            from PIL import Image

            with Image.open(path) as img:
                mode = img.mode
            if mode not in _PIL_MODE_DTYPES:
                raise ValueError(f"unsupported PIL mode {mode!r}")
            dtype = np.dtype(_PIL_MODE_DTYPES[mode])
    except Exception as err:
        raise DataError(f"could not read {path}: {type(err).__name__}: {err}") from err
    return np.dtype(np.uint8) if dtype == bool else dtype
