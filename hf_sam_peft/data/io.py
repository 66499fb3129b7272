"""Reading image and label files (tif / png / NIfTI) into validated numpy arrays.

Every problem with a file is raised as :class:`DataError` (a ``ValueError``) whose message names the file,
so that a bad sample in a folder of thousands can be found without a debugger.

NIfTI (``.nii``, ``.nii.gz``) needs the optional ``nibabel`` (``pip install "hf-sam-peft[nifti]"``), imported
only when such a file is read. Axes: nibabel gives ``(x, y, z)``; we return ``(z, y, x)``, all axes reversed,
which is what the reference trains on. torch_em reads MOTUM and Mice TumSeg volumes with ``raw_key="data"``
(``torch_em/data/datasets/medical/motum.py`` and ``mice_tumseg.py``, ``default_segmentation_dataset``), i.e.
through elf's ``NiftiDataset`` (constantinpape/elf ``elf/io/nifti_wrapper.py`` at 4527ab44, l. 73-81:
``shape`` is ``self._data.shape[::-1]`` and ``__getitem__`` reads ``dataobj[key[::-1]].T``); peft-sam then
samples ``patch_shape=(1, 512, 512)`` with ``ndim=2``, so the slice axis is the first one of that reversed
volume, nibabel's z, and each slice is ``(y, x)`` = ``H x W`` (torch_em ``SegmentationDataset._get_sample``
squeezes axis 0). Extra axes (time / channels, nibabel's 4th on) go last, channel-last as everywhere here;
singleton ones are dropped. Voxels are used in stored order: like the reference we never reorient to RAS,
the affine serves only to check that an image and its labels share one grid (:func:`nifti_geometry`).
Intensities are nibabel's scaled values (``scl_slope`` / ``scl_inter`` applied), so a scaled file is float.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg") + NIFTI_SUFFIXES
LABEL_SUFFIXES = (".tif", ".tiff", ".png") + NIFTI_SUFFIXES
_TIFF_SUFFIXES = (".tif", ".tiff")
_VOLUME_SUFFIXES = _TIFF_SUFFIXES + NIFTI_SUFFIXES  # formats whose 3D arrays are volumes, not colour images
NIFTI_INSTALL_HINT = 'pip install "hf-sam-peft[nifti]"'


MAX_IMAGE_PIXELS: int | None = 1 << 30
"""The most samples (pixels x slices x channels) a TIF or NIfTI file may declare in its header; checked before
any pixel is decoded, so a damaged or malicious header cannot make the reader allocate gigabytes (PIL guards
PNG / JPEG the same way with ``PIL.Image.MAX_IMAGE_PIXELS``). 2^30 holds a 1024^3 volume or a 32768^2 image;
set ``hf_sam_peft.data.io.MAX_IMAGE_PIXELS`` higher (or None: no limit) for larger files."""


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


def check_declared_size(shape: Sequence[int], path: str | Path) -> None:
    """A one-line :class:`DataError` when a header's ``shape`` holds more samples than :data:`MAX_IMAGE_PIXELS`."""
    limit = MAX_IMAGE_PIXELS
    # dtype=object multiplies Python ints: a forged header's product cannot overflow int64 and slip under the limit
    count = int(np.prod([int(s) for s in shape], dtype=object)) if len(shape) else 0
    if limit is not None and count > limit:
        raise DataError(
            f"{path}: its header declares an image of shape {tuple(int(s) for s in shape)} ({count:,} samples), "
            f"more than the limit of {limit:,} (hf_sam_peft.data.io.MAX_IMAGE_PIXELS; raise it to read such files)"
        )


def suffix_of(path: str | Path) -> str:
    """The data suffix of a file name, lower-case; ``.nii.gz`` is one suffix (``Path.suffix`` says ``.gz``)."""
    name = Path(path).name.lower()
    # a file named just '.nii.gz' has no stem: Path gives it the suffix '.gz', so it is no data file
    return ".nii.gz" if name.endswith(".nii.gz") and len(name) > len(".nii.gz") else Path(name).suffix


def file_id(path: str | Path) -> str:
    """The file name without its data suffix (``case1.nii.gz`` -> ``case1``): the id that pairs files."""
    name = Path(path).name
    return name[: len(name) - len(suffix_of(path))]


def is_nifti(path: str | Path) -> bool:
    """Whether the file name says NIfTI (``.nii`` / ``.nii.gz``, any case)."""
    return suffix_of(path) in NIFTI_SUFFIXES


def _nibabel(path: Path) -> Any:
    """nibabel, imported lazily (an optional dependency); a one-line DataError with the install hint if absent."""
    try:
        import nibabel
    except ImportError:
        raise DataError(f"{path} is a NIfTI file, which needs nibabel: {NIFTI_INSTALL_HINT}") from None
    return nibabel


def _open_nifti(path: Path) -> Any:
    """The nibabel image of ``path``: only the header is read here, voxels stay on disk until asked for
    (``mmap=False``: returned arrays are ordinary writable memory, no open file behind them)."""
    check_link(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    nibabel = _nibabel(path)
    try:
        return nibabel.load(path, mmap=False)
    except Exception as err:  # not NIfTI, truncated header, ...
        raise DataError(f"could not read {path}: {type(err).__name__}: {err}") from err


def _nifti_axes(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(singleton axes to drop, order of the rest)`` mapping nibabel's ``(x, y, z, ...)`` to our
    ``(z, y, x, ...)``: the spatial axes reversed (see the module notes), extra axes kept last, singleton extra
    axes (e.g. ``x, y, z, 1``) dropped."""
    # only extra axes (4th on) are dropped: a 2D slice stored as (x, y, 1) reads as 1 x H x W, which load_labels
    # and _to_channel_last squeeze, so spatial axes never move
    drop = tuple(i for i in range(3, len(shape)) if shape[i] == 1)
    ndim = len(shape) - len(drop)
    spatial = min(ndim, 3)
    return drop, tuple(range(spatial - 1, -1, -1)) + tuple(range(3, ndim))


def nifti_shape(shape_xyz: Sequence[int]) -> tuple[int, ...]:
    """A nibabel shape ``(x, y, z, ...)`` in our axis order (``(z, y, x, ...)``, as :func:`load_image` returns)."""
    drop, order = _nifti_axes(shape_xyz)
    kept = [int(s) for i, s in enumerate(shape_xyz) if i not in drop]
    return tuple(kept[i] for i in order)


def _read_nifti(path: Path) -> np.ndarray:
    """All voxels of a NIfTI file in our axis order (``(z, y, x[, c])``)."""
    image = _open_nifti(path)
    check_declared_size(image.shape, path)
    try:
        array = np.asanyarray(image.dataobj)  # scl_slope / scl_inter applied, as nibabel defines the values
    except Exception as err:  # truncated or corrupt voxel data
        raise DataError(f"could not read {path}: {type(err).__name__}: {err}") from err
    drop, order = _nifti_axes(array.shape)
    # NIfTI voxels are stored x-fastest (Fortran order), so the full reversal is C-contiguous already
    return np.ascontiguousarray(np.squeeze(array, axis=drop).transpose(order))


def nifti_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` from the header only: the shape in nibabel's order ``(x, y, z, ...)`` and the 4 x 4
    voxel-to-world affine, to check that an image and its labels lie on one grid."""
    image = _open_nifti(Path(path))
    return tuple(int(s) for s in image.shape), np.asarray(image.affine, dtype=np.float64)


def _nifti_dtype(path: Path) -> np.dtype:
    """The dtype nibabel's scaled read returns, from the header: scaling by ``scl_slope`` / ``scl_inter``
    promotes the stored dtype exactly as applying it to an empty array of that dtype does."""
    proxy = _open_nifti(path).dataobj  # first: the install hint when nibabel is missing
    from nibabel.volumeutils import apply_read_scaling

    slope, inter = np.asanyarray(getattr(proxy, "slope", 1.0)), np.asanyarray(getattr(proxy, "inter", 0.0))
    if np.can_cast(inter, slope.dtype):  # as nibabel's ArrayProxy._get_scaled casts them before scaling
        inter = inter.astype(slope.dtype)
    return apply_read_scaling(np.zeros(0, dtype=proxy.dtype), slope, inter).dtype


def check_link(path: Path) -> None:
    """A one-line :class:`DataError` when ``path`` is a symlink whose target is missing or that loops."""
    if not path.is_symlink():
        return
    try:
        # stat() follows the link: it fails exactly when the target is missing or the chain loops
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
    if is_nifti(path):
        return _read_nifti(path)
    check_link(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            # series 0 is what asarray() decodes by default (no key, no series): the checked shape is the one allocated
            with tifffile.TiffFile(path) as tif:  # the header first: its declared size is checked before decoding
                check_declared_size(tif.series[0].shape, path)
                array = np.asarray(tif.asarray())
        else:
            from PIL import Image

            with Image.open(path) as img:
                # palette images become the colours shown; labels (drop_alpha=False) keep the palette indices: their ids
                if drop_alpha and img.mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                if drop_alpha and img.mode in ("RGBA", "LA", "PA"):
                    img = img.convert("RGB" if img.mode != "LA" else "L")  # LA -> L: grey stays one channel
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
    Float images holding NaN or inf are rejected (``<path>: image holds NaN or inf values``). NIfTI files
    come as ``(z, y, x)`` (nibabel's axes reversed; see the module notes), a 4th axis as channels.
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
    number (common in NIfTI: float32 masks holding 0.0 / 1.0). Negative values, non-integral floats (e.g.
    labels resampled with linear interpolation) and multi-channel (colour) label images are rejected.
    Singleton axes (``1 x H x W``, ``H x W x 1``) are squeezed. NIfTI label volumes come as ``(z, y, x)``.
    """
    path = Path(path)
    labels = _read_array(path, drop_alpha=False)
    # one singleton end squeezed: a one-page stack or a one-slice NIfTI (1 x H x W), or a channel axis of one
    if labels.ndim >= 3 and 1 in (labels.shape[0], labels.shape[-1]):
        labels = labels[0] if labels.shape[0] == 1 else labels[..., 0]
    if labels.ndim not in (2, 3):
        raise DataError(f"label file {path} has shape {labels.shape}; expected H x W or Z x H x W")
    if labels.ndim == 3 and suffix_of(path) not in _VOLUME_SUFFIXES:
        raise DataError(f"label file {path} is a colour image {labels.shape}; labels must be one channel")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            bad = labels[~np.isfinite(labels) | (labels != np.round(labels))].flat[0]
            raise DataError(
                f"label file {path} holds non-integer float values (e.g. {bad}); labels must be integer ids"
            )
        labels = labels.astype(np.int64)
    elif not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"label file {path} has dtype {labels.dtype}; expected integer ids")
    # to_instances treats only 0 as background, so a negative 'ignore' value (-1) would silently become objects
    if labels.size and labels.min() < 0:
        raise DataError(f"label file {path} has negative values (min {labels.min()}); expected ids >= 0")
    return labels


def spatial_shape_of(path: str | Path) -> tuple[int, ...]:
    """Shape of a label file from its header (no pixel decoding), singleton axes squeezed as in load_labels
    (NIfTI in our ``(z, y, x)`` order)."""
    path = Path(path)
    check_link(path)
    try:
        if is_nifti(path):
            shape = nifti_shape(nifti_geometry(path)[0])
        elif path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
        else:
            from PIL import Image

            with Image.open(path) as img:
                shape = (img.height, img.width)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"could not read {path}: {type(err).__name__}: {err}") from err
    # the same squeeze as load_labels: this header shape decides whether a table gets fixed-shape columns
    # (builder._build), so it must equal the decoded shape
    if len(shape) >= 3 and 1 in (shape[0], shape[-1]):
        shape = shape[1:] if shape[0] == 1 else shape[:-1]
    return shape


# np.asarray(img)'s dtype per PIL mode, except bilevel '1' (bool there), counted as uint8 as load_image returns it;
# 'P' is expanded to RGB by load_image, still uint8
_PIL_MODE_DTYPES = {"1": np.uint8, "L": np.uint8, "P": np.uint8, "RGB": np.uint8, "RGBA": np.uint8, "LA": np.uint8,
                    "PA": np.uint8, "CMYK": np.uint8, "YCbCr": np.uint8, "I;16": np.uint16, "I;16B": np.uint16,
                    "I": np.int32, "F": np.float32}


def image_dtype_of(path: str | Path) -> np.dtype:
    """The dtype :func:`load_image` returns for a file, from its header (no pixel decoding); bool counts as
    uint8 as in :func:`load_image`."""
    path = Path(path)
    check_link(path)
    try:
        if is_nifti(path):
            dtype = _nifti_dtype(path)
        elif path.suffix.lower() in _TIFF_SUFFIXES:
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
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"could not read {path}: {type(err).__name__}: {err}") from err
    return np.dtype(np.uint8) if dtype == bool else dtype
