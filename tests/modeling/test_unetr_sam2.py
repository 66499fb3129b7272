"""The UNETR head on SAM 2 (``Sam2Model``): it decodes the stride-16 map (the paper's head and parameter counts
unchanged), SAM 2's square frame (nothing to crop), gradients, save/load and peft's modules_to_save."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Sam2Model

from hf_sam_peft.modeling.sam2 import sam2_config, tiny_sam2_config
from hf_sam_peft.modeling.unetr import UNETRDecoder, attach_unetr, load_unetr, predict_distances, save_unetr

SMALL = (32, 16, 8, 8)


@pytest.fixture
def tiny_sam2() -> Sam2Model:
    torch.manual_seed(0)
    return Sam2Model(tiny_sam2_config())


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("upsampling, expected", [("transposed", 11_028_931), ("interpolate", 9_591_235)])
def test_real_sam2_sizes_get_the_papers_head(upsampling, expected):
    """SAM 2's stride-16 map has SAM's embedding shape (256 channels, 64² at 1024²): the same head."""
    for name in ("sam2_hiera_tiny", "sam2_hiera_large"):
        with torch.device("meta"):  # shapes only
            model = Sam2Model(sam2_config(name))
            decoder = attach_unetr(model, upsampling=upsampling)
        assert decoder.config.embed_dim == 256 and decoder.config.image_size == 1024
        assert decoder.config.frame == "square" and _n_params(decoder) == expected


def test_attach_and_predict_distances_decode_the_stride_16_map(tiny_sam2):
    decoder = attach_unetr(tiny_sam2, features=SMALL)
    assert decoder.config.embed_dim == tiny_sam2.config.vision_config.fpn_hidden_size == 32
    assert decoder.config.image_size == 256 and decoder.config.frame == "square"
    pixel_values = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    tiny_sam2.train()
    out = predict_distances(tiny_sam2, pixel_values, input_shape=(256, 256), original_shape=(100, 140))
    assert out.shape == (1, 3, 100, 140) and 0 <= out.min() and out.max() <= 1
    out.square().mean().backward()
    backbone_grads = [p.grad for p in tiny_sam2.vision_encoder.backbone.parameters()]
    assert all(g is not None for g in backbone_grads) and any(g.abs().sum() > 0 for g in backbone_grads)
    assert all(p.grad is not None for p in decoder.parameters())
    assert tiny_sam2.mask_decoder.conv_s0.weight.grad is None  # the high-resolution maps are not used
    assert tiny_sam2.no_memory_embedding.grad is not None  # the mask decoder's own stride-16 embedding
    tiny_sam2.eval()
    with torch.no_grad():
        expected = decoder(tiny_sam2.get_image_embeddings(pixel_values)[-1])
        # square frame: no crop, only a resize back (input_shape derived from the frame when not given)
        got = predict_distances(tiny_sam2, pixel_values, original_shape=(100, 140))
        full = predict_distances(tiny_sam2, pixel_values)
    assert torch.allclose(full, expected, atol=1e-6)
    assert torch.allclose(got, F.interpolate(expected, (100, 140), mode="bilinear", align_corners=False), atol=1e-6)


def test_frame_is_saved_and_checked(tiny_sam2, tmp_path):
    decoder = attach_unetr(tiny_sam2, features=SMALL)
    loaded = load_unetr(save_unetr(decoder, tmp_path / "unetr"))
    assert loaded.config == decoder.config and loaded.config.frame == "square"
    with pytest.raises(ValueError, match="frame"):
        UNETRDecoder(embed_dim=8, features=(16, 8, 8, 4), frame="stretch")
    padded = UNETRDecoder(embed_dim=8, features=(16, 8, 8, 4)).eval()  # SAM's default frame
    maps = torch.rand(1, 3, 64, 64)
    assert padded.postprocess(maps, None, (32, 64)).shape == (1, 3, 32, 64)  # crop (32 x 64 of the 64² square)
    assert torch.equal(padded.postprocess(maps, None, (32, 64)), maps[..., :32, :])


def test_predict_distances_through_peft_modules_to_save(tiny_sam2):
    from peft import LoraConfig, get_peft_model

    attach_unetr(tiny_sam2, features=SMALL)
    config = LoraConfig(r=2, target_modules=r"vision_encoder\.backbone\.blocks\.\d+\.attn\.qkv",
                        modules_to_save=["unetr_decoder"])
    model = get_peft_model(tiny_sam2, config)
    model.train()
    out = predict_distances(model, torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 3, 256, 256)
    out.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n and g is not None for n, g in grads.items())
    assert [n for n, g in grads.items() if "unetr_decoder.modules_to_save" in n and g is not None]
    assert all(p.grad is None for n, p in model.named_parameters() if "unetr_decoder.original_module" in n)
