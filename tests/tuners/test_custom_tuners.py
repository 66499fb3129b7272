"""Behaviour of our peft tuner types on a tiny SAM: peft's API end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import SamModel

import hf_sam_peft
from hf_sam_peft.methods import count_parameters

from tests.tuners.helpers import assert_outputs_close, base_of, example_inputs, outputs, perturb_trainable

CONFIGS = {
    "freeze_encoder": hf_sam_peft.FreezeEncoderConfig,
    "ln_tune": hf_sam_peft.LNTuneConfig,
    "bias_tune": hf_sam_peft.BiasTuneConfig,
    "attn_tune": hf_sam_peft.AttnTuneConfig,
    "adaptformer": hf_sam_peft.AdaptFormerConfig,
    "ssf": hf_sam_peft.SSFConfig,
    "fact": hf_sam_peft.FactConfig,
    "fact_shared": lambda: hf_sam_peft.FactConfig(shared_factors=True),
}
MERGEABLE = [n for n in CONFIGS if n != "adaptformer"]


@pytest.fixture
def base(tiny_sam):
    return tiny_sam


def wrap(base: SamModel, name: str, adapter_name: str = "default"):
    return get_peft_model(copy.deepcopy(base), CONFIGS[name](), adapter_name=adapter_name).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_starts_as_the_pretrained_model(base, name):
    assert_outputs_close(outputs(wrap(base, name)), outputs(base))


@pytest.mark.parametrize("name,config", [("ssf", hf_sam_peft.SSFConfig), ("fact", hf_sam_peft.FactConfig)])
def test_reference_init_does_not_start_as_identity(base, name, config):
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), config(init="reference")).eval()
    assert not torch.allclose(outputs(model)[0], outputs(base)[0], atol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_save_holds_only_trainable_tensors_and_reloads_exactly(base, name, tmp_path):
    model = wrap(base, name)
    perturb_trainable(model)
    expected = outputs(model)
    if name != "freeze_encoder":
        with model.disable_adapter():
            assert not torch.allclose(outputs(model)[0], expected[0], atol=1e-6)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        saved = {k: f.get_slice(k).get_shape() for k in f.keys()}
    n_saved = sum(torch.Size(s).numel() for s in saved.values())
    assert n_saved == count_parameters(model)[0], "the adapter file must hold exactly the trainable tensors"
    assert all("vision_encoder" not in k or hf_sam_peft.METHODS for k in saved)
    assert not any(k.startswith("base_model.model.shared_image_embedding") for k in saved)

    fresh = copy.deepcopy(base)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert type(reloaded.peft_config["default"]) is type(model.peft_config["default"])
    assert_outputs_close(outputs(reloaded), expected, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_disable_adapter_gives_the_base_model(base, name):
    model = wrap(base, name)
    perturb_trainable(model)
    with model.disable_adapter():
        assert_outputs_close(outputs(model), outputs(base))


@pytest.mark.parametrize("name", ["ssf", "fact", "fact_shared", "adaptformer", "bias_tune"])
def test_two_named_adapters_switch_with_set_adapter(base, name):
    model = wrap(base, name, adapter_name="first")
    perturb_trainable(model, seed=1)
    first = outputs(model)
    model.add_adapter("second", CONFIGS[name]())
    model.set_adapter("second")
    perturb_trainable(model, seed=2)  # only the active adapter's tensors are trainable
    second = outputs(model)
    assert not torch.allclose(first[0], second[0], atol=1e-5)
    model.set_adapter("first")
    assert_outputs_close(outputs(model), first, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".second" in n for n in trainable)


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_and_unload_keeps_outputs(base, name):
    model = wrap(base, name)
    perturb_trainable(model)
    expected = outputs(model)
    merged = model.merge_and_unload()
    assert type(merged) is SamModel
    assert not any("base_layer" in n for n, _ in merged.named_modules())
    assert_outputs_close(outputs(merged), expected, atol=1e-5)


def test_merge_and_unmerge_is_exact(base):
    model = wrap(base, "ssf")
    perturb_trainable(model)
    before = copy.deepcopy(base_of(model).state_dict())
    model.merge_adapter()
    model.unmerge_adapter()
    after = base_of(model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adaptformer_refuses_to_merge(base):
    model = wrap(base, "adaptformer")
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_only_what_the_method_trains(base, name):
    model = wrap(base, name).train()
    perturb_trainable(model)  # non-zero factors so every adapter tensor gets a signal
    inputs = example_inputs()
    loss = 0.0
    box = torch.tensor([[[40.0, 50.0, 160.0, 170.0]]])
    # every trainable part must be used: mask or no-mask embedding, points and box corners, single and multimask
    for masks, boxes, multi in ((None, None, True), (torch.randn(1, 1, 64, 64), box, False)):
        out = model(**inputs, input_masks=masks, input_boxes=boxes, multimask_output=multi)
        loss = loss + out.pred_masks.square().mean() + out.iou_scores.mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} trains but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"
    encoder_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "vision_encoder" in n]
    assert bool(encoder_trainable) == (name != "freeze_encoder")
    assert not base_of(model).shared_image_embedding.positional_embedding.requires_grad


def test_fact_shared_factors_are_one_tensor(base):
    model = wrap(base, "fact_shared")
    layers = [m for m in model.modules() if type(m).__name__ == "FactLayer"]
    assert len(layers) == 2
    assert layers[0]._factors["default"][0] is layers[1]._factors["default"][0]
    d, r, n_layers = 64, 16, 2
    encoder = count_parameters(model)[0] - count_parameters(wrap(base, "freeze_encoder"))[0]
    assert encoder == 2 * d * r + n_layers * 2 * r * r


def test_fact_dropout_only_in_training(base):
    model = wrap(base, "fact")
    perturb_trainable(model)
    model.train()
    inputs = example_inputs()
    with torch.no_grad():
        a = model(**inputs).pred_masks
        b = model(**inputs).pred_masks
    assert not torch.allclose(a, b)
    model.eval()
    assert_outputs_close(outputs(model), outputs(model), atol=0)


def test_adaptformer_fixed_alpha(base):
    model = get_peft_model(copy.deepcopy(base), hf_sam_peft.AdaptFormerConfig(alpha=1.0, dropout=0.1))
    names = [n for n, p in model.named_parameters() if p.requires_grad and "adaptformer" in n]
    assert names and not any("alpha" in n for n in names)


def test_unknown_target_module_is_a_clear_error(base):
    with pytest.raises(ValueError, match="not_a_module"):
        get_peft_model(copy.deepcopy(base), hf_sam_peft.SSFConfig(target_modules=["not_a_module"]))


def test_model_without_sam_image_encoder_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="SAM model with an image encoder"):
        get_peft_model(model, hf_sam_peft.LNTuneConfig(target_modules=["1"]))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: hf_sam_peft.FactConfig(r=0), "r must be a positive int"),
        (lambda: hf_sam_peft.FactConfig(dropout=1.5), "dropout"),
        (lambda: hf_sam_peft.SSFConfig(init="random"), "init must be"),
        (lambda: hf_sam_peft.AdaptFormerConfig(projection_size=-1), "projection_size"),
        (lambda: hf_sam_peft.FreezeEncoderConfig(target_modules=["qkv"]), "target_modules must stay"),
    ],
)
def test_bad_config_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()
