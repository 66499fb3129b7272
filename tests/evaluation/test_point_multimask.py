"""How a click is answered: through SAM's multimask output, or through the single mask when the adapter
trained points that way (``point_multimask=False`` recorded by ``save_adapter``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_sam_peft import hub
from hf_sam_peft.evaluation.interactive import evaluate_interactive, segment_from_labels
from hf_sam_peft.evaluation.predictor import SamPredictor, load_model, point_multimask_of, set_point_multimask
from hf_sam_peft.methods import apply_method


def _row() -> dict:
    labels = np.zeros((48, 56), np.int32)
    labels[6:20, 8:24], labels[28:44, 30:50] = 1, 2
    image = (60 + 150 * (labels > 0) + np.arange(56)[None] % 5).astype(np.uint8)
    return {"image": image, "labels": labels}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A saved tiny base and two LoRA adapters for it: saved with point_multimask=False, and without."""
    from transformers import SamModel

    from hf_sam_peft.modeling.sam import tiny_sam_config

    root = tmp_path_factory.mktemp("point_multimask")
    torch.manual_seed(0)
    base = SamModel(tiny_sam_config()).eval()
    base.save_pretrained(root / "base")
    model = apply_method(base, "lora", r=4)
    single = hub.save_adapter(model, root / "single", base_model_id=str(root / "base"), point_multimask=False)
    plain = hub.save_adapter(model, root / "plain", base_model_id=str(root / "base"))
    return {"base": str(root / "base"), "single": str(single), "plain": str(plain)}


def test_predictor_answers_a_click_through_the_trained_output(tiny_sam):
    row = _row()
    point, label = torch.tensor([[[15.0, 12.0]]]), torch.tensor([[1]])
    box = torch.tensor([[8.0, 6.0, 24.0, 20.0]])
    sam = SamPredictor(tiny_sam)
    assert sam.point_multimask is True and point_multimask_of(tiny_sam) is True  # nothing recorded: SAM's way
    sam.set_image(row["image"])
    assert sam.predict(point, label, multimask=True)[0].shape[1] == 3
    single = SamPredictor(tiny_sam, point_multimask=False)
    single.set_image(row["image"])
    logits, iou = single.predict(point, label, multimask=True)
    assert logits.shape[1] == 1 and iou.shape == (1, 1)
    expected, expected_iou = sam.predict(point, label, multimask=False)
    assert torch.equal(logits, expected) and torch.equal(iou, expected_iou)
    assert single.predict(point, label, box, multimask=True)[0].shape[1] == 3  # a box: the caller's choice
    # the model's record decides when no argument is given; an explicit argument wins
    set_point_multimask(tiny_sam, False)
    try:
        assert SamPredictor(tiny_sam).point_multimask is False
        assert SamPredictor(tiny_sam, point_multimask=True).point_multimask is True
    finally:
        set_point_multimask(tiny_sam, None)
    assert point_multimask_of(tiny_sam) is True
    with pytest.raises(TypeError, match="point_multimask"):
        SamPredictor(tiny_sam, point_multimask="yes")


@pytest.mark.parametrize("which, expected", [("single", False), ("plain", True)])
def test_loaded_adapter_decides_the_point_start_of_evaluation(adapters, decode_calls, which, expected):
    row = _row()
    model = load_model(adapters["base"], adapters[which])
    assert point_multimask_of(model) is expected
    predictor = SamPredictor(model)
    predictor.set_image(row["image"])
    logits, _ = predictor.predict(torch.tensor([[[15.0, 12.0]]]), torch.tensor([[1]]), multimask=True)
    assert logits.shape[1] == (3 if expected else 1)

    decode_calls.clear()
    result = evaluate_interactive(model, [row], n_corrections=1, starts=("point", "box"), progress=False)
    # point start: round 0 through the output the adapter trained, the correction round single mask; box: single
    assert decode_calls == [expected, False, False, False]
    assert 0.0 <= result["msa"]["point"] <= 1.0
    decode_calls.clear()
    segment_from_labels(model, row["image"], row["labels"], start="point")
    assert decode_calls == [expected]


def test_evaluation_point_start_is_the_object_centre(tiny_sam):
    """Point is deterministic (no seed dependence); only the corrections draw random points."""
    row = _row()
    first = evaluate_interactive(tiny_sam, [row], n_corrections=1, seed=0, starts=("point",), progress=False)
    other = evaluate_interactive(tiny_sam, [row], n_corrections=1, seed=5, starts=("point",), progress=False)
    assert first["rounds"]["point"]["iou"][0] == other["rounds"]["point"]["iou"][0]

    class Recorder:
        def __init__(self):
            self.points = []

        def set_image(self, image):
            pass

        def predict(self, points=None, labels=None, boxes=None, multimask=False):
            self.points.append(points.clone())
            n = points.shape[0]
            return torch.full((n, 1, 48, 56), -1.0), torch.zeros(n, 1)

    recorder = Recorder()
    evaluate_interactive(recorder, [row], n_corrections=0, starts=("point",), progress=False)
    # rows 6..19, cols 8..23: 7 px deep on rows 12-13, cols 14-17 -> first (14, 12); rows 28..43, cols 30..49 -> (37, 35)
    assert recorder.points[0].tolist() == [[[14.0, 12.0]], [[37.0, 35.0]]]
