"""UNETR outputs -> instance labels: micro-sam's seeded watershed, tiled prediction and its grid search.

The decoder predicts three maps per pixel, in this channel order (as micro-sam): foreground probability,
distance to the object centre and (inverted) distance to the object boundary, each in [0, 1], 0 at the
centre and 1 on the background (micro-sam's targets fill the background with 1; with 0 there, smoothing
would create seeds along every object rim). Post-processing follows micro-sam's ``InstanceSegmentationWithDecoder`` +
``watershed_from_center_and_boundary_distances``: smooth the foreground (σ 1.0) and both distances (σ 1.6),
seeds = connected components of (centre < t_c) ∧ (boundary < t_b) inside the foreground mask, watershed on
the boundary distance within the mask, drop objects below ``min_size``.

Smoothing uses scipy's Gaussian with a 3σ radius and mirror borders, the scipy equivalent of the vigra
``gaussianSmoothing`` micro-sam calls (vigra is not a dependency here).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.measure import label as connected_component_labels
from skimage.segmentation import watershed

__all__ = [
    "CHANNELS",
    "GridSearchResult",
    "distances_to_instances",
    "grid_search_watershed",
    "predict_tiled",
    "segment_tiled",
]

CHANNELS = ("foreground", "center_distances", "boundary_distances")

DEFAULT_THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_SMOOTHING_GRID = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
DEFAULT_MIN_SIZE_GRID = (50, 100, 200)


# --------------------------------------------------------------------------------------------- validation


def _as_map(array: object, argument: str) -> np.ndarray:
    values = np.asarray(array)
    if values.dtype != bool and not np.issubdtype(values.dtype, np.number):
        raise TypeError(f"{argument} must be a real-valued numeric map, got dtype {values.dtype}")
    if values.ndim != 2:
        raise ValueError(f"{argument} must be a 2D map, got shape {values.shape}")
    # float32 throughout: bool maps become 0/1, and scipy's smoothing keeps float32 (half a float64 map's memory)
    return values.astype(np.float32, copy=False)


def _as_maps(foreground: object, center_distances: object, boundary_distances: object) -> tuple[np.ndarray, ...]:
    maps = (
        _as_map(foreground, "foreground"),
        _as_map(center_distances, "center_distances"),
        _as_map(boundary_distances, "boundary_distances"),
    )
    if not maps[0].shape == maps[1].shape == maps[2].shape:
        raise ValueError(
            f"foreground, center_distances and boundary_distances must have the same shape, "
            f"got {maps[0].shape}, {maps[1].shape}, {maps[2].shape}"
        )
    return maps


def _check_non_negative(value: float, argument: str) -> None:
    if not np.isscalar(value) or not value >= 0:
        raise ValueError(f"{argument} must be a non-negative number, got {value!r}")


def _as_prediction(prediction: object, argument: str) -> np.ndarray:
    values = np.asarray(prediction)
    if values.ndim != 3 or values.shape[0] != len(CHANNELS):
        raise ValueError(f"{argument} must have shape (3, H, W) ordered {CHANNELS}, got shape {values.shape}")
    return values


# --------------------------------------------------------------------------------------------- watershed


def _smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing like vigra's gaussianSmoothing (radius 3σ, mirrored border); σ 0 is a no-op."""
    if sigma == 0:
        return values
    return gaussian_filter(values, sigma=sigma, mode="mirror", truncate=3.0)


def _seeded_watershed(
    foreground_mask: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    center_distance_threshold: float,
    boundary_distance_threshold: float,
) -> np.ndarray:
    """Watershed on the (smoothed) boundary distance from seeds where both distances are small."""
    # as torch_em's watershed_from_center_and_boundary_distances (torch_em/util/segmentation.py): centre distance
    # alone merges narrow touching objects, boundary distance alone seeds concave cells twice
    seed_mask = (center_distances < center_distance_threshold) & (boundary_distances < boundary_distance_threshold)
    # skimage's default full connectivity (8-neighbours in 2D), the same `label` call torch_em makes; seeds outside
    # the foreground mask are dropped there too (marker_map[~fg_mask] = 0)
    seeds = connected_component_labels(seed_mask & foreground_mask)
    # flooding the inverted boundary distance rises from the seeds (low) to the object rims (high, 1 on background)
    return watershed(boundary_distances, markers=seeds, mask=foreground_mask)


def _size_filter(segmentation: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects smaller than ``min_size`` pixels and relabel 1..n (as micro-sam's size_filter)."""
    sizes = np.bincount(segmentation.ravel())
    # max(.., 1): ids without pixels (gaps left by stitching) go too, so the output is 1..n even for min_size 0
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    lookup = (np.cumsum(keep) * keep).astype(np.uint32)  # kept ids -> 1..n in order, others -> 0
    return lookup[segmentation]


POSTPROCESS_TILE_PIXELS = 4096 * 4096
"""Above this many pixels :func:`distances_to_instances` runs block by block (:data:`POSTPROCESS_BLOCK` inner
blocks with a :data:`POSTPROCESS_HALO` context) and stitches the objects, instead of one watershed over the
whole image: skimage's watershed and the smoothing take about 135 bytes per pixel, 15 GB for a 10000² image;
blocks keep it to about 1 GB plus the output."""
POSTPROCESS_BLOCK = 2048
POSTPROCESS_HALO = 128


def _root(parent: dict[int, int], x: int) -> int:
    """Union-find: the representative of ``x`` (paths halved on the way)."""
    while parent.get(x, x) != x:
        # ids absent from `parent` are their own roots: the dict only holds ids that were ever joined
        parent[x] = parent.get(parent[x], parent[x])
        x = parent[x]
    return x


def _blockwise_instances(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    block: int,
    halo: int,
    min_size: int,
    **kwargs: float,
) -> np.ndarray:
    """:func:`distances_to_instances` of a large image, one block (plus ``halo``) at a time.

    Each block's inner part is written with new ids. An object crossing into a block written before appears
    in both: in the halo band that lies inside earlier blocks, this block's object and an earlier object are
    joined when most of the band pixels of either one belong to the other (so a U-shaped object that an
    earlier block saw as two pieces is joined with both). The size filter runs once at the end, on the joined
    objects.

    Deliberate deviation: micro-sam runs one watershed over the stitched maps of a tiled prediction
    (``micro_sam/instance_segmentation.py``, ``TiledInstanceSegmentationWithDecoder``); above
    :data:`POSTPROCESS_TILE_PIXELS` that costs more memory than a workstation has, so objects are stitched
    instead (identical wherever no object crosses a block border; a crossing object can differ in the pixels
    its watershed saw only through the halo).
    """
    height, width = foreground.shape
    output = np.zeros((height, width), dtype=np.uint32)
    done = np.zeros((height, width), dtype=bool)
    # parent[id] -> smaller id of a joined object; the root is the earliest (smallest) id
    parent: dict[int, int] = {}
    next_id = 1
    for rows, cols in itertools.product(_tiles_1d(height, block, halo), _tiles_1d(width, block, halo)):
        window = (slice(rows[0], rows[1]), slice(cols[0], cols[1]))
        local = _untiled_instances(
            foreground[window], center_distances[window], boundary_distances[window], **kwargs
        ).astype(np.int64)
        # offset by the ids already handed out, so no two blocks share an id
        local[local > 0] += next_id - 1  # global ids
        # `band`: the part of this window (halo included) that earlier blocks' inner parts already wrote
        band, written = done[window], output[window].astype(np.int64)
        if band.any():
            in_band = band & (local > 0) & (written > 0)
            # one np.unique over (local, written) id pairs packed into int64 (exact while ids stay below 2**31)
            pairs, counts = np.unique(local[in_band] * (1 << 32) + written[in_band], return_counts=True)
            local_sizes = dict(zip(*np.unique(local[band & (local > 0)], return_counts=True)))
            written_sizes = dict(zip(*np.unique(written[band & (written > 0)], return_counts=True)))
            for pair, count in zip(pairs.tolist(), counts.tolist()):
                a, b = pair >> 32, pair & 0xFFFFFFFF
                # 2 * count > min(..): the overlap holds more than half of the band pixels of at least one of the two
                if 2 * count > min(local_sizes[a], written_sizes[b]):
                    ra, rb = _root(parent, a), _root(parent, b)
                    if ra != rb:
                        # link the larger root under the smaller, so every object ends under its earliest id
                        parent[max(ra, rb)] = min(ra, rb)
        inner = (slice(rows[2] - rows[0], rows[3] - rows[0]), slice(cols[2] - cols[0], cols[3] - cols[0]))
        # only the inner part is written: the halo served as context, and inner parts of different blocks are disjoint
        output[rows[2] : rows[3], cols[2] : cols[3]] = local[inner].astype(np.uint32)
        done[rows[2] : rows[3], cols[2] : cols[3]] = True
        # local.max() already carries the offset; a block without objects leaves next_id as it was
        next_id = max(next_id, int(local.max()) + 1)
    # free the H*W mask before the lookup pass allocates another H*W array
    del done
    if parent:
        # flatten the union-find into one lookup table: one vectorised pass over the output instead of per-object writes
        lookup = np.arange(next_id, dtype=np.uint32)
        for x in list(parent):
            lookup[x] = _root(parent, x)
        # the size filter below also closes the id gaps the joins left
        output = lookup[output]
    return _size_filter(output, min_size)


def _untiled_instances(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    center_distance_threshold: float,
    boundary_distance_threshold: float,
    foreground_threshold: float,
    foreground_smoothing: float,
    distance_smoothing: float,
) -> np.ndarray:
    """Seeded watershed of the whole (validated) maps, no size filter."""
    foreground_mask = _smooth(foreground, foreground_smoothing) > foreground_threshold
    return _seeded_watershed(
        foreground_mask,
        _smooth(center_distances, distance_smoothing),
        _smooth(boundary_distances, distance_smoothing),
        center_distance_threshold,
        boundary_distance_threshold,
    )


def distances_to_instances(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    center_distance_threshold: float = 0.5,
    boundary_distance_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    foreground_smoothing: float = 1.0,
    distance_smoothing: float = 1.6,
    min_size: int = 0,
) -> np.ndarray:
    """Instance labels (uint32, 0 = background, objects 1..n) from the decoder's three 2D maps; images above
    :data:`POSTPROCESS_TILE_PIXELS` are processed block by block (:func:`_blockwise_instances`)."""
    foreground, center_distances, boundary_distances = _as_maps(foreground, center_distances, boundary_distances)
    _check_non_negative(foreground_smoothing, "foreground_smoothing")
    _check_non_negative(distance_smoothing, "distance_smoothing")
    if not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
    watershed = dict(
        center_distance_threshold=center_distance_threshold, boundary_distance_threshold=boundary_distance_threshold,
        foreground_threshold=foreground_threshold, foreground_smoothing=foreground_smoothing,
        distance_smoothing=distance_smoothing,
    )
    if foreground.size > POSTPROCESS_TILE_PIXELS:
        return _blockwise_instances(
            foreground, center_distances, boundary_distances, POSTPROCESS_BLOCK, POSTPROCESS_HALO, int(min_size),
            **watershed,
        )
    return _size_filter(_untiled_instances(foreground, center_distances, boundary_distances, **watershed), int(min_size))


# --------------------------------------------------------------------------------------------- tiling


def _tiles_1d(length: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(outer start, outer stop, inner start, inner stop) along one axis.

    Inner blocks of ``tile`` pixels cover the axis (micro-sam's convention: ``tile_shape`` is the block that
    is kept, ``halo`` the context added on each side). Each outer window is ``tile + 2·halo`` long (shorter
    only when the axis is) and is shifted inwards at the image borders, so the model always sees a
    full-size input.
    """
    window = tile + 2 * halo
    if length <= window:
        return [(0, length, 0, length)]  # one window holds the whole axis
    windows = []
    for start in range(0, length, tile):
        # the window is shifted inwards near the far border (length - window) so it never runs past the image, and
        # still contains its inner block, as outer_start <= start and outer_start + window >= inner stop
        outer_start = min(max(start - halo, 0), length - window)
        windows.append((outer_start, outer_start + window, start, min(start + tile, length)))
    return windows


def predict_tiled(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile_shape: tuple[int, int],
    halo: tuple[int, int],
) -> np.ndarray:
    """Run ``predict_fn(tile) -> (C, h, w)`` on overlapping tiles and stitch a seamless (C, H, W) map.

    Tiles cover the first two axes of ``image`` (H, W[, channels]). As in micro-sam, ``tile_shape`` is the
    inner block each tile contributes and the model sees ``tile_shape + 2·halo`` pixels, so a model whose
    receptive field fits in the halo gives the same result as on the whole image (no seams).
    """
    values = np.asarray(image)
    if values.ndim not in (2, 3):
        raise ValueError(f"image must have shape (H, W) or (H, W, C), got shape {values.shape}")
    tile_shape, halo = tuple(int(v) for v in tile_shape), tuple(int(v) for v in halo)
    if len(tile_shape) != 2 or len(halo) != 2:
        raise ValueError(f"tile_shape and halo must be pairs (rows, columns), got {tile_shape} and {halo}")
    if min(tile_shape) < 1 or min(halo) < 0:
        raise ValueError(f"tile_shape must be positive and halo non-negative, got {tile_shape} and {halo}")

    output = None
    for rows, cols in itertools.product(
        _tiles_1d(values.shape[0], tile_shape[0], halo[0]), _tiles_1d(values.shape[1], tile_shape[1], halo[1])
    ):
        tile = values[rows[0] : rows[1], cols[0] : cols[1]]
        prediction = np.asarray(predict_fn(tile))
        if prediction.ndim != 3 or prediction.shape[1:] != tile.shape[:2]:
            raise ValueError(
                f"predict_fn must return shape (C, {tile.shape[0]}, {tile.shape[1]}) for that tile, "
                f"got {prediction.shape}"
            )
        if output is None:
            # dtype and channel count come from the first tile's prediction
            output = np.zeros((prediction.shape[0],) + values.shape[:2], dtype=prediction.dtype)
        # keep the tile's inner block only: its halo predictions (border effects) are dropped, neighbours cover them
        output[:, rows[2] : rows[3], cols[2] : cols[3]] = prediction[
            :, rows[2] - rows[0] : rows[3] - rows[0], cols[2] - cols[0] : cols[3] - cols[0]
        ]
    return output


def segment_tiled(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile_shape: tuple[int, int],
    halo: tuple[int, int],
    **watershed_kwargs: float,
) -> np.ndarray:
    """Instance segmentation of an image larger than the model input: tiled prediction, one post-processing."""
    prediction = _as_prediction(predict_tiled(predict_fn, image, tile_shape, halo), "predict_fn output")
    return distances_to_instances(*prediction, **watershed_kwargs)


# --------------------------------------------------------------------------------------------- grid search


@dataclass
class GridSearchResult:
    """Best watershed parameters by mean mSA over images, with the score of every grid point."""

    params: dict[str, float]
    score: float
    scores: list[tuple[dict[str, float], float]] = field(default_factory=list)


def grid_search_watershed(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    center_distance_thresholds: Sequence[float] = DEFAULT_THRESHOLD_GRID,
    boundary_distance_thresholds: Sequence[float] = DEFAULT_THRESHOLD_GRID,
    distance_smoothings: Sequence[float] = DEFAULT_SMOOTHING_GRID,
    min_sizes: Sequence[int] = DEFAULT_MIN_SIZE_GRID,
    foreground_threshold: float = 0.5,
    foreground_smoothing: float = 1.0,
) -> GridSearchResult:
    """Pick the post-processing parameters with the best mean mSA on validation images.

    ``predictions`` are the decoder's (3, H, W) maps, ``ground_truths`` the instance labels. Each smoothing,
    watershed and overlap table is computed once and shared by the grid points that only differ later
    (min_size); the scores equal ``mean_segmentation_accuracy(distances_to_instances(...), ground_truth)``.
    Ties go to the first grid point in the order of the arguments. The default grid is micro-sam's
    ``default_grid_search_values_instance_segmentation_with_decoder`` (``micro_sam/evaluation/instance_segmentation.py``).
    """
    # evaluation's package imports this module (AIS): a module-level import would make an import cycle
    from .evaluation.metrics import ObjectOverlaps

    if len(predictions) != len(ground_truths) or len(predictions) == 0:
        raise ValueError(
            f"predictions and ground_truths must be non-empty and of equal length, "
            f"got {len(predictions)} and {len(ground_truths)}"
        )
    # repeated values would make duplicate grid tuples, and `index` below keeps only the last of each
    grids = {  # duplicates removed, order kept
        "center_distance_threshold": list(dict.fromkeys(center_distance_thresholds)),
        "boundary_distance_threshold": list(dict.fromkeys(boundary_distance_thresholds)),
        "distance_smoothing": list(dict.fromkeys(distance_smoothings)),
        "min_size": list(dict.fromkeys(min_sizes)),
    }
    for name, grid in grids.items():
        if not grid:
            raise ValueError(f"the grid for {name} must not be empty")
    for sigma in grids["distance_smoothing"]:
        _check_non_negative(sigma, "distance_smoothings")
    for min_size in grids["min_size"]:
        if not isinstance(min_size, (int, np.integer)) or min_size < 0:
            raise ValueError(f"min_sizes must hold non-negative integers, got {min_size!r}")

    points = list(itertools.product(*grids.values()))
    totals = np.zeros(len(points))
    # a grid point's tuple is (t_c, t_b, sigma, min_size), the order of `grids`: the loops below reuse that order
    index = {point: i for i, point in enumerate(points)}
    for prediction, ground_truth in zip(predictions, ground_truths):
        foreground, center, boundary = _as_maps(*_as_prediction(prediction, "predictions[i]"))
        ground_truth = np.asarray(ground_truth)
        if ground_truth.dtype != bool and not np.issubdtype(ground_truth.dtype, np.integer):
            raise TypeError(f"ground_truths must hold integer label images, got dtype {ground_truth.dtype}")
        # connected components of the ground truth: a label id split into pieces counts as several objects
        true_objects = connected_component_labels(ground_truth)  # once per image, as mSA does
        # foreground smoothing and threshold are not searched: one foreground mask per image serves every grid point
        foreground_mask = _smooth(foreground, foreground_smoothing) > foreground_threshold
        for sigma in grids["distance_smoothing"]:
            center_s, boundary_s = _smooth(center, sigma), _smooth(boundary, sigma)
            for t_c, t_b in itertools.product(
                grids["center_distance_threshold"], grids["boundary_distance_threshold"]
            ):
                segmentation = _seeded_watershed(foreground_mask, center_s, boundary_s, t_c, t_b)
                overlaps = ObjectOverlaps.from_images(segmentation, true_objects, relabel_ground_truth=False)
                for min_size in grids["min_size"]:
                    # The size filter only removes predicted objects: drop their rows instead of recomputing.
                    kept = overlaps.keep_predictions(overlaps.pred_sizes >= min_size)
                    totals[index[(t_c, t_b, sigma, min_size)]] += kept.segmentation_accuracies().mean()
    means = totals / len(predictions)
    scores = [(dict(zip(grids, point)), float(mean)) for point, mean in zip(points, means)]
    best = int(np.argmax(means))
    return GridSearchResult(params=scores[best][0], score=scores[best][1], scores=scores)
