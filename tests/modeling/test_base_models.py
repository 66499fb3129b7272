"""`load_base_model` with SAM 2: the named tiny model and save_pretrained folders."""

from __future__ import annotations

import pytest
import torch
from transformers import Sam2Model, SamModel

from hf_sam_peft.modeling.base_models import BASE_MODELS, load_base_model


def test_tiny_sam2_is_a_seeded_sam2_in_eval_mode():
    model, processor = load_base_model("tiny_sam2")
    again, _ = load_base_model("tiny_sam2")
    assert isinstance(model, Sam2Model) and not model.training
    assert "tiny_sam2" in BASE_MODELS
    first = next(iter(model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert first.device.type == "cpu"
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        assert processor is None  # SAM 2's processor needs torchvision; the package preprocesses by itself


def test_sam2_folder_round_trip(tmp_path):
    model, _ = load_base_model("tiny_sam2")
    model.save_pretrained(tmp_path / "sam2")
    loaded, _ = load_base_model(tmp_path / "sam2")
    assert isinstance(loaded, Sam2Model) and not isinstance(loaded, SamModel)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_folder_of_another_model_kind_is_a_clear_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expected a SamModel, LiteSamModel or Sam2Model"):
        load_base_model(tmp_path)
