"""Interactive segmentation evaluation: point / box start and 7 corrections, scored per round (Point, Box, I_P, I_B).

Per image the embedding is computed once (no gradients). For every ground-truth object, 8 rounds =
initial prompt + ``n_corrections`` corrections, as µSAM's ``run_inference_with_iterative_prompting``
(``micro_sam/evaluation/inference.py``):

- point start: one positive point at the object's **centre** (:func:`hf_sam_peft.prompts.center_points`).
  µSAM passes the centres of ``get_centers_and_bounding_boxes`` (``micro_sam/util.py``), vigra's
  eccentricity centres at paper time; we use the pixel farthest from the object's boundary (maximum of the
  Euclidean distance transform, image border as boundary, first in raster order on ties): it needs no
  vigra, always lies inside the object, and is what later µSAM versions compute there themselves. Round 0
  asks for SAM's multimask output and keeps the mask with the highest predicted IoU; the predictor may
  answer through the single-mask output instead when the adapter trained points that way
  (:class:`~hf_sam_peft.evaluation.predictor.SamPredictor`'s ``point_multimask``). Box start: the exact
  ground-truth box (no jitter), single mask;
- each correction adds one positive point uniform in the false negatives and one negative point uniform in
  the false positives of the **predicted segmentation** (best mask binarised at logits > 0 at the image's
  resolution), with :func:`hf_sam_peft.prompts.correction_points`' fallbacks; points accumulate, the box
  stays; no mask input. So at round k an object has 1 + 2k points (point start) or the box + 2k points.

Objects run in chunks of ``batch_size`` through the mask decoder. The correction points are the only
randomness (Point and Box are deterministic): one generator per (image, start) seeded by ``seed``
(:func:`hf_sam_peft.sam_forward.prompt_generator`), so a run is reproducible; results depend on
``batch_size`` only through the order of draws.

Scores per round, each averaged per image and then over images:

- ``msa``: mean segmentation accuracy of the instance image assembled from the objects' masks
  (:func:`assemble_instances`, µSAM's ``mask_data_to_segmentation(..., with_background=True,
  label_masks=True)`` in ``micro_sam/instance_segmentation.py``): masks are pasted largest first, so a
  smaller object overwrites a larger one where they overlap; then connected components, so a mask of two
  blobs counts as two objects; a segment that covers more pixels than the background is taken for
  background and removed (as in the reference);
- ``dice``: Dice of the union of the predicted masks vs the union of the ground-truth objects; for rows
  with a ``semantic`` column, per class (each object's masks count for its class) and averaged over the
  classes present in the image (medical tasks);
- ``iou``: mean IoU of each object's mask with its own ground-truth object (no assembly, no matching).

Reported: Point = round 0 of the point run, Box = round 0 of the box run, I_P / I_B = the last round
(round ``n_corrections``) of each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from skimage.measure import label as connected_components

from hf_sam_peft.evaluation.metrics import dice_score, mean_segmentation_accuracy
from hf_sam_peft.evaluation.predictor import PromptPredictor, SamPredictor
from hf_sam_peft.prompts import (
    boxes_from_masks,
    center_points,
    correction_points,
)
from hf_sam_peft.sam_forward.seeding import prompt_generator

__all__ = [
    "START_MODES",
    "ObjectRound",
    "SCORING",
    "assemble_instances",
    "class_dice",
    "evaluate_interactive",
    "format_per_class",
    "iter_object_rounds",
    "segment_from_labels",
    "validate_row",
]

START_MODES = ("point", "box")
SUMMARY_KEYS = {"point": ("point", "ip"), "box": ("box", "ib")}  # start -> (round 0 name, last round name)
METRICS = ("msa", "dice", "iou")
# Generator streams of evaluation (training uses 0 and 1): each start has its own prompts.
# evaluating one start alone (starts=("box",)) therefore draws the same points as a run of both
_STREAMS = {"point": 2, "box": 3}


@dataclass
class ObjectRound:
    """One round for a chunk of objects: the best masks ``(N, H, W)`` (bool) and the prompts that made them
    (``points`` ``(N, P, 2)`` (x, y) with ``labels`` ``(N, P)``, and/or ``boxes`` ``(N, 4)``, image frame)."""

    index: int
    masks: torch.Tensor
    points: torch.Tensor | None
    labels: torch.Tensor | None
    boxes: torch.Tensor | None

    @property
    def n_points(self) -> int:
        return 0 if self.points is None else int(self.points.shape[1])


# --------------------------------------------------------------------------------------------- input checks


def _as_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def validate_row(row: Any, index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """``(image, labels, semantic or None, id)`` of a dataset row, or a one-line error naming the problem."""
    if not isinstance(row, dict) or "image" not in row or "labels" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"row {index} must be a dict with 'image' and 'labels', got {keys}")
    image, labels = _as_numpy(row["image"]), _as_numpy(row["labels"])
    if labels.ndim != 2:
        raise ValueError(f"row {index}: labels must be a 2D (H, W) label image, got shape {labels.shape} (evaluate 3D data per slice)")
    # float label maps are refused, not cast: truncating non-integer ids would silently merge or split objects
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"row {index}: labels must hold integer object ids, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"row {index}: labels must be non-negative, got minimum {labels.min()}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
        raise ValueError(f"row {index}: image must be (H, W) or (H, W, 1|3), got shape {image.shape}")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"row {index}: image shape {image.shape[:2]} does not match labels shape {labels.shape}")
    semantic = None
    if row.get("semantic") is not None:
        semantic = _as_numpy(row["semantic"])
        if semantic.shape != labels.shape or not np.issubdtype(semantic.dtype, np.integer):
            raise ValueError(f"row {index}: semantic must be an integer map of shape {labels.shape}, got {semantic.dtype} {semantic.shape}")
    return image, labels.astype(np.int64, copy=False), semantic, str(row.get("id", index))


def _as_predictor(model: Any) -> PromptPredictor:
    if isinstance(model, nn.Module):
        return SamPredictor(model)
    if isinstance(model, PromptPredictor):
        return model
    raise TypeError(
        "model must be a SamModel / Sam2Model / PeftModel or a prompt predictor (set_image + predict), "
        f"got {type(model).__name__}"
    )


# --------------------------------------------------------------------------------------------- rounds


def _best_masks(predictor: PromptPredictor, prompts: dict, multimask: bool, shape: tuple[int, ...]) -> torch.Tensor:
    """Per object the mask with the highest predicted IoU, at the image's resolution.

    A predictor with ``predict_best`` (:class:`SamPredictor`) picks the mask before upscaling (only one of
    three masks is upscaled for a multimask answer); any other prompt predictor answers through ``predict``.
    """
    predict_best = getattr(predictor, "predict_best", None)
    if callable(predict_best):
        masks = predict_best(multimask=multimask, **prompts)
        if tuple(masks.shape) != tuple(shape):
            raise ValueError(f"predictor returned best masks of shape {tuple(masks.shape)}, expected {tuple(shape)}")
        return masks.bool()
    logits, iou = predictor.predict(multimask=multimask, **prompts)
    if logits.ndim != 4 or tuple(logits.shape[-2:]) != shape[-2:] or logits.shape[0] != shape[0]:
        raise ValueError(f"predictor returned masks of shape {tuple(logits.shape)}, expected (N, K, {shape[1]}, {shape[2]})")
    if iou.shape != logits.shape[:2]:
        raise ValueError(f"predictor returned IoU predictions of shape {tuple(iou.shape)}, expected {tuple(logits.shape[:2])}")
    # a predictor may return its IoUs on another device (e.g. CPU) than its logits: index on the logits' device
    best = iou.argmax(-1).to(logits.device)
    # logits > 0: SAM's mask threshold, the same binarisation as predict_best
    return logits[torch.arange(logits.shape[0], device=logits.device), best] > 0


def iter_object_rounds(
    predictor: PromptPredictor,
    gt_masks: torch.Tensor,
    start: str,
    n_corrections: int = 7,
    generator: torch.Generator | None = None,
) -> Iterator[ObjectRound]:
    """Rounds 0..n_corrections for a chunk of objects ``gt_masks`` ``(N, H, W)`` of the predictor's current image.

    Round 0 of the point start asks for multimask output; the predictor decides whether it answers through
    it (``SamPredictor(point_multimask=...)``). ``generator`` draws the correction points only.
    """
    if start not in START_MODES:
        raise ValueError(f"start must be one of {START_MODES}, got {start!r}")
    if not isinstance(n_corrections, int) or n_corrections < 0:
        raise ValueError(f"n_corrections must be a non-negative int, got {n_corrections!r}")
    gt = gt_masks.bool()
    points = labels = boxes = None
    if start == "point":
        points, labels = center_points(gt)
    else:
        # jitter=0.0 explicitly: the default is training's box noise; with 0 nothing is drawn, so the generator's
        # draws stay the corrections' only and round 0 of the box start is deterministic
        boxes = boxes_from_masks(gt, jitter=0.0)
    for index in range(n_corrections + 1):
        prompts = {"points": points, "labels": labels, "boxes": boxes}
        # multimask for the lone starting point only: µSAM switches multimasking off after the first iteration
        # (micro_sam/evaluation/inference.py, _run_inference_with_iterative_prompting_for_image); on gt's device
        # because correction_points compares the two masks element-wise
        masks = _best_masks(predictor, prompts, start == "point" and index == 0, tuple(gt.shape)).to(gt.device)
        yield ObjectRound(index, masks, points, labels, boxes)
        # no correction after the last round: its points would never be decoded
        if index == n_corrections:
            return
        # sampled against the binarised best mask, not the logits: µSAM's IterativePromptGenerator gets the outputs'
        # "segmentation" masks (micro_sam/evaluation/inference.py, _run_inference_with_iterative_prompting_for_image)
        new_points, new_labels = correction_points(masks, gt, generator)
        if points is None:
            points, labels = new_points, new_labels
        else:
            # points accumulate along P while the box (if any) is passed again unchanged each round, as µSAM
            # concatenates next_coords onto its points; no mask input (µSAM's use_masks=False default)
            points, labels = torch.cat([points, new_points], 1), torch.cat([labels, new_labels], 1)


# --------------------------------------------------------------------------------------------- scoring


def assemble_instances(masks: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance image (uint32) from per-object masks (flat pixel indices or 2D bool masks), µSAM's rule.

    As ``mask_data_to_segmentation(masks, with_background=True, label_masks=True)``
    (``micro_sam/instance_segmentation.py``): masks are pasted largest first (ties in input order), so
    smaller objects stay on top where they overlap; the result then goes through connected components
    (``skimage.measure.label``, full connectivity), so a mask of two blobs becomes two objects and an object
    cut in two by a smaller one on top becomes two; a segment that covers more pixels than the background is
    taken for background and dropped; ids are relabelled 1..n in raster order of first appearance.
    (Later µSAM versions default to ``merge_exclusively=True``, where a mask only fills pixels still empty;
    the paper-time rule pasted over.)
    """
    # flat pixel indices are what _run_image keeps per round: far smaller than full-size bool masks for small objects
    flat = [np.flatnonzero(m) if np.asarray(m).dtype == bool else np.asarray(m) for m in masks]
    order = sorted(range(len(flat)), key=lambda i: flat[i].size, reverse=True)  # stable: ties keep input order
    # flat so the indices paste directly; each paste overwrites what larger masks put there (the paper-time rule,
    # not merge_exclusively)
    segmentation = np.zeros(int(np.prod(shape)), dtype=np.uint32)
    for new_id, i in enumerate(order, start=1):
        segmentation[flat[i]] = new_id
    if not order:
        return segmentation.reshape(shape)
    # label_masks=True: from here on only the regions count, the pasted ids are replaced by component ids
    components = connected_components(segmentation.reshape(shape), background=0).ravel()
    counts = np.bincount(components)
    # with_background=True: the largest segment, background included, is dropped unless it is the background
    # itself (µSAM's mask_data_to_segmentation: bg_id = seg_ids[np.argmax(sizes)])
    dominant = int(np.argmax(counts))
    if dominant != 0:
        components[components == dominant] = 0
        counts[dominant] = 0
    # label() numbers components in raster order; the cumsum lookup closes the gap a dropped segment leaves,
    # keeping that order
    present = counts > 0
    present[0] = False
    lookup = (np.cumsum(present) * present).astype(np.uint32)
    return lookup[components].reshape(shape)


def class_dice(masks: list[np.ndarray], object_classes: np.ndarray, ground_truth: np.ndarray) -> dict[int, float]:
    """Dice per class present among the objects: the union of the class's predicted masks (flat pixel
    indices) against ``ground_truth == class``.

    medico-sam's per-class evaluation (``medico_sam/evaluation/evaluation.py``,
    ``_run_evaluation_per_semantic_class``): each class is prompted object by object (connected components of
    its mask, ``medico_sam/evaluation/inference.py``), the class's prediction is the union of those objects'
    masks (``pred > 0``) and is scored against the class's mask. Classes absent from an image are skipped.
    """
    shape = ground_truth.shape
    scores = {}
    # only classes with an object in this image: an absent class would score Dice 0 on two empty masks
    for cls in np.unique(object_classes):
        # flat, as the masks are flat pixel indices
        predicted = np.zeros(ground_truth.size, dtype=bool)
        for mask, c in zip(masks, object_classes):
            if c == cls:
                predicted[mask] = True
        scores[int(cls)] = float(dice_score(predicted.reshape(shape), ground_truth == cls))
    return scores


@dataclass
class _ImageRounds:
    """Per round (list index) the flat pixel indices of every object's mask, in object order."""

    masks: list[list[np.ndarray]]
    ious: list[list[float]]


def _run_image(
    predictor: PromptPredictor,
    labels: np.ndarray,
    object_ids: np.ndarray,
    start: str,
    n_corrections: int,
    batch_size: int,
    generator: torch.Generator,
) -> _ImageRounds:
    n_rounds = n_corrections + 1
    rounds = _ImageRounds([[] for _ in range(n_rounds)], [[] for _ in range(n_rounds)])
    label_tensor = torch.from_numpy(labels)
    # chunks share one generator: batch_size changes the order of the draws, not how each point is drawn
    for first in range(0, len(object_ids), batch_size):
        ids = torch.from_numpy(object_ids[first : first + batch_size])
        # (n, H, W) masks built per chunk, so only batch_size full-size ground-truth masks exist at a time
        gt = label_tensor[None] == ids[:, None, None]
        for output in iter_object_rounds(predictor, gt, start, n_corrections, generator):
            masks = output.masks.cpu()
            # the "iou" metric: each mask against its own object, no assembly and no matching
            inter = (masks & gt).flatten(1).sum(-1).double()
            union = (masks | gt).flatten(1).sum(-1).double()
            rounds.ious[output.index].extend((inter / union).tolist())
            rounds.masks[output.index].extend(np.flatnonzero(m) for m in masks.numpy().reshape(len(ids), -1))
    return rounds


def _object_classes(labels: np.ndarray, semantic: np.ndarray | None, object_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class per object and the class map to score Dice against (foreground = class 1 without semantics)."""
    if semantic is None:
        # no semantic map: every object is class 1 and Dice is scored on the foreground
        return np.ones(len(object_ids), dtype=np.int64), (labels > 0).astype(np.int64)
    classes = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    classes[labels.ravel()] = semantic.ravel()  # an object has one class (the dataset builder makes it so)
    # class pixels outside every labelled object (so never prompted) count as background in the class map
    return classes[object_ids], np.where(labels > 0, semantic, 0)


def segment_from_labels(
    model: nn.Module | PromptPredictor,
    image: np.ndarray,
    labels: np.ndarray,
    start: str = "box",
    n_corrections: int = 0,
    batch_size: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """Prompt-based instance segmentation of one image from its label image (box or point per object,
    optionally with corrections), assembled with :func:`assemble_instances`' overlap rule."""
    if start not in START_MODES:
        raise ValueError(f"start must be one of {START_MODES}, got {start!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    predictor = _as_predictor(model)
    image, labels, _, _ = validate_row({"image": image, "labels": labels})
    object_ids = np.unique(labels)
    object_ids = object_ids[object_ids != 0]
    if object_ids.size == 0:
        return np.zeros(labels.shape, dtype=np.uint32)
    predictor.set_image(image)
    # index 0: the stream of evaluate_interactive's first row, so both give the same prompts for that image
    generator = prompt_generator(seed, _STREAMS[start], 0)
    rounds = _run_image(predictor, labels, object_ids, start, n_corrections, batch_size, generator)
    return assemble_instances(rounds.masks[-1], labels.shape)


# --------------------------------------------------------------------------------------------- evaluation


def _iter_rows(dataset_or_rows: Any) -> tuple[Iterable[Any], int | None]:
    # a single row: a dict is iterable too (over its keys), so wrap it first
    if isinstance(dataset_or_rows, dict):
        dataset_or_rows = [dataset_or_rows]
    if not isinstance(dataset_or_rows, Iterable):
        raise TypeError(f"dataset_or_rows must be a dataset or an iterable of rows, got {type(dataset_or_rows).__name__}")
    try:
        # generators have no len(): tqdm then counts without a total
        total = len(dataset_or_rows)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return dataset_or_rows, total


SCORING = {
    "instances": "instances: mSA of the assembled instances; Dice of all objects' union vs all ground truth",
    "semantic": "semantic classes: Dice per class (union of the class's object masks vs the class's mask), "
    "averaged over the classes in each image, then over images; mSA over the class regions as objects",
}
"""What each value of a result's ``"scoring"`` means (printed beside results tables)."""


def _per_class_summary(images: list[dict[str, Any]], starts: Sequence[str]) -> dict[str, dict[int, float]]:
    """``{"point"|"box"|"ip"|"ib": {class: Dice averaged over the images that hold the class}}``."""
    out: dict[str, dict[int, float]] = {}
    for start in starts:
        first, last = SUMMARY_KEYS[start]
        classes = sorted({cls for image in images for cls in image[start]["dice_per_class"]})
        for key, index in ((first, 0), (last, -1)):
            out[key] = {
                cls: float(np.mean([image[start]["dice_per_class"][cls][index] for image in images
                                    if cls in image[start]["dice_per_class"]]))
                for cls in classes
            }
    return out


def format_per_class(result: dict[str, Any], digits: int = 3) -> str:
    """A small table of per-class Dice (rows: classes; columns: Point, Box, I_P, I_B), or "" without classes."""
    summary = result.get("dice_per_class")
    if not summary:
        return ""
    titles = {"point": "Point", "box": "Box", "ip": "I_P", "ib": "I_B"}
    columns = [key for key in titles if key in summary]
    classes = sorted({cls for key in columns for cls in summary[key]})
    lines = ["| class | " + " | ".join(f"{titles[k]} Dice" for k in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for cls in classes:
        values = [f"{summary[k][cls]:.{digits}f}" if cls in summary[k] else "" for k in columns]
        lines.append(f"| {cls} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _restored(result: Mapping[str, Any], starts: Sequence[str]) -> dict[str, Any]:
    """A per-image result read back from JSON: its class ids (JSON object keys, so strings) as ints again."""
    missing = [start for start in starts if start not in result]
    if missing:
        raise ValueError(f"done: an earlier image result has no {missing[0]!r} scores (another evaluation's?)")
    out = dict(result)
    for start in starts:
        scores = dict(out[start])
        if "dice_per_class" in scores:
            scores["dice_per_class"] = {int(k): v for k, v in scores["dice_per_class"].items()}
        out[start] = scores
    return out


def evaluate_interactive(
    model: nn.Module | PromptPredictor,
    dataset_or_rows: Any,
    n_corrections: int = 7,
    starts: Sequence[str] = START_MODES,
    seed: int = 0,
    batch_size: int = 16,
    keep_segmentations: bool = False,
    progress: bool = True,
    done: Mapping[int, dict[str, Any]] | None = None,
    on_image: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Interactive evaluation of a SAM (or any prompt predictor) on rows ``{"image", "labels"[, "semantic", "id"]}``.

    Returns ``{"msa"|"dice"|"iou": {"point", "box", "ip", "ib"}, "rounds": {start: {metric: [per round]}},
    "images": [per-image results], "n_images", "n_objects", "n_corrections", "seed", "batch_size",
    "scoring"}`` (``"semantic"`` when rows carry a ``semantic`` class map, see :data:`SCORING`; then also
    ``"dice_per_class": {"point"|"box"|"ip"|"ib": {class: Dice}}``), plus
    ``"segmentations": {start: [(round 0, last round) instance images per image]}`` with ``keep_segmentations``.
    Images without objects are skipped (counted in ``"n_skipped"``).

    ``on_image(index, result)`` is called as each image finishes (``evaluate --out`` appends it to a journal,
    so that a crash loses at most the image in progress); ``done`` maps row indices to such results from an
    earlier, interrupted run with the same settings: those images are taken as they are, not run again
    (prompts are drawn per image index, so the scores are those the image would get now).
    """
    # dedupe, keeping the order: a start given twice would run twice
    starts = tuple(dict.fromkeys(starts))
    if done and keep_segmentations:
        raise ValueError("keep_segmentations needs every image run now: pass done=None")
    if not starts or any(s not in START_MODES for s in starts):
        raise ValueError(f"starts must be a non-empty subset of {START_MODES}, got {starts!r}")
    if not isinstance(n_corrections, int) or n_corrections < 0:
        raise ValueError(f"n_corrections must be a non-negative int, got {n_corrections!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    predictor = _as_predictor(model)
    rows, total = _iter_rows(dataset_or_rows)

    per_image: list[dict[str, Any]] = []
    segmentations: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in starts}
    n_skipped = 0
    for index, row in enumerate(tqdm(rows, total=total, desc="interactive evaluation", unit="image", disable=not progress)):
        if done and index in done:
            per_image.append(_restored(done[index], starts))
            continue
        image, labels, semantic, image_id = validate_row(row, index)
        # prompts go per label id, not per connected component, as µSAM prompts the ids of relabel_sequential(gt);
        # mSA relabels the ground truth to components (metrics.py), as µSAM's _run_evaluation does with label(gt)
        # (micro_sam/evaluation/inference.py, run_inference_with_iterative_prompting; .../evaluation.py)
        object_ids = np.unique(labels)
        object_ids = object_ids[object_ids != 0]
        # nothing to prompt (and elf's rule would score it 0): skipped and counted, not averaged in
        if object_ids.size == 0:
            n_skipped += 1
            continue
        classes, class_map = _object_classes(labels, semantic, object_ids)
        predictor.set_image(image)  # one embedding per image, shared by both starts
        result: dict[str, Any] = {"id": image_id, "n_objects": int(object_ids.size)}
        for start in starts:
            # seeded by (seed, start, row index), not by the images before it: what lets a resumed run (done) take
            # finished images as they are
            generator = prompt_generator(seed, _STREAMS[start], index)
            rounds = _run_image(predictor, labels, object_ids, start, n_corrections, batch_size, generator)
            scores = {metric: [] for metric in METRICS}
            per_class: dict[int, list[float]] = {}
            assembled = []
            for masks, ious in zip(rounds.masks, rounds.ious):
                instances = assemble_instances(masks, labels.shape)
                assembled.append(instances)
                scores["msa"].append(float(mean_segmentation_accuracy(instances, labels)))
                # per image the mean over its classes present; without a semantic map that is the one foreground class
                dice_by_class = class_dice(masks, classes, class_map)
                scores["dice"].append(float(np.mean(list(dice_by_class.values()))))
                for cls, value in dice_by_class.items():
                    per_class.setdefault(cls, []).append(value)
                scores["iou"].append(float(np.mean(ious)))
            if semantic is not None:
                scores["dice_per_class"] = per_class
            result[start] = scores
            if keep_segmentations:
                # round 0 and the last round only: the two reported columns (Point / Box and I_P / I_B)
                segmentations[start].append((assembled[0], assembled[-1]))
        per_image.append(result)
        if on_image is not None:
            # after the image is complete: a journal line never holds a partial image
            on_image(index, result)
    if not per_image:
        raise ValueError("dataset_or_rows holds no image with objects to evaluate")

    out: dict[str, Any] = {metric: {} for metric in METRICS}
    out["rounds"] = {}
    for start in starts:
        out["rounds"][start] = {
            # per round, the mean over images (axis 0): each image counts once whatever its object count
            metric: np.mean([image[start][metric] for image in per_image], axis=0).tolist() for metric in METRICS
        }
        first, last = SUMMARY_KEYS[start]
        for metric in METRICS:
            out[metric][first] = out["rounds"][start][metric][0]
            out[metric][last] = out["rounds"][start][metric][-1]
    # rows with and without a semantic map may mix: the per-class summary uses only those with one
    semantic_images = [image for image in per_image if "dice_per_class" in image[starts[0]]]
    out["scoring"] = "semantic" if semantic_images else "instances"
    if semantic_images:
        out["dice_per_class"] = _per_class_summary(semantic_images, starts)
    out.update(
        images=per_image,
        n_images=len(per_image),
        n_objects=int(sum(image["n_objects"] for image in per_image)),
        n_skipped=n_skipped,
        n_corrections=n_corrections,
        seed=seed,
        batch_size=batch_size,
    )
    if keep_segmentations:
        out["segmentations"] = segmentations
    return out
