"""Label maps -> consecutive 2D instance maps (the targets interactive training samples objects from)."""

from __future__ import annotations

import numpy as np
from skimage.measure import label as connected_components


def to_instances(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Split a 2D label map into connected objects, drop those below ``min_size`` px, number them 1..N.

    Every connected region of one non-zero value becomes one object (8-neighbourhood), which serves both
    label kinds: an instance id cut in two by a patch border, or a 3D id with two blobs in a slice, becomes
    two objects, and each region of a semantic class (e.g. ``1 = fetal head``) becomes an object. This is
    what micro-sam's training applies to every patch (torch_em's ``MinSizeLabelTransform``: connected
    components, then objects with fewer than ``min_size`` pixels set to 0); we also renumber consecutively.
    Returns int32 with the same shape; ids follow raster order of the objects' first pixel.
    """
    if not isinstance(labels, np.ndarray) or labels.ndim != 2:
        raise ValueError(f"labels: expected a 2D numpy array, got {getattr(labels, 'shape', type(labels))}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise TypeError(f"labels: expected an integer array, got dtype {labels.dtype}")
    if min_size < 0:
        raise ValueError(f"min_size: expected >= 0, got {min_size}")
    # connectivity=2 is the 8-neighbourhood, skimage's default for 2D, which torch_em's connected_components
    # (torch_em/transform/label.py, called by MinSizeLabelTransform) gets by calling skimage.measure.label bare
    components = connected_components(labels, background=0, connectivity=2)
    sizes = np.bincount(components.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False  # background is never an object, whatever min_size
    # one gather renumbers: kept components -> 1..N in skimage's (raster) order, dropped ones and background -> 0
    lookup = np.zeros(len(sizes), dtype=np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[components]


def count_objects(labels: np.ndarray) -> int:
    """Number of objects in a consecutive instance map (its maximum id)."""
    return int(labels.max()) if labels.size else 0


def label_sizes(labels: np.ndarray) -> np.ndarray:
    """Pixel count of every non-zero value present in a label map, in increasing value order.

    Linear-time ``bincount`` when the ids are small (at most 4 x the pixel count, as consecutive maps are);
    a sort (``np.unique``) otherwise: ids are whatever the files store, and ``bincount`` of a map whose ids
    reach 3 x 10^9 (70,000 objects with hashed ids) allocates 24 GB for a few MB of labels.
    """
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    if flat.dtype == bool or int(flat.max()) <= 4 * flat.size:
        # [1:] drops background; ids absent from the map (count 0) are dropped below, as np.unique never lists them
        sizes = np.bincount(flat.astype(np.intp, copy=False))[1:]
        return sizes[sizes > 0]
    values, sizes = np.unique(flat, return_counts=True)
    return sizes[values != 0]

