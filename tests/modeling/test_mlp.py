"""The encoder MLP with recomputed hidden activations: autograd's own gradients, less kept."""

from __future__ import annotations

import pytest
import torch
from transformers import SamModel
from transformers.models.sam.modeling_sam import SamMLPBlock

import hf_sam_peft.modeling.mlp as mlp
from hf_sam_peft import apply_method
from hf_sam_peft.modeling.mlp import SamRecomputedMLPBlock, set_mlp_recompute
from hf_sam_peft.modeling.sam import tiny_sam_config
from hf_sam_peft.sam_forward.forward import unwrap_sam


def encoder_grads(model, encoder, dtype):
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 256, 256)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = encoder(pixels).last_hidden_state
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("method", ["lora", "full_ft", "adaptformer"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("hidden", [True, False])
def test_recomputed_mlp_gives_autograds_gradients_bit_for_bit(monkeypatch, method, dtype, hidden):
    torch.manual_seed(0)
    model = apply_method(SamModel(tiny_sam_config()), method).train()
    encoder = unwrap_sam(model).vision_encoder
    ref_out, ref = encoder_grads(model, encoder, dtype)
    packed = []
    pack = mlp._Recipes.pack
    monkeypatch.setattr(mlp._Recipes, "pack", lambda self, t: packed.append(pack(self, t)) or packed[-1])
    assert set_mlp_recompute(encoder, True, recompute_hidden=hidden) == len(encoder.layers)
    out, grads = encoder_grads(model, encoder, dtype)
    # the same ops on the same inputs: bit equality by construction
    assert torch.equal(out, ref_out)
    assert ref and set(grads) == set(ref) and all(torch.equal(grads[n], ref[n]) for n in ref)
    kinds = sorted({p[0] for p in packed if isinstance(p, tuple)})
    lin2_trains = method == "full_ft"  # else lin2's weight is frozen and autograd keeps nothing for it
    expected = (["hidden"] if hidden else []) + (["activation"] if lin2_trains else [])
    assert kinds == sorted(expected)


def test_switch_is_reversible_and_falls_back_where_it_cannot_apply():
    torch.manual_seed(0)
    model = SamModel(tiny_sam_config())
    encoder = model.vision_encoder
    keys = list(model.state_dict())
    assert set_mlp_recompute(encoder, True) == len(encoder.layers)
    assert set_mlp_recompute(encoder, True) == 0
    assert type(model.mask_decoder.transformer.layers[0].mlp) is SamMLPBlock  # the decoder's MLPs stay
    assert list(model.state_dict()) == keys
    block = encoder.layers[0].mlp
    x = torch.randn(1, 4, 4, block.lin1.in_features)
    with torch.no_grad():  # no graph: transformers' forward
        assert torch.equal(block(x), SamMLPBlock.forward(block, x))
    assert set_mlp_recompute(encoder, False) == len(encoder.layers)
    assert all(type(layer.mlp) is SamMLPBlock for layer in encoder.layers)


def test_wrapped_lin1_runs_transformers_forward(monkeypatch):
    """An adapter around lin1 (here LoRA with dropout) would not rerun identically: no recipe is made."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = SamModel(tiny_sam_config())
    get_peft_model(model, LoraConfig(r=2, target_modules=r".*vision_encoder.*mlp\.lin1", lora_dropout=0.5))
    set_mlp_recompute(model.vision_encoder, True)
    block = model.vision_encoder.layers[0].mlp
    assert isinstance(block, SamRecomputedMLPBlock)
    made = []
    monkeypatch.setattr(mlp, "_Recipes", lambda *args: made.append(args))
    x = torch.randn(1, 4, 4, block.lin1.in_features, requires_grad=True)
    block(x).sum().backward()
    assert not made and x.grad is not None


def test_input_modified_in_place_after_forward_is_an_error():
    torch.manual_seed(0)
    block = SamModel(tiny_sam_config()).vision_encoder.layers[0].mlp
    block.requires_grad_(False)  # lin1 frozen: autograd itself would not keep x; the recipe does
    set_mlp_recompute(block, True)
    base = torch.randn(1, 4, 4, block.lin1.in_features, requires_grad=True)
    x = base * 1.0
    out = block(x)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
