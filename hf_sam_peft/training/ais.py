"""Targets and loss for the UNETR (automatic instance segmentation) head.

Channel order everywhere (targets, decoder output, post-processing): 0 = foreground, 1 = distance to the
object centre, 2 = inverted distance to the object boundary. This is micro-sam's order (torch_em's
`PerObjectDistanceTransform(distances=True, boundary_distances=True, foreground=True)` puts the
foreground first, then the centre, then the boundary distances).

Per object (after connected-component relabelling and dropping objects below `min_size` pixels):
- centre distance: Euclidean distance to the rounded centroid (to the point farthest from the boundary
  when the centroid lies outside the object), divided by its maximum in the object: 0 at the centre,
  ~1 at the farthest pixel;
- boundary distance: d = distance to the object's inner boundary pixels, then (max d − d) / max: 0 at the
  most central point, ~1 on the boundary;
- both are divided by (max + 1e-7) as in the reference, and the background is filled with 1.0
  (the reference's `distance_fill_value`; the loss masks it out anyway).

Loss (torch_em's `DiceBasedDistanceLoss(mask_distances_in_bg=True)`): Dice(fg) + Dice(cdist·fg_gt,
cdist_gt·fg_gt) + Dice(bdist·fg_gt, bdist_gt·fg_gt), each 1 − 2Σpt / max(Σp² + Σt², 1e-7), with the
sums over the whole batch per channel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import find_boundaries

from hf_sam_peft.training.losses import EPS, dice_loss

FOREGROUND, CENTER_DISTANCES, BOUNDARY_DISTANCES = 0, 1, 2
NUM_CHANNELS = 3
BACKGROUND_DISTANCE = 1.0


def _check_labels(labels: np.ndarray) -> None:
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a numpy array, got {type(labels).__name__}")
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2D (height, width) instance map, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"labels must have an integer or bool dtype, got {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError("labels must be non-negative (0 = background)")


def _relabel(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Connected components (full connectivity, as the reference), small objects removed, ids 1..n."""
    components = connected_components(labels, background=0).astype(np.int64)
    if min_size > 0 and components.size:
        small = np.bincount(components.ravel()) < min_size  # indexed by component id
        small[0] = False  # the background is never "small"
        if small.any():
            components[small[components]] = 0  # id -> flag lookup, per pixel
            components = _sequential(components)
    return components


def _sequential(labels: np.ndarray) -> np.ndarray:
    """Relabel ids to 1..n keeping 0 (in increasing id order)."""
    ids = np.unique(labels)
    lookup = np.zeros(int(ids.max()) + 1, dtype=np.int64)
    lookup[ids[ids > 0]] = np.arange(1, int((ids > 0).sum()) + 1)
    return lookup[labels]


def _object_distances(
    mask: np.ndarray, boundary: np.ndarray, center: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised centre and inverted boundary distances inside one object's bounding-box crop."""
    if boundary.any():
        # EDT gives each pixel its distance to the nearest zero, i.e. to the nearest boundary pixel
        to_boundary = ndimage.distance_transform_edt(~boundary)
    else:  # an object filling the whole image has no inner boundary
        to_boundary = np.zeros(mask.shape)
    to_boundary[~mask] = 0  # other objects and background in the crop must not win the argmax
    peak = np.unravel_index(np.argmax(to_boundary), mask.shape)
    if not mask[center]:
        center = peak  # the centroid lies outside a non-convex object: use the most central point

    # (row, col) in the crop's frame; open grids broadcast to the crop without building index arrays
    rows, cols = np.ogrid[: mask.shape[0], : mask.shape[1]]
    to_center = np.hypot(rows - center[0], cols - center[1])
    boundary_inverted = to_boundary[peak] - to_boundary
    out = []
    for dist in (to_center, boundary_inverted):
        dist[~mask] = 0
        out.append(dist / (np.abs(dist).max() + EPS))
    return out[0], out[1]


def distance_targets(labels: np.ndarray, min_size: int = 25) -> np.ndarray:
    """(3, H, W) float32 UNETR targets from a 2D instance label map: foreground, centre distances,
    inverted boundary distances (see the module docstring for the definitions)."""
    _check_labels(labels)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")

    objects = _relabel(labels, int(min_size))
    targets = np.full((NUM_CHANNELS, *objects.shape), BACKGROUND_DISTANCE, dtype=np.float32)
    targets[FOREGROUND] = objects > 0
    n = int(objects.max()) if objects.size else 0
    if n == 0:
        return targets

    # "inner": boundary pixels lie inside their object, so each object's own boundary is inside its bounding box
    boundaries = find_boundaries(objects, mode="inner")
    flat = objects.ravel()
    counts = np.bincount(flat, minlength=n + 1)
    # every centroid in one pass: per-id sums of row and column indices over per-id pixel counts
    rows, cols = np.indices(objects.shape)
    centroid_r = np.bincount(flat, weights=rows.ravel(), minlength=n + 1) / np.maximum(counts, 1)
    centroid_c = np.bincount(flat, weights=cols.ravel(), minlength=n + 1) / np.maximum(counts, 1)

    for object_id, box in enumerate(ndimage.find_objects(objects), start=1):
        if box is None:
            continue
        mask = objects[box] == object_id
        # the rounded centroid, moved from the image frame into the crop's
        center = (
            int(np.round(centroid_r[object_id])) - box[0].start,
            int(np.round(centroid_c[object_id])) - box[1].start,
        )
        center_dist, boundary_dist = _object_distances(mask, boundaries[box], center)
        # basic indexing gives views: the masked assignment writes into `targets`, and only this object's pixels
        targets[CENTER_DISTANCES][box][mask] = center_dist[mask]
        targets[BOUNDARY_DISTANCES][box][mask] = boundary_dist[mask]
    return targets


def batch_distance_targets(labels: torch.Tensor | np.ndarray, min_size: int = 25) -> torch.Tensor:
    """`distance_targets` over a batch of label maps, (B, H, W) or (B, 1, H, W) → (B, 3, H, W) float32."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    if not isinstance(array, np.ndarray):
        raise TypeError(f"labels must be a tensor or numpy array, got {type(labels).__name__}")
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"labels must have shape (B, H, W) or (B, 1, H, W), got {tuple(array.shape)}")
    out = torch.from_numpy(np.stack([distance_targets(item, min_size) for item in array]))
    return out.to(labels.device) if isinstance(labels, torch.Tensor) else out


def _dice_loss_per_channel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − Dice per channel with the sums pooled over batch and space (torch_em's channelwise Dice)."""
    channels, width = pred.shape[1], pred.shape[-1]
    # (B, C, H, W) -> (C, B·H, W): dice_loss sums its last two dims, so each channel's sums pool the whole batch,
    # as torch_em's flatten_samples (loss/dice.py) does
    return dice_loss(
        pred.transpose(0, 1).reshape(channels, -1, width), target.transpose(0, 1).reshape(channels, -1, width)
    )


def ais_loss(pred: torch.Tensor, target: torch.Tensor, mask_distances_in_bg: bool = True) -> torch.Tensor:
    """Dice(fg) + Dice(centre distances) + Dice(boundary distances); the distance terms only count the
    ground-truth foreground when `mask_distances_in_bg` (the reference's setting)."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("pred and target must be torch tensors")
    if pred.ndim != 4 or pred.shape[1] != NUM_CHANNELS:
        raise ValueError(f"pred must have shape (B, 3, H, W), got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal pred shape {tuple(pred.shape)}")
    target = target.to(pred.dtype)
    if mask_distances_in_bg:
        # as torch_em's DistanceLoss.forward: both pred and target of the distance channels times the true fg;
        # the fg channel itself is not masked
        foreground = target[:, FOREGROUND : FOREGROUND + 1]
        weight = torch.cat([torch.ones_like(foreground), foreground, foreground], dim=1)
        pred, target = pred * weight, target * weight
    return _dice_loss_per_channel(pred, target).sum()


class DistanceLoss(nn.Module):
    """`ais_loss` as a module (for `Trainer`s and configs that expect one)."""

    def __init__(self, mask_distances_in_bg: bool = True) -> None:
        super().__init__()
        self.mask_distances_in_bg = mask_distances_in_bg

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ais_loss(pred, target, self.mask_distances_in_bg)
