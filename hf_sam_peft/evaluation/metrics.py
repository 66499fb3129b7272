"""Segmentation metrics of the paper: mean segmentation accuracy (microscopy) and Dice (medical).

``mean_segmentation_accuracy`` reproduces what micro-sam reports (``elf.evaluation.mean_segmentation_accuracy``
called on ``skimage.measure.label(ground_truth)``), so numbers are comparable with the paper:

- the ground truth is relabelled to connected components first (full connectivity), label 0 is background;
- IoU between every predicted and every true object (object sizes include pixels on the other's background);
- for each threshold t of ``np.arange(0.5, 1.0, 0.05)`` (the same floating-point values as elf) the
  number of true positives is the size of an optimal one-to-one matching on IoU >= t (Hungarian);
- SA(t) = TP / (TP + FP + FN), and 0 whenever TP = 0 -- so an empty prediction on an empty ground truth
  also scores 0, as in elf; mSA is the mean over thresholds.

The overlaps are kept sparse (only pairs of objects that touch, counted in linear time), and the matching
is solved per connected component of the "IoU >= t" graph, so images with thousands of objects stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import label as connected_component_labels

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ObjectOverlaps",
    "average_over_images",
    "dice_score",
    "match_counts",
    "mean_segmentation_accuracy",
    "metric_path",
    "segmentation_accuracy_at",
    "segmentation_accuracy_per_threshold",
]

# Same values as elf's np.arange(0.5, 1.0, 0.05) (e.g. 0.6000000000000001), on purpose: an IoU of exactly
# 0.6 does not pass the third threshold in elf either.
DEFAULT_THRESHOLDS: np.ndarray = np.arange(0.5, 1.0, 0.05)

_METRICS_DIR = Path(__file__).resolve().parent / "hf_metrics"
_METRIC_NAMES = ("mean_segmentation_accuracy", "dice")


def metric_path(name: str) -> str:
    """Folder of one of our ``evaluate`` metrics, for ``evaluate.load(metric_path(name))`` (works offline)."""
    if name not in _METRIC_NAMES:
        raise ValueError(f"name must be one of {_METRIC_NAMES}, got {name!r}")
    return str(_METRICS_DIR / name)


# --------------------------------------------------------------------------------------------- validation


def _as_label_image(array: object, argument: str) -> np.ndarray:
    """A non-negative integer (or bool) numpy view of ``array``, or a one-line error naming ``argument``."""
    if not isinstance(array, np.ndarray):
        if hasattr(array, "detach"):  # torch tensors: accept, but never silently keep autograd state
            array = array.detach().cpu().numpy()
        else:
            array = np.asarray(array)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{argument} must be an integer label image (or bool mask), got dtype {array.dtype}")
    # only signed dtypes can hold negatives: unsigned label images skip the full min() scan
    if array.size and np.issubdtype(array.dtype, np.signedinteger) and array.min() < 0:
        raise ValueError(f"{argument} must not contain negative labels, got minimum {array.min()}")
    return array


def _validate_pair(prediction: object, ground_truth: object) -> tuple[np.ndarray, np.ndarray]:
    pred = _as_label_image(prediction, "prediction")
    true = _as_label_image(ground_truth, "ground_truth")
    for array, argument in ((pred, "prediction"), (true, "ground_truth")):
        if array.ndim != 2:
            raise ValueError(f"{argument} must be a 2D image, got shape {array.shape} (evaluate 3D data per slice)")
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground_truth shape {true.shape}")
    return pred, true


def _validate_thresholds(thresholds: Sequence[float] | np.ndarray | None) -> np.ndarray:
    if thresholds is None:
        return DEFAULT_THRESHOLDS
    values = np.asarray(thresholds, dtype=float).reshape(-1)
    # t <= 0 would make non-touching pairs matches, which the sparse overlap cannot represent.
    if values.size == 0 or not np.all((values > 0) & (values <= 1)):
        raise ValueError(f"thresholds must be a non-empty sequence of values in (0, 1], got {thresholds!r}")
    return values


# --------------------------------------------------------------------------------------------- matching


def _object_index(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Each pixel's object index (0 = background, objects 1..n in label order) and n; labels need not be consecutive."""
    flat = labels.ravel()
    if flat.size == 0:
        return flat.astype(np.intp), 0
    # bincount allocates max + 1 entries: linear while ids stay below 4x the pixel count; sparse huge ids
    # (e.g. hashed or 64-bit ids) would make it allocate far more than the image
    if flat.dtype == bool or int(flat.max()) <= 4 * flat.size:
        flat = flat.astype(np.intp, copy=False)
        present = np.bincount(flat, minlength=1) > 0  # linear time, no sort
        present[0] = False
        # present id -> its rank among present ids (1..n, increasing), absent ids and background -> 0
        lookup = np.cumsum(present) * present
        return lookup[flat], int(present.sum())
    ids, inverse = np.unique(flat, return_inverse=True)  # very large label values: sort instead
    has_background = ids[0] == 0
    # np.unique sorts, so ids[0] is 0 exactly when there is background; shift so objects start at 1 either way
    return inverse + (0 if has_background else 1), int(ids.size - has_background)


def _true_positives(
    pair_pred: np.ndarray, pair_true: np.ndarray, iou: np.ndarray, n_pred: int, threshold: float
) -> int:
    """Size of an optimal one-to-one matching of objects with IoU >= threshold (elf's Hungarian matching)."""
    # >=, as elf's scores >= threshold: an IoU equal to the threshold passes
    keep = iou >= threshold
    rows, cols = pair_pred[keep], pair_true[keep]
    if rows.size == 0:
        return 0
    # Above 0.5 every object has at most one partner, so each edge is a match; solve only the rest.
    if np.unique(rows).size == rows.size and np.unique(cols).size == cols.size:
        return int(rows.size)
    # one undirected bipartite graph: predictions are nodes 0..n_pred-1, true objects follow from n_pred
    n_nodes = n_pred + int(cols.max()) + 1
    graph = coo_matrix((np.ones(rows.size), (rows, cols + n_pred)), shape=(n_nodes, n_nodes))
    _, component_of = connected_components(graph, directed=False)
    edge_component = component_of[rows]
    matches = 0
    # matchings in different components are independent: many small Hungarian problems instead of one large one
    for component in np.unique(edge_component):
        in_component = edge_component == component
        block_rows, row_index = np.unique(rows[in_component], return_inverse=True)
        block_cols, col_index = np.unique(cols[in_component], return_inverse=True)
        # a star (one node on one side) matches exactly one of its edges
        if block_rows.size == 1 or block_cols.size == 1:
            matches += 1
            continue
        block = np.zeros((block_rows.size, block_cols.size))
        block[row_index, col_index] = 1.0
        # 0/1 weights give a maximum-cardinality matching: elf's costs -(iou >= t) - iou / (2 n) reach the same
        # count, as its tie-breaker term sums to at most 1/2 (elf/evaluation/matching.py, _compute_tps)
        matched_rows, matched_cols = linear_sum_assignment(block, maximize=True)
        matches += int(block[matched_rows, matched_cols].sum())
    return matches


@dataclass(frozen=True, eq=False)
class ObjectOverlaps:
    """IoU of every touching (predicted, true) object pair, kept sparse; the basis of mSA.

    ``pred_index`` / ``true_index`` are 0-based object indices (labels in increasing order), ``iou`` the
    pair's IoU, ``pred_sizes`` the pixel count of each predicted object. Building it once and filtering
    predicted objects (``keep_predictions``) lets a grid search score many size filters cheaply.
    """

    pred_index: np.ndarray
    true_index: np.ndarray
    iou: np.ndarray
    pred_sizes: np.ndarray
    n_true: int

    @classmethod
    def from_images(
        cls, prediction: np.ndarray, ground_truth: np.ndarray, relabel_ground_truth: bool = True
    ) -> "ObjectOverlaps":
        """Overlaps of two 2D label images; the ground truth is relabelled to connected components unless
        the caller already did (``relabel_ground_truth=False``)."""
        pred, true = _validate_pair(prediction, ground_truth)
        if relabel_ground_truth:
            true = connected_component_labels(true)
        pred_pixels, n_pred = _object_index(pred)
        true_pixels, n_true = _object_index(true)
        # object sizes over the whole image, including pixels on the other image's background: elf takes the
        # overlap table's row / column sums before it deletes the background (matching.py, _compute_scores)
        pred_sizes = np.bincount(pred_pixels, minlength=n_pred + 1)
        true_sizes = np.bincount(true_pixels, minlength=n_true + 1)
        n_cells = (n_pred + 1) * (n_true + 1)
        # the dense table holds at most 4 counts per pixel (or 1 Mi cells), so it never dwarfs the image itself
        if n_cells <= max(4 * pred_pixels.size, 1 << 20):  # small count table: one linear bincount
            # joint index pred * (n_true + 1) + true: one bincount counts every (pred, true) pair at once
            table = np.bincount(pred_pixels * (n_true + 1) + true_pixels, minlength=n_cells)
            table = table.reshape(n_pred + 1, n_true + 1)[1:, 1:]
            pair_pred, pair_true = np.nonzero(table)
            intersections = table[pair_pred, pair_true]
        else:  # thousands of objects on both sides: sum the duplicate entries of a sparse matrix
            ones = np.ones(pred_pixels.size, dtype=np.int64)
            overlap = coo_matrix((ones, (pred_pixels, true_pixels)), shape=(n_pred + 1, n_true + 1))
            # tocsr() sums the duplicate (pred, true) entries (one per pixel); [1:, 1:] drops the background pairs
            overlap = overlap.tocsr()[1:, 1:].tocoo()
            pair_pred, pair_true, intersections = overlap.row, overlap.col, overlap.data
        unions = pred_sizes[pair_pred + 1] + true_sizes[pair_true + 1] - intersections
        return cls(pair_pred, pair_true, intersections / unions, pred_sizes[1:], n_true)

    @property
    def n_pred(self) -> int:
        return int(self.pred_sizes.size)

    def keep_predictions(self, keep: np.ndarray) -> "ObjectOverlaps":
        """The overlaps as if only the predicted objects with ``keep[i]`` True were in the prediction."""
        keep = np.asarray(keep)
        if keep.dtype != bool or keep.shape != (self.n_pred,):
            raise ValueError(f"keep must be a bool array of shape ({self.n_pred},), got {keep.dtype} {keep.shape}")
        # new index of each kept prediction; dropped ones get a stale value, but `pairs` filters their pairs out
        new_index = np.cumsum(keep) - 1
        pairs = keep[self.pred_index]
        return ObjectOverlaps(
            pred_index=new_index[self.pred_index[pairs]],
            true_index=self.true_index[pairs],
            iou=self.iou[pairs],
            pred_sizes=self.pred_sizes[keep],
            n_true=self.n_true,
        )

    def match_counts(self, thresholds: Sequence[float] | None = None) -> np.ndarray:
        """Per-threshold (TP, FP, FN) counts, shape (n_thresholds, 3)."""
        values = _validate_thresholds(thresholds)
        counts = np.zeros((values.size, 3), dtype=np.int64)
        for i, threshold in enumerate(values):
            tp = _true_positives(self.pred_index, self.true_index, self.iou, self.n_pred, float(threshold))
            counts[i] = (tp, self.n_pred - tp, self.n_true - tp)
        return counts

    def segmentation_accuracies(self, thresholds: Sequence[float] | None = None) -> np.ndarray:
        """SA(t) = TP / (TP + FP + FN) for each threshold (0 where TP = 0, as elf)."""
        counts = self.match_counts(thresholds)
        tp = counts[:, 0].astype(float)
        # elf's segmentation_accuracy: tp / (tp + fp + fn) if tp > 0 else 0
        return np.divide(tp, counts.sum(axis=1), out=np.zeros_like(tp), where=tp > 0)


def match_counts(
    prediction: np.ndarray, ground_truth: np.ndarray, thresholds: Sequence[float] | None = None
) -> np.ndarray:
    """Per-threshold (TP, FP, FN) counts, shape (n_thresholds, 3), after relabelling the ground truth."""
    return ObjectOverlaps.from_images(prediction, ground_truth).match_counts(thresholds)


def segmentation_accuracy_per_threshold(
    prediction: np.ndarray, ground_truth: np.ndarray, thresholds: Sequence[float] | None = None
) -> np.ndarray:
    """SA(t) = TP / (TP + FP + FN) for each threshold (0 where TP = 0, as elf)."""
    return ObjectOverlaps.from_images(prediction, ground_truth).segmentation_accuracies(thresholds)


def segmentation_accuracy_at(prediction: np.ndarray, ground_truth: np.ndarray, threshold: float = 0.5) -> float:
    """Segmentation accuracy at one IoU threshold (e.g. SA50, SA75)."""
    return float(segmentation_accuracy_per_threshold(prediction, ground_truth, [threshold])[0])


def mean_segmentation_accuracy(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    thresholds: Sequence[float] | None = None,
    return_per_threshold: bool = False,
) -> float | tuple[float, list[float]]:
    """Mean segmentation accuracy of one 2D instance segmentation (see the module docstring)."""
    accuracies = segmentation_accuracy_per_threshold(prediction, ground_truth, thresholds)
    mean = float(accuracies.mean())
    if return_per_threshold:
        return mean, accuracies.tolist()
    return mean


# --------------------------------------------------------------------------------------------- dice


def dice_score(prediction: np.ndarray, ground_truth: np.ndarray) -> float:
    """Dice 2·|P∩T| / (|P| + |T|) of the foregrounds (label > 0) of two 2D masks or label images.

    Both empty gives 0.0, like elf's ``dice_score`` (its epsilon denominator); unlike elf we add no epsilon,
    so a perfect non-empty match is exactly 1.0.
    """
    pred, true = _validate_pair(prediction, ground_truth)
    pred, true = pred > 0, true > 0
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(true))
    if total == 0:
        return 0.0
    return 2.0 * int(np.count_nonzero(pred & true)) / total


# --------------------------------------------------------------------------------------------- datasets


def average_over_images(
    metric: Callable[..., float | np.ndarray],
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    **kwargs: object,
) -> float | np.ndarray:
    """Mean of a per-image metric over a list of images (the paper averages per image, not per pixel)."""
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions and ground_truths must have the same length, got {len(predictions)} and {len(ground_truths)}"
        )
    if len(predictions) == 0:
        raise ValueError("predictions must contain at least one image, got an empty sequence")
    # stacked so that a per-threshold metric (one vector per image) is averaged per threshold
    scores = np.stack([np.asarray(metric(p, t, **kwargs), dtype=float) for p, t in zip(predictions, ground_truths)])
    mean = scores.mean(axis=0)
    return float(mean) if mean.ndim == 0 else mean
