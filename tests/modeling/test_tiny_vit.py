"""Our TinyViT encoder on random tiny models: shapes, gradients, checkpointing, no stale attention-bias cache,
frozen BatchNorm statistics, and the bias index against the original's enumeration of offsets."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.models.sam.modeling_sam import SamVisionEncoderOutput

from hf_sam_peft.modeling.lite_medsam import tiny_lite_sam_config
from hf_sam_peft.modeling.tiny_vit import LiteSamVisionConfig, TinyViTVisionEncoder, _relative_offset_index


def _tiny_encoder(**overrides) -> TinyViTVisionEncoder:
    config = tiny_lite_sam_config().vision_config
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    encoder = TinyViTVisionEncoder(config)
    with torch.no_grad():  # non-trivial values everywhere the random init has zeros or ones
        for name, param in encoder.named_parameters():
            if "attention_biases" in name or name.endswith("bn.weight") or name.endswith("bn.bias"):
                param.normal_(0.5, 0.2)
    return encoder


def _pixels(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, 32, 32)


def test_forward_matches_sam_vision_encoder_interface():
    encoder = _tiny_encoder().eval()
    output = encoder(_pixels(), output_hidden_states=True)
    assert isinstance(output, SamVisionEncoderOutput)
    assert output.last_hidden_state.shape == (2, 16, 8, 8)
    assert [tuple(h.shape) for h in output.hidden_states] == [(2, 32, 32, 8), (2, 16, 16, 16), (2, 8, 8, 24), (2, 8, 8, 32)]
    assert torch.isfinite(output.last_hidden_state).all() and output.last_hidden_state.std() > 0.1
    with pytest.raises(ValueError, match="pixel_values must be"):
        encoder(torch.rand(1, 3, 64, 64))


def test_backward_reaches_every_parameter():
    encoder = _tiny_encoder().train()
    encoder(_pixels()).last_hidden_state.square().mean().backward()
    missing = [name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gradient_checkpointing_gives_the_same_gradients():
    encoder = _tiny_encoder().train()
    encoder(_pixels()).last_hidden_state.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    encoder.zero_grad()
    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert encoder.layers[1].blocks[0].gradient_checkpointing and encoder.layers[0].blocks[0].gradient_checkpointing
    encoder(_pixels()).last_hidden_state.square().mean().backward()
    for name, param in encoder.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_no_stale_attention_bias_after_train_eval_cycles():
    """The original caches the bias on .eval(); an update made in train mode must show up in eval mode."""
    encoder = _tiny_encoder().eval()
    x = _pixels()
    with torch.no_grad():
        before = encoder(x).last_hidden_state
        encoder.train()
        in_train = encoder(x).last_hidden_state
        for module in encoder.modules():
            if hasattr(module, "attention_biases"):
                module.attention_biases.add_(torch.randn_like(module.attention_biases))
        encoder.eval()
        after = encoder(x).last_hidden_state
        fresh = TinyViTVisionEncoder(encoder.config).eval()
        fresh.load_state_dict(encoder.state_dict())
        expected = fresh(x).last_hidden_state
    torch.testing.assert_close(in_train, before)  # no dropout, frozen BatchNorm: train and eval agree
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, expected)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_batch_norm_keeps_running_statistics(freeze):
    encoder = _tiny_encoder(freeze_batch_norm=freeze).train()
    bn = encoder.layers[1].blocks[0].local_conv.bn
    before = bn.running_mean.clone()
    encoder(_pixels())
    assert bn.training is not freeze
    assert torch.equal(bn.running_mean, before) is freeze


def test_relative_offset_index_matches_the_original_enumeration():
    """TinyViT numbers offsets (|dy|, |dx|) in the order they first appear over all point pairs."""
    for window in (3, 7):
        points = list(itertools.product(range(window), range(window)))
        offsets, idxs = {}, []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        expected = torch.tensor(idxs).view(len(points), len(points))
        assert torch.equal(_relative_offset_index(window, torch.device("cpu")), expected)


def test_default_config_is_lite_medsam_and_validates():
    config = LiteSamVisionConfig()
    assert config.stage_resolutions() == [256, 128, 64, 64] and config.embedding_size == 64
    with pytest.raises(ValueError, match="depths must have one entry per stage"):
        LiteSamVisionConfig(depths=(2, 2, 6))
    with pytest.raises(ValueError, match="num_pos_feats"):
        LiteSamVisionConfig(output_channels=64)
    with pytest.raises(ValueError, match="num_heads must divide"):
        LiteSamVisionConfig(num_heads=(2, 3, 5, 10))
