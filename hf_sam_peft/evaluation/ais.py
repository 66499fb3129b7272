"""Automatic instance segmentation (AIS) evaluation: UNETR maps -> seeded watershed -> mSA, SA50, SA75.

Per image the model predicts the decoder's three maps (foreground, centre and boundary distances) with
:func:`hf_sam_peft.modeling.unetr.predict_distances` at the image's resolution. Images larger than the
model input are predicted in overlapping tiles (:func:`hf_sam_peft.instance_segmentation.predict_tiled`;
by default each window is exactly the model input, the halo an eighth of it), so large images keep their
resolution instead of being shrunk to the input size. Maps become instances with
:func:`~hf_sam_peft.instance_segmentation.distances_to_instances`.

Watershed parameters: micro-sam's defaults (:data:`DEFAULT_WATERSHED`), or — as the paper does — the best
ones of a grid search on a validation split (:func:`~hf_sam_peft.instance_segmentation.grid_search_watershed`,
as ``run_instance_segmentation_grid_search_and_inference`` in ``micro_sam/evaluation/instance_segmentation.py``),
then applied unchanged to the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hf_sam_peft.evaluation.interactive import validate_row
from hf_sam_peft.evaluation.metrics import DEFAULT_THRESHOLDS, ObjectOverlaps
from hf_sam_peft.evaluation.predictor import (
    eval_mode,
    has_unetr,
    image_size_of,
    model_device_dtype,
)
from hf_sam_peft.instance_segmentation import (
    distances_to_instances,
    grid_search_watershed,
    predict_tiled,
)
from hf_sam_peft.modeling.unetr import predict_distances
from hf_sam_peft.sam_forward.preprocess import image_preprocessor

__all__ = [
    "DEFAULT_WATERSHED",
    "evaluate_ais",
    "predict_ais_maps",
    "segment_ais",
    "tiling_for",
]

# micro-sam's InstanceSegmentationWithDecoder.generate defaults.
DEFAULT_WATERSHED: dict[str, float] = {
    "center_distance_threshold": 0.5,
    "boundary_distance_threshold": 0.5,
    "foreground_threshold": 0.5,
    "foreground_smoothing": 1.0,
    "distance_smoothing": 1.6,
    "min_size": 50,
}
# sa75 found by value: the threshold is 0.7500000000000002 (np.arange), index 5, the scores[5] µSAM reports
# (micro_sam/evaluation/evaluation.py, _run_evaluation)
_SA_INDEX = {"sa50": 0, "sa75": int(np.argmin(np.abs(DEFAULT_THRESHOLDS - 0.75)))}
NO_DECODER_MESSAGE = (
    "AIS needs a UNETR decoder: the model has none (save it with the adapter as <adapter>/unetr via "
    "save_unetr, or train with 'unetr_decoder' in modules_to_save)"
)


def _require_decoder(model: nn.Module) -> None:
    if not has_unetr(model):
        raise ValueError(NO_DECODER_MESSAGE)


def tiling_for(model: nn.Module, shape: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Default ``(tile_shape, halo)`` for an image of ``shape`` larger than the model input, else None:
    windows of exactly the input size, with a halo of an eighth of it on each side."""
    size = image_size_of(model)
    # fits the input: one whole-image pass (the model's preprocessing brings it to the input size), no tiles
    if max(int(shape[0]), int(shape[1])) <= size:
        return None
    halo = size // 8
    # predict_tiled feeds tile + 2 * halo pixels: each window is then exactly the model input
    return (size - 2 * halo,) * 2, (halo, halo)  # type: ignore[return-value]


def _map_predictor(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """``image (H, W[, C]) -> (3, H, W)`` float32 maps of the UNETR decoder (no gradients, eval mode)."""
    size = image_size_of(model)
    preprocess = image_preprocessor(model)
    device, dtype = model_device_dtype(model)

    @torch.no_grad()
    def predict(image: np.ndarray) -> np.ndarray:
        pixel_values, reshaped = preprocess(image, size)
        with eval_mode(model):
            # input_shape / original_shape: the decoder crops the padding and answers at this image's (or tile's)
            # own size, which predict_tiled checks
            maps = predict_distances(
                model, pixel_values[None].to(device, dtype), input_shape=reshaped, original_shape=image.shape[:2]
            )
        # float32 NumPy for the watershed, whatever the model's dtype
        return maps[0].float().cpu().numpy()

    return predict


def predict_ais_maps(
    model: nn.Module,
    image: np.ndarray,
    tile_shape: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
) -> np.ndarray:
    """The decoder's ``(3, H, W)`` maps for one image, tiled when it is larger than the model input (or when
    ``tile_shape`` is given)."""
    _require_decoder(model)
    image = np.asarray(image)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
        raise ValueError(f"image must be a 2D image of shape (H, W) or (H, W, 1|3), got shape {image.shape}")
    predict = _map_predictor(model)
    if tile_shape is None:
        tiling = tiling_for(model, image.shape)
        if tiling is None:
            return predict(image)
        tile_shape, default_halo = tiling
        # a caller's halo is kept with the default windows
        halo = default_halo if halo is None else halo
    # tile_shape given without a halo: tiles without overlap
    return predict_tiled(predict, image, tuple(tile_shape), tuple(halo if halo is not None else (0, 0)))


def segment_ais(
    model: nn.Module,
    image: np.ndarray,
    tile_shape: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    **watershed: float,
) -> np.ndarray:
    """Instance labels (uint32) of one image by AIS; ``watershed`` overrides :data:`DEFAULT_WATERSHED`."""
    unknown = set(watershed) - set(DEFAULT_WATERSHED)
    if unknown:
        raise ValueError(f"unknown watershed parameters {sorted(unknown)}; valid: {sorted(DEFAULT_WATERSHED)}")
    maps = predict_ais_maps(model, image, tile_shape, halo)
    return distances_to_instances(*maps, **{**DEFAULT_WATERSHED, **watershed})


def _score(instances: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    # one overlap table for all thresholds; SA50 / SA75 are entries of the same per-threshold vector
    accuracies = ObjectOverlaps.from_images(instances, labels).segmentation_accuracies()
    return {"msa": float(accuracies.mean()), **{k: float(accuracies[i]) for k, i in _SA_INDEX.items()}}


def _iter_maps(
    model: nn.Module, rows: Iterable[Any], desc: str, progress: bool, skip: Container[int] = (), **tiling: Any
) -> Iterator[tuple]:
    """``(index, id, maps, labels)`` per row not in ``skip``, one image in memory at a time; an empty ``rows``
    is an error."""
    try:
        total = len(rows)  # type: ignore[arg-type]
    except TypeError:
        total = None
    # stays -1 only if rows yield nothing: an empty split is an error, not a mean over no images
    index = -1
    for index, row in enumerate(tqdm(rows, total=total, desc=desc, unit="image", disable=not progress)):
        # before validation and prediction: images a resumed run already has cost nothing
        if index in skip:
            continue
        image, labels, _, image_id = validate_row(row, index)
        yield index, image_id, predict_ais_maps(model, image, **tiling), labels
    if index < 0:
        raise ValueError(f"no rows to evaluate ({desc})")


def evaluate_ais(
    model: nn.Module,
    rows: Iterable[Any],
    val_rows: Iterable[Any] | None = None,
    grid: dict[str, Sequence[float]] | None = None,
    watershed: dict[str, float] | None = None,
    tile_shape: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    keep_segmentations: bool = False,
    progress: bool = True,
    done: Mapping[int, dict[str, Any]] | None = None,
    on_image: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """AIS scores on ``rows`` (dicts with ``image`` and ``labels``): mean over images of mSA, SA50 and SA75.

    With ``val_rows`` the watershed parameters are grid-searched there first (``grid``: keyword arguments
    of :func:`~hf_sam_peft.instance_segmentation.grid_search_watershed`, e.g. ``{"min_sizes": [50]}``;
    default: the paper's grid) and the best are applied to ``rows``; otherwise ``watershed`` (overrides of
    :data:`DEFAULT_WATERSHED`) is used. Returns ``{"msa", "sa50", "sa75", "params", "grid_search_score",
    "images", "n_images"}`` (+ ``"segmentations"`` with ``keep_segmentations``).

    ``on_image(index, result)`` / ``done``: as in :func:`~hf_sam_peft.evaluation.interactive.evaluate_interactive`
    (the images of ``rows`` a crashed run finished are not run again; the grid search is, it is deterministic).
    """
    _require_decoder(model)
    done = dict(done or {})
    if done and keep_segmentations:
        raise ValueError("keep_segmentations needs every image run now: pass done=None")
    params = dict(DEFAULT_WATERSHED)
    unknown = set(watershed or {}) - set(DEFAULT_WATERSHED)
    if unknown:
        raise ValueError(f"unknown watershed parameters {sorted(unknown)}; valid: {sorted(DEFAULT_WATERSHED)}")
    params.update(watershed or {})
    tiling = {"tile_shape": tile_shape, "halo": halo}
    grid_score = None
    if val_rows is not None:
        # all validation maps held at once: the grid search scores every grid point on every image
        validation = list(_iter_maps(model, val_rows, "AIS grid search (validation)", progress, **tiling))
        grid_kwargs = dict(grid or {})
        # not searched: the grid runs with the foreground threshold and smoothing in use (defaults or `watershed`)
        grid_kwargs.setdefault("foreground_threshold", params["foreground_threshold"])
        grid_kwargs.setdefault("foreground_smoothing", params["foreground_smoothing"])
        search = grid_search_watershed([m for _, _, m, _ in validation], [lab for _, _, _, lab in validation], **grid_kwargs)
        # the searched parameters take their best values; the others stay as they were
        params.update(search.params)
        grid_score = search.score
    elif grid is not None:
        raise ValueError("grid needs val_rows: the grid search runs on a validation split")

    # images an interrupted run finished count with their stored scores
    scored, segmentations = dict(done), []
    for index, image_id, maps, labels in _iter_maps(model, rows, "AIS evaluation", progress, skip=done, **tiling):
        instances = distances_to_instances(*maps, **params)
        # ids are 1..n after the size filter, so the maximum is the object count
        scored[index] = {"id": image_id, "n_objects": int(instances.max()), **_score(instances, labels)}
        if on_image is not None:
            on_image(index, scored[index])
        if keep_segmentations:
            segmentations.append(instances)
    # row order, wherever each result came from
    images = [scored[index] for index in sorted(scored)]
    # the mean over images, each image once, as µSAM averages its per-image msas
    out: dict[str, Any] = {key: float(np.mean([image[key] for image in images])) for key in ("msa", "sa50", "sa75")}
    out.update(params=params, grid_search_score=grid_score, images=images, n_images=len(images))
    if keep_segmentations:
        out["segmentations"] = segmentations
    return out
