"""`evaluate` metric: mean segmentation accuracy of 2D instance segmentations, averaged over images.

Load offline with ``evaluate.load(hf_sam_peft.evaluation.metrics.metric_path("mean_segmentation_accuracy"))``.
The computation lives in ``hf_sam_peft.evaluation.metrics`` (elf / micro-sam compatible); this file only
adapts it to ``evaluate``.
"""

import datasets
import evaluate
import numpy as np

from hf_sam_peft.evaluation.metrics import (
    DEFAULT_THRESHOLDS,
    average_over_images,
    segmentation_accuracy_per_threshold,
)

_DESCRIPTION = """Mean segmentation accuracy (Caicedo et al. 2019) as elf / micro-sam compute it: the ground truth is
relabelled to connected components, objects are matched one-to-one (Hungarian) at IoU thresholds 0.50:0.05:0.95,
SA(t) = TP / (TP + FP + FN), mSA = mean over thresholds, then mean over images. Also reports SA per threshold
(`sa50`, `sa55`, ..., `sa95`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 2D integer label images (0 = background), one per image.
    references: list of 2D integer label images of the same shapes.
    thresholds: optional IoU thresholds in (0, 1]; default 0.50, 0.55, ..., 0.95.
Returns:
    mean_segmentation_accuracy: mean over thresholds and images.
    sa<NN>: segmentation accuracy at threshold NN/100, averaged over images.
Example:
    >>> metric = evaluate.load(metric_path("mean_segmentation_accuracy"))
    >>> metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 2], [2, 2]]])["mean_segmentation_accuracy"]
    1.0
"""

_CITATION = """@article{caicedo2019evaluation,
  title={Evaluation of Deep Learning Strategies for Nucleus Segmentation in Fluorescence Images},
  author={Caicedo, Juan C. and Roth, Jonathan and Goodman, Allen and others},
  journal={Cytometry Part A}, volume={95}, number={9}, pages={952--965}, year={2019}
}"""

_List = getattr(datasets, "List", datasets.Sequence)  # datasets >= 4 names nested lists `List`
_LABEL_IMAGE = _List(_List(datasets.Value("int64")))  # 2D images of any size


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanSegmentationAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _LABEL_IMAGE, "references": _LABEL_IMAGE}),
        )

    def _compute(self, predictions, references, thresholds=None):
        # thresholds is a compute() keyword, not a feature: evaluate passes it through as given (no Arrow round trip)
        values = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=float).reshape(-1)
        per_threshold = average_over_images(
            segmentation_accuracy_per_threshold,
            # evaluate hands the images back as nested lists (the List(List(int64)) features): arrays again
            [np.asarray(p) for p in predictions],
            [np.asarray(r) for r in references],
            thresholds=values,
        )
        result = {"mean_segmentation_accuracy": float(np.mean(per_threshold))}
        # round(), not int(): a user threshold of 0.57 is 56.99999999999999 after * 100
        result.update({f"sa{round(t * 100):02d}": float(sa) for t, sa in zip(values, per_threshold)})
        return result
