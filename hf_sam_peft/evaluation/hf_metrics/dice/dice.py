"""`evaluate` metric: foreground Dice of 2D masks, averaged over images (the paper's medical metric).

Load offline with ``evaluate.load(hf_sam_peft.evaluation.metrics.metric_path("dice"))``. The computation
lives in ``hf_sam_peft.evaluation.metrics.dice_score``; this file only adapts it to ``evaluate``.
"""

import datasets
import evaluate
import numpy as np

from hf_sam_peft.evaluation.metrics import average_over_images, dice_score

_DESCRIPTION = """Dice = 2|P∩T| / (|P| + |T|) between the foregrounds (label > 0) of a predicted and a reference
mask, computed per image and averaged over images. An image where both masks are empty scores 0 (as elf)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 2D masks or label images (0 = background), one per image (bools are fine).
    references: list of 2D masks or label images of the same shapes.
Returns:
    dice: mean Dice over images.
Example:
    >>> metric = evaluate.load(metric_path("dice"))
    >>> metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 0], [1, 1]]])["dice"]
    0.8
"""

_CITATION = """@article{dice1945measures,
  title={Measures of the Amount of Ecologic Association Between Species},
  author={Dice, Lee R.}, journal={Ecology}, volume={26}, number={3}, pages={297--302}, year={1945}
}"""

_List = getattr(datasets, "List", datasets.Sequence)  # datasets >= 4 names nested lists `List`
_MASK = _List(_List(datasets.Value("int64")))  # 2D images of any size


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Dice(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _MASK, "references": _MASK}),
        )

    def _compute(self, predictions, references):
        score = average_over_images(
            # evaluate hands the images back as nested lists (the List(List(int64)) features): arrays again
            dice_score, [np.asarray(p) for p in predictions], [np.asarray(r) for r in references]
        )
        return {"dice": float(score)}
