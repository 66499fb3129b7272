"""UNETR decoder: reference parameter counts, shapes, crop/resize, save/load, SAM integration."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hf_sam_peft.modeling.unetr import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    UNETRConfig,
    UNETRDecoder,
    attach_unetr,
    load_unetr,
    predict_distances,
    sam_resized_shape,
    save_unetr,
)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "upsampling, expected, rounded",
    [("transposed", 11_028_931, 11_028_900), ("interpolate", 9_591_235, 9_591_200)],
)
def test_vit_b_parameter_counts_match_reference(upsampling, expected, rounded):
    # Exact counts of torch_em's UNETR(use_skip_connection=False, out_channels=3) on the 256-channel neck
    # output; DESIGN §2 / the paper's Table 5 print them rounded to 0.0001 M.
    decoder = UNETRDecoder(embed_dim=256, upsampling=upsampling)
    assert _n_params(decoder) == expected
    assert round(_n_params(decoder), -2) == rounded


def test_decoder_does_not_use_encoder_features_beyond_embedding():
    # 768-channel ViT features are not an input: the first layers take exactly embed_dim channels.
    decoder = UNETRDecoder(embed_dim=256)
    assert decoder.deconv1.block[0].block.in_channels == 256
    assert decoder.base.block[1].in_channels == 256


@pytest.mark.parametrize(
    "upsampling, features", [("transposed", (512, 256, 128, 64)), ("interpolate", (32, 16, 8, 4))]
)
def test_tiny_output_shape_and_range(upsampling, features):
    torch.manual_seed(0)
    decoder = UNETRDecoder(embed_dim=32, upsampling=upsampling, features=features).eval()
    with torch.no_grad():
        out = decoder(torch.randn(1, 32, 16, 16))
    assert out.shape == (1, 3, 256, 256)  # ×16 = SAM's patch size
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > 0  # not a constant map


def test_without_sigmoid_outputs_logits():
    torch.manual_seed(0)
    decoder = UNETRDecoder(embed_dim=8, features=(16, 8, 8, 4), sigmoid=False).eval()
    with torch.no_grad():
        out = decoder(torch.randn(1, 8, 4, 4))
    assert out.shape == (1, 3, 64, 64)
    assert out.min() < 0 or out.max() > 1


def test_pseudo_skip_chain_resolutions_and_channels():
    decoder = UNETRDecoder(embed_dim=32).eval()
    assert [block.block[1].in_channels for block in decoder.decoder.blocks] == [512, 256, 128]
    shapes = {}
    for name in ("deconv1", "deconv2", "deconv3", "deconv4", "base", "deconv_out"):
        getattr(decoder, name).register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape)))
    with torch.no_grad():
        decoder(torch.randn(1, 32, 2, 2))
    assert shapes == {
        "deconv1": (1, 512, 4, 4),
        "deconv2": (1, 256, 8, 8),
        "deconv3": (1, 128, 16, 16),
        "deconv4": (1, 64, 32, 32),
        "base": (1, 512, 2, 2),
        "deconv_out": (1, 64, 32, 32),
    }


def test_crop_and_resize_to_non_square_original_shape():
    torch.manual_seed(0)
    decoder = UNETRDecoder(embed_dim=16, features=(32, 16, 16, 8)).eval()
    embeddings = torch.randn(1, 16, 8, 8)  # → 128² output, the padded square SAM input
    original = (75, 100)
    input_shape = sam_resized_shape(original, 128)
    assert input_shape == (96, 128)  # longest side 100 → 128, 75·1.28 = 96
    with torch.no_grad():
        full = decoder(embeddings)
        out = decoder(embeddings, input_shape=input_shape, original_shape=original)
        derived = decoder(embeddings, original_shape=original)
        cropped = decoder(embeddings, input_shape=input_shape)
    expected = F.interpolate(full[..., :96, :128], original, mode="bilinear", align_corners=False)
    assert out.shape == (1, 3, 75, 100)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(derived, out)
    torch.testing.assert_close(cropped, full[..., :96, :128])


def test_output_resized_to_image_size_when_patch_size_differs():
    decoder = UNETRDecoder(embed_dim=8, features=(16, 8, 8, 4), image_size=100).eval()
    with torch.no_grad():
        out = decoder(torch.randn(1, 8, 4, 4))  # ×16 → 64, then resized to 100
    assert out.shape == (1, 3, 100, 100)


def test_bad_arguments():
    with pytest.raises(ValueError, match="upsampling"):
        UNETRDecoder(upsampling="nearest")
    with pytest.raises(ValueError, match="features"):
        UNETRConfig(features=(64, 32))
    with pytest.raises(ValueError, match="features"):
        UNETRConfig(features=(8, 16, 8, 4))
    with pytest.raises(TypeError):
        UNETRDecoder(UNETRConfig(), embed_dim=32)
    decoder = UNETRDecoder(embed_dim=8, features=(16, 8, 8, 4))
    with pytest.raises(ValueError, match="8 channels"):
        decoder(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="image_embeddings"):
        decoder(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="exceeds"):
        decoder(torch.randn(1, 8, 4, 4), input_shape=(65, 10))
    with pytest.raises(ValueError, match="original_shape"):
        decoder(torch.randn(1, 8, 4, 4), original_shape=(10, 10, 3))
    with pytest.raises(TypeError, match="input_shape"):
        decoder(torch.randn(1, 8, 4, 4), input_shape=5)


def _trained_tiny_decoder(upsampling: str) -> UNETRDecoder:
    """A decoder with non-default weights and BatchNorm statistics."""
    torch.manual_seed(1)
    decoder = UNETRDecoder(embed_dim=8, features=(16, 8, 8, 4), upsampling=upsampling, image_size=64)
    decoder.train()
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.1)
    decoder(torch.randn(2, 8, 4, 4)).mean().backward()
    optimizer.step()
    return decoder.eval()


@pytest.mark.parametrize("upsampling", ["transposed", "interpolate"])
def test_save_load_round_trip_is_exact(tmp_path, upsampling):
    decoder = _trained_tiny_decoder(upsampling)
    save_unetr(decoder, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = load_unetr(tmp_path / "head").eval()
    assert loaded.config == decoder.config
    original_state, loaded_state = decoder.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key], loaded_state[key]), key
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        expected, actual = decoder(x, original_shape=(50, 60)), loaded(x, original_shape=(50, 60))
    # the weights are bit-identical (above); two forward passes need not be (kernel choice, memory alignment)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_unetr(tmp_path)
    save_unetr(UNETRDecoder(embed_dim=8, features=(16, 8, 8, 4)), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "depth": 5}))
    with pytest.raises(ValueError, match="depth"):
        load_unetr(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "embed_dim": 16}))
    with pytest.raises(RuntimeError):  # weights no longer fit the config
        load_unetr(tmp_path)
    with pytest.raises(TypeError):
        save_unetr(torch.nn.Linear(2, 2), tmp_path)


SMALL = (32, 16, 8, 4)  # keeps the 256² decoder cheap in tests that are about the wiring


def test_attach_unetr_and_backward_reaches_encoder_and_decoder(tiny_sam):
    decoder = attach_unetr(tiny_sam, features=SMALL)
    vision = tiny_sam.config.vision_config
    assert tiny_sam.unetr_decoder is decoder
    assert decoder.config.embed_dim == vision.output_channels == 32
    assert decoder.config.image_size == vision.image_size
    assert any(name.startswith("unetr_decoder.") for name, _ in tiny_sam.named_parameters())

    tiny_sam.train()
    torch.manual_seed(0)
    out = predict_distances(tiny_sam, torch.randn(1, 3, 256, 256), original_shape=(100, 128))
    assert out.shape == (1, 3, 100, 128)
    out.square().mean().backward()
    encoder_grads = [p.grad for p in tiny_sam.vision_encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in encoder_grads) and any(g.abs().sum() > 0 for g in encoder_grads)
    assert all(p.grad is not None for p in decoder.parameters())


def test_attach_unetr_validation(tiny_sam):
    with pytest.raises(TypeError, match="SamModel"):
        attach_unetr(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attach_unetr"):
        predict_distances(tiny_sam, torch.randn(1, 3, 256, 256))
    first = attach_unetr(tiny_sam, upsampling="interpolate", features=SMALL)
    assert first.config.upsampling == "interpolate"
    with pytest.raises(ValueError, match="overwrite"):
        attach_unetr(tiny_sam, features=SMALL)
    assert attach_unetr(tiny_sam, overwrite=True, features=SMALL) is tiny_sam.unetr_decoder


def test_predict_distances_through_peft_modules_to_save(tiny_sam):
    from peft import LoraConfig, get_peft_model

    attach_unetr(tiny_sam, features=SMALL)
    model = get_peft_model(tiny_sam, LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["unetr_decoder"]))
    model.train()
    out = predict_distances(model, torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 3, 256, 256)
    out.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n and g is not None for n, g in grads.items())
    trained_copy = [n for n, g in grads.items() if "unetr_decoder.modules_to_save" in n and g is not None]
    assert trained_copy, "the trainable modules_to_save copy of the decoder must receive gradients"
    assert all(p.grad is None for n, p in model.named_parameters() if "unetr_decoder.original_module" in n)
