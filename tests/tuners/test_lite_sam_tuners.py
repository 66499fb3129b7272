"""The ten methods on LiteMedSAM's TinyViT encoder: targeting is generic over SAM image encoders."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

import hf_sam_peft
from hf_sam_peft.methods import count_parameters
from hf_sam_peft.modeling import LiteSamModel
from hf_sam_peft.modeling.lite_medsam import lite_medsam_config, tiny_lite_sam_config

# LiteMedSAM (TinyViT-5M: attention blocks of width 128 x2, 160 x6, 320 x2); prompt encoder + mask decoder
# 4,064,560 always train. E.g. LoRA = 4,064,560 + 4·r·Σd = 4·32·1856.
LITE_MEDSAM_TRAINABLE = {
    "full_ft": 9_791_300, "freeze_encoder": 4_064_560, "ln_tune": 4_071_984, "bias_tune": 4_084_976,
    "attn_tune": 5_643_908, "lora": 4_302_128, "qlora": 4_302_128, "adaptformer": 4_304_634, "ssf": 4_105_392,
    "fact": 4_129_072,
}
SUM_OF_WIDTHS = 2 * 128 + 6 * 160 + 2 * 320


@pytest.fixture(scope="module")
def lite_medsam():
    torch.manual_seed(0)
    return LiteSamModel(lite_medsam_config())


@pytest.mark.parametrize("name", [n for n in LITE_MEDSAM_TRAINABLE if n != "qlora"])
def test_lite_medsam_trainable_counts(lite_medsam, name):
    model = hf_sam_peft.apply_method(copy.deepcopy(lite_medsam), name)
    assert count_parameters(model)[0] == LITE_MEDSAM_TRAINABLE[name]


def test_counts_follow_the_block_widths():
    decoder = LITE_MEDSAM_TRAINABLE["freeze_encoder"]
    assert LITE_MEDSAM_TRAINABLE["ln_tune"] - decoder == 4 * SUM_OF_WIDTHS
    assert LITE_MEDSAM_TRAINABLE["lora"] - decoder == 4 * 32 * SUM_OF_WIDTHS
    assert LITE_MEDSAM_TRAINABLE["ssf"] - decoder == 2 * 11 * SUM_OF_WIDTHS  # 7d + m with m = 4d


def test_fact_shares_factors_per_width(lite_medsam):
    model = hf_sam_peft.apply_method(copy.deepcopy(lite_medsam), "fact", shared_factors=True)
    r, widths = 16, (128, 160, 320)
    encoder = count_parameters(model)[0] - LITE_MEDSAM_TRAINABLE["freeze_encoder"]
    assert encoder == sum(2 * d * r for d in widths) + 10 * 2 * r * r


@pytest.fixture
def tiny_lite():
    torch.manual_seed(0)
    return LiteSamModel(tiny_lite_sam_config()).eval()


def _outputs(model, size: int):
    torch.manual_seed(1)
    pixels = torch.rand(1, 3, size, size)
    with torch.no_grad():
        return model(pixel_values=pixels, input_boxes=torch.tensor([[[2.0, 3.0, 20.0, 25.0]]]), multimask_output=False).pred_masks


@pytest.mark.parametrize("name", ["ln_tune", "bias_tune", "attn_tune", "lora", "adaptformer", "ssf", "fact"])
def test_methods_start_as_the_base_and_reload(tiny_lite, name, tmp_path):
    size = tiny_lite.config.vision_config.image_size
    expected = _outputs(tiny_lite, size)
    model = hf_sam_peft.apply_method(copy.deepcopy(tiny_lite), name).eval()
    torch.testing.assert_close(_outputs(model, size), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapted = _outputs(model, size)
    assert not torch.allclose(adapted, expected, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = hf_sam_peft.load_adapter(copy.deepcopy(tiny_lite), str(tmp_path)).eval()
    assert isinstance(reloaded, PeftModel)
    torch.testing.assert_close(_outputs(reloaded, size), adapted, atol=0, rtol=0)
