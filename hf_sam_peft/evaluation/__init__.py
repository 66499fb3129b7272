"""Evaluation: mean segmentation accuracy and Dice (plain functions and `evaluate` metrics), and the protocols."""

from .metrics import (
    DEFAULT_THRESHOLDS,
    ObjectOverlaps,
    average_over_images,
    dice_score,
    match_counts,
    mean_segmentation_accuracy,
    metric_path,
    segmentation_accuracy_at,
    segmentation_accuracy_per_threshold,
)

__all__ = [
    "DEFAULT_THRESHOLDS", "ObjectOverlaps", "average_over_images", "dice_score", "match_counts",
    "mean_segmentation_accuracy", "metric_path", "segmentation_accuracy_at", "segmentation_accuracy_per_threshold",
]
