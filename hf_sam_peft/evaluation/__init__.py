"""Evaluation: mean segmentation accuracy and Dice (plain functions and `evaluate` metrics), and the protocols."""

from .ais import evaluate_ais, segment_ais
from .interactive import evaluate_interactive
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
from .predictor import SamPredictor, load_model, point_multimask_of
from .results import ResultsTable

__all__ = [
    "ResultsTable", "SamPredictor", "evaluate_ais", "evaluate_interactive", "load_model", "point_multimask_of",
    "segment_ais",
    "DEFAULT_THRESHOLDS", "ObjectOverlaps", "average_over_images", "dice_score", "match_counts",
    "mean_segmentation_accuracy", "metric_path", "segmentation_accuracy_at", "segmentation_accuracy_per_threshold",
]
