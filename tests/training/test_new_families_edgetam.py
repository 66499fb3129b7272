"""EdgeTAM (`EdgeTamModel`) through the pipeline, with a stand-in for its timm RepViT backbone.

Why a stand-in: transformers builds EdgeTAM's image encoder with timm (`TimmWrapperModel`), timm needs
torchvision, and PyPI's torchvision does not load against this project's CPU torch build, so neither is a
dependency. The stand-in (`StandInRepViT`, injected only here) is a small BatchNorm'd conv pyramid that returns
what `TimmWrapperModel` returns for timm's `FeatureListNet` (`last_hidden_state`: four NCHW maps at strides 4, 8,
16, 32), so everything from EdgeTAM's own neck on (and all of this library's EdgeTAM code) is the real one.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.edgetam import modeling_edgetam

import hf_sam_peft
from hf_sam_peft.modeling.base_models import load_base_model
from hf_sam_peft.modeling.edgetam import tiny_edgetam_config
from hf_sam_peft.sam_forward import encode_images
from hf_sam_peft.sam_forward.kinds import frame_of, model_kind
from hf_sam_peft.training.interactive import POINT_MODE
from tests.training.test_new_families import assert_trained_and_reloaded, backward_interactive

WIDTHS = (8, 16, 32, 64)  # strides 4, 8, 16, 32 (tiny_edgetam_config lists them lowest resolution first)


class StandInRepViT(nn.Module):
    """Four conv + BatchNorm stages; the output structure of timm's FeatureListNet through TimmWrapperModel."""

    def __init__(self) -> None:
        super().__init__()
        chans = (3, *WIDTHS)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=4 if i == 0 else 2, padding=1, bias=False),
                          nn.BatchNorm2d(chans[i + 1]), nn.GELU())
            for i in range(4)
        )

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        features, x = [], pixel_values
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return BaseModelOutput(last_hidden_state=features, hidden_states=None)


def edgetam(monkeypatch, seed: int = 0):
    """A tiny EdgeTamModel with the stand-in backbone (the same weights for the same seed)."""
    original = modeling_edgetam.AutoModel

    class Auto:
        @staticmethod
        def from_config(config, **kwargs):
            if config.model_type == "timm_wrapper":
                return StandInRepViT()
            return original.from_config(config, **kwargs)

    monkeypatch.setattr(modeling_edgetam, "AutoModel", Auto)
    torch.manual_seed(seed)
    model = modeling_edgetam.EdgeTamModel(tiny_edgetam_config(backbone_channel_list=tuple(reversed(WIDTHS))))
    with torch.no_grad():
        model.no_memory_embedding.normal_(std=0.1)
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
    return model.eval()


def test_edgetam_is_sam2s_form_and_matches_transformers(monkeypatch):
    model = edgetam(monkeypatch)
    assert model_kind(model) == "edgetam" and frame_of(model) == "square"
    pixels = torch.randn(2, 3, 256, 256)
    ours = encode_images(model, pixels)
    theirs = model.get_image_embeddings(pixels)
    assert [tuple(t.shape) for t in ours] == [(2, 4, 64, 64), (2, 8, 32, 32), (2, 32, 16, 16)]
    assert all(torch.allclose(o, t, atol=1e-5) for o, t in zip(ours, theirs))


@pytest.mark.parametrize("method", ["bias_tune", "lora", "ssf", "dora"])
def test_methods_for_transformer_blocks_are_one_line_errors(monkeypatch, method):
    with pytest.raises(ValueError, match="convolutional RepViT.*methods that fit: full_ft, freeze_encoder"):
        hf_sam_peft.apply_method(edgetam(monkeypatch), method)


def test_layers_is_a_one_line_error(monkeypatch):
    with pytest.raises(ValueError, match="no transformer blocks to index"):
        hf_sam_peft.apply_method(edgetam(monkeypatch), "full_ft", layers=[0])


def test_frozen_batch_norms_keep_their_statistics_in_training(monkeypatch):
    """A frozen RepViT (every method but Full FT) in training mode: BatchNorms run on their running statistics,
    so the saved adapter and the trained model see the same encoder."""
    model = hf_sam_peft.apply_method(edgetam(monkeypatch), "freeze_encoder")
    stats = {k: v.clone() for k, v in model.base_model.model.vision_encoder.state_dict().items() if "running" in k}
    backward_interactive(model, (POINT_MODE,))
    after = model.base_model.model.vision_encoder.state_dict()
    assert stats and all(torch.equal(v, after[k]) for k, v in stats.items())
    decoder_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "conv_s0" in n]
    assert decoder_grads and all(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_encoder." in n)


def test_freeze_encoder_trains_saves_and_reloads_through_peft(monkeypatch, tmp_path):
    """peft's get_peft_model on EdgeTamModel (whose get_input_embeddings raises: tuners.base.declare_untied_embeddings)
    and the saved adapter loaded into a fresh base give the trained model's masks."""
    base = edgetam(monkeypatch)
    model = hf_sam_peft.apply_method(copy.deepcopy(base), "freeze_encoder")
    backward_interactive(model, (POINT_MODE,)).step()
    assert_trained_and_reloaded(model, base, tmp_path)


def test_full_ft_batch_norms_train(monkeypatch):
    model = hf_sam_peft.apply_method(edgetam(monkeypatch), "full_ft").train()
    before = model.vision_encoder.backbone.stages[0][1].running_mean.clone()
    encode_images(model, torch.randn(2, 3, 256, 256))
    assert not torch.equal(before, model.vision_encoder.backbone.stages[0][1].running_mean)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_loading_edgetam_without_timm_is_a_one_line_error(tmp_path):
    tiny_edgetam_config().save_pretrained(tmp_path)
    with pytest.raises(ImportError, match=r"pip install timm") as error:
        load_base_model(tmp_path)
    assert "\n" not in str(error.value)
