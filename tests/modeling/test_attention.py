"""The fused rel-pos attention computes transformers' SamVisionAttention: outputs and gradients, all block kinds."""

from __future__ import annotations

import pytest
import torch
from transformers import SamModel, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionAttention

from hf_sam_peft.modeling.attention import SamVisionFusedAttention, _key_position_codes, _key_tiles
from hf_sam_peft.modeling.sam import tiny_sam_config


def pair(window_size: int, use_rel_pos: bool = True, image_size: int = 128):
    torch.manual_seed(0)
    config = SamVisionConfig(hidden_size=48, num_attention_heads=3, image_size=image_size, patch_size=16,
                             use_rel_pos=use_rel_pos)
    eager = SamVisionAttention(config, window_size).double()
    if use_rel_pos:  # transformers initialises them to zero: make the bias matter
        torch.nn.init.normal_(eager.rel_pos_h, std=0.5)
        torch.nn.init.normal_(eager.rel_pos_w, std=0.5)
    fused = SamVisionFusedAttention(config, window_size).double()
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def run(module, x):
    x = x.clone().requires_grad_(True)
    out = module(x)[0]
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, [x, *params])
    return out.detach(), grads


@pytest.mark.parametrize("window_size,use_rel_pos", [(0, True), (4, True), (0, False)])
def test_fused_attention_matches_eager_outputs_and_gradients(window_size, use_rel_pos):
    eager, fused = pair(window_size, use_rel_pos)
    side = window_size or 128 // 16
    x = torch.randn(2, side, side, 48, dtype=torch.float64)
    ref_out, ref_grads = run(eager, x)
    out, grads = run(fused, x)
    # eager's softmax runs in float32 even for float64 inputs: that bounds the agreement
    assert torch.allclose(out, ref_out, atol=1e-6, rtol=1e-5)
    for ref, got in zip(ref_grads, grads):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    if use_rel_pos:
        assert ref_grads[-1].abs().max() > 0  # rel_pos_w gets a gradient, through the appended query terms


def test_fused_attention_under_bf16_autocast_is_close_and_returns_no_weights():
    eager, fused = pair(0)
    eager, fused = eager.float(), fused.float()
    x = torch.randn(1, 8, 8, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, weights = eager(x)
        out, none = fused(x)
    assert weights is not None and none is None
    assert (out.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()
    # output_attentions needs the weights: the eager computation answers
    out_w, weights_w = fused(x, output_attentions=True)
    assert weights_w is not None and torch.allclose(out_w, eager(x)[0], atol=1e-6)


def test_key_codes_are_row_then_column_one_hots():
    codes = _key_position_codes(2, 3, torch.device("cpu"), torch.float32)
    assert codes.shape == (6, 5)
    # key token 4 sits at row 1, column 1
    assert codes[4].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert torch.equal(codes.sum(1), torch.full((6,), 2.0))


def test_switching_a_whole_encoder_keeps_its_output():
    from hf_sam_peft.speed import set_encoder_attention

    torch.manual_seed(0)
    model = SamModel(tiny_sam_config()).eval()
    for layer in model.vision_encoder.layers:
        torch.nn.init.normal_(layer.attn.rel_pos_h, std=0.3)
        torch.nn.init.normal_(layer.attn.rel_pos_w, std=0.3)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = model.vision_encoder(x).last_hidden_state
        assert set_encoder_attention(model, "fused") == len(model.vision_encoder.layers)
        assert all(type(layer.attn) is SamVisionFusedAttention for layer in model.vision_encoder.layers)
        out = model.vision_encoder(x).last_hidden_state
    assert torch.allclose(out, ref, atol=1e-4)


def saved_for_backward(module, x, autocast: bool = False) -> list[torch.Tensor]:
    """The tensors autograd keeps for the backward of ``module(x)`` (parameters excluded)."""
    saved = []
    params = {p.data_ptr() for p in module.parameters()}

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            module(x)
    return saved


@pytest.mark.parametrize("window_size", [0, 4])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_cpu_training_path_keeps_no_widened_tensor_and_matches_sdpa_autograd(window_size, autocast, monkeypatch):
    import hf_sam_peft.modeling.attention as attention

    _, fused = pair(window_size)
    fused = fused.float()
    side = window_size or 8
    x = torch.randn(2, side, side, 48, requires_grad=True)
    head_dim, wide = 16, 16 + 2 * side

    # what autograd keeps: the qkv view, the unpadded output, the log-sum-exp; never a widened operand
    lean_saved = saved_for_backward(fused, x, autocast)
    assert lean_saved and all(t.shape[-1] != wide for t in lean_saved)
    monkeypatch.setattr(attention, "_lean_applies", lambda query, dropout: False)
    plain_saved = saved_for_backward(fused, x, autocast)
    assert any(t.shape[-1] == wide for t in plain_saved)  # the autograd path keeps q', k', v' and the output
    def nbytes(ts):
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())
    assert nbytes(lean_saved) < 0.75 * nbytes(plain_saved)

    def outputs_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fused(x)[0]
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return out.detach(), torch.autograd.grad((out.float() * weights).sum(), [x, *fused.parameters()])

    ref_out, ref_grads = outputs_and_grads()  # still the plain autograd path
    monkeypatch.undo()
    out, grads = outputs_and_grads()
    # the same kernels on the same operands: equal up to the order autograd sums the query's three uses
    assert torch.equal(out, ref_out)
    for ref, got in zip(ref_grads, grads):
        assert got.dtype == ref.dtype and torch.allclose(got.float(), ref.float(), rtol=0, atol=1e-5 * ref.float().abs().max())
    assert grads[-1].abs().max() > 0


def test_lean_path_serves_the_cpu_without_dropout_and_no_grad_runs_the_same_forward():
    from hf_sam_peft.modeling.attention import _lean_applies

    query = torch.zeros(1, 1, 4, 2)
    assert _lean_applies(query, 0.0)
    assert not _lean_applies(query, 0.1)
    _, fused = pair(0)
    fused.key_tile = 4
    x = torch.randn(1, 8, 8, 48, dtype=torch.float64)
    with torch.no_grad():
        assert _lean_applies(query, 0.0)
        inference = fused(x)[0]
    assert torch.equal(inference, fused(x.requires_grad_(True))[0].detach())


def test_key_tiles_cover_the_grid_once():
    def cells(tiles, height, width):
        grid = torch.zeros(height, width, dtype=torch.int64)
        for tile in tiles:
            grid[tile.rows, tile.cols] += 1
        return grid

    assert len(_key_tiles(64, 64, 32)) == 4 and torch.equal(cells(_key_tiles(64, 64, 32), 64, 64), torch.ones(64, 64, dtype=torch.int64))
    assert torch.equal(cells(_key_tiles(8, 4, 4), 8, 4), torch.ones(8, 4, dtype=torch.int64))
    for height, width, side in [(14, 14, 32), (14, 14, 4), (8, 8, 8), (8, 8, None)]:  # windows, the whole grid, off
        assert _key_tiles(height, width, side) == [(slice(0, height), slice(0, width), width)]


@pytest.mark.parametrize("autocast", [False, True])
def test_key_tiled_attention_matches_one_call_and_keeps_no_widened_tensor(autocast):
    """Four 4 x 4 key tiles of an 8 x 8 grid, merged by log-sum-exp, against one call over all keys."""
    _, fused = pair(0)
    fused = fused.float()
    x = torch.randn(2, 8, 8, 48, requires_grad=True)

    def outputs_and_grads(tile):
        fused.key_tile = tile
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fused(x)[0]
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return out.detach().float(), torch.autograd.grad((out.float() * weights).sum(), [x, *fused.parameters()])

    fused.key_tile = 4
    assert all(t.shape[-1] not in (16 + 8, 16 + 16) for t in saved_for_backward(fused, x, autocast))
    ref_out, ref_grads = outputs_and_grads(None)
    out, grads = outputs_and_grads(4)
    # float32: the same sums in another order; bf16: each tile's output is rounded to bf16 before the merge
    tol = 2e-2 if autocast else 1e-5
    assert not torch.equal(out, ref_out)  # the tiled path ran
    assert (out - ref_out).abs().max() <= tol * ref_out.abs().max()
    for ref, got in zip(ref_grads, grads):
        assert got.dtype == ref.dtype and (got - ref).abs().max() <= tol * ref.abs().max()
    assert grads[-1].abs().max() > 0
