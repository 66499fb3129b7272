"""q/v-only LoRA on SAM's fused qkv (peft's own LoRA with a custom layer) and QLoRA with bitsandbytes 4-bit."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import SamModel

import hf_sam_peft
from hf_sam_peft.methods import count_parameters
from hf_sam_peft.modeling.sam import tiny_sam_config
from hf_sam_peft.tuners.lora.layer import QVLoraMixin
from tests.tuners.helpers import assert_outputs_close, base_of, example_inputs, outputs, perturb_trainable


def lora(base: SamModel, **overrides):
    return hf_sam_peft.apply_method(copy.deepcopy(base), "lora", **overrides).eval()


def test_adapts_q_and_v_but_not_k(tiny_sam):
    model = lora(tiny_sam, r=4)
    perturb_trainable(model)
    layer = base_of(model).vision_encoder.layers[0].attn.qkv
    assert isinstance(layer, QVLoraMixin)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        adapted = layer(x)
        with model.disable_adapter():
            plain = layer(x)
    dq, dk, dv = (adapted - plain).abs().chunk(3, dim=-1)
    assert dk.max() == 0 and dq.max() > 0 and dv.max() > 0


def test_counts_and_paper_defaults(tiny_sam):
    model = lora(tiny_sam)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (32, 32, 0.0)
    d, r, n_layers = 64, 32, 2
    encoder = count_parameters(model)[0] - count_parameters(hf_sam_peft.apply_method(copy.deepcopy(tiny_sam), "freeze_encoder"))[0]
    assert encoder == n_layers * 4 * d * r


def test_overriding_r_keeps_scale_one(tiny_sam):
    config = hf_sam_peft.method_config("lora", r=4)
    assert config.lora_alpha == 4
    layer = base_of(lora(tiny_sam, r=4)).vision_encoder.layers[0].attn.qkv
    assert layer.scaling["default"] == 1.0


def test_starts_as_the_pretrained_model(tiny_sam):
    assert_outputs_close(outputs(lora(tiny_sam)), outputs(tiny_sam))


def test_save_and_load_adapter_round_trip(tiny_sam, tmp_path):
    model = lora(tiny_sam, r=8)
    perturb_trainable(model)
    expected = outputs(model)
    model.save_pretrained(tmp_path)
    reloaded = hf_sam_peft.load_adapter(copy.deepcopy(tiny_sam), str(tmp_path)).eval()
    assert isinstance(reloaded, PeftModel)
    assert_outputs_close(outputs(reloaded), expected, atol=0)


def test_merge_and_unload(tiny_sam):
    model = lora(tiny_sam, r=8)
    perturb_trainable(model)
    expected = outputs(model)
    merged = model.merge_and_unload()
    assert type(merged.vision_encoder.layers[0].attn.qkv) is torch.nn.Linear
    assert_outputs_close(outputs(merged), expected, atol=1e-5)


def test_two_adapters_switch(tiny_sam):
    model = lora(tiny_sam, r=4)
    perturb_trainable(model, seed=1)
    first = outputs(model)
    model.add_adapter("other", hf_sam_peft.method_config("lora", r=4))
    model.set_adapter("other")
    perturb_trainable(model, seed=2)
    assert not torch.allclose(outputs(model)[0], first[0])
    model.set_adapter("default")
    assert_outputs_close(outputs(model), first, atol=0)


def test_adapter_for_another_sam_size_is_a_clear_error(tiny_sam, tmp_path):
    lora(tiny_sam, r=4).save_pretrained(tmp_path)
    torch.manual_seed(0)
    other = SamModel(tiny_sam_config(hidden_size=96))
    with pytest.raises(ValueError, match="does not fit this base model"):
        hf_sam_peft.load_adapter(other, str(tmp_path))


bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (pip install 'hf-sam-peft[quant]')")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_quantizes_every_encoder_linear(tiny_sam, quant_type):
    model = hf_sam_peft.apply_method(copy.deepcopy(tiny_sam), "qlora", r=4, quant_type=quant_type)
    linears = [m for m in base_of(model).vision_encoder.modules() if isinstance(m, torch.nn.Linear)]
    four_bit = [m for m in linears if isinstance(m, bnb.nn.Linear4bit)]
    # qkv, proj, lin1, lin2 per block; peft's LoRA A of each qkv is an nn.Linear too
    assert len(four_bit) == 4 * 2
    assert all(m.weight.quant_type == quant_type and m.weight.dtype == torch.uint8 for m in four_bit)
    assert all(not p.requires_grad for m in four_bit for p in m.parameters())


def test_qlora_trains_on_cpu_including_train_eval_train(tiny_sam):
    model = hf_sam_peft.apply_method(copy.deepcopy(tiny_sam), "qlora", r=4)
    perturb_trainable(model)
    assert count_parameters(model)[0] == count_parameters(lora(tiny_sam, r=4))[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    inputs = example_inputs()
    lora_a = base_of(model).vision_encoder.layers[0].attn.qkv.lora_A["default"].weight
    for phase in ("train", "eval", "train"):
        if phase == "eval":
            model.eval()
            with torch.no_grad():
                assert torch.isfinite(model(**inputs).pred_masks).all()
            continue
        model.train()
        before = lora_a.detach().clone()
        loss = model(**inputs).pred_masks.square().mean()
        loss.backward()
        assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        assert not torch.equal(before, lora_a.detach())


def test_bad_quant_type(tiny_sam):
    with pytest.raises(ValueError, match="quant_type must be one of"):
        hf_sam_peft.apply_method(copy.deepcopy(tiny_sam), "qlora", quant_type="int8")
