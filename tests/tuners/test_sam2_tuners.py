"""The ten methods on SAM 2 (transformers' `Sam2Model`, Hiera image encoder) through the same names and configs.

Hiera differs from SAM's ViT where the tuners must care: the blocks live at `vision_encoder.backbone.blocks.<i>`,
the width doubles at every stage, and the first block of stages 2-4 maps dim -> dim_out (qkv: dim -> 3·dim_out,
plus a residual `proj`). The tiny SAM 2 (`tiny_sam2_config`) has 5 blocks of widths (in, out)
(16, 16), (16, 32), (32, 64), (64, 64), (64, 128): three of them pooled.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from transformers import Sam2Model, SamModel

import hf_sam_peft
from hf_sam_peft.methods import count_parameters
from hf_sam_peft.modeling.sam import tiny_sam_config
from hf_sam_peft.modeling.sam2 import tiny_sam2_config
from hf_sam_peft.tuners import register_qv_lora
from hf_sam_peft.tuners.base import default_modules_to_save, modules_to_save_for, num_encoder_layers
from hf_sam_peft.tuners.lora.layer import QVLoraMixin
from tests.tuners.helpers import base_of, perturb_trainable

BLOCK_WIDTHS = [(16, 16), (16, 32), (32, 64), (64, 64), (64, 128)]
POOLED = [i for i, (d, d_out) in enumerate(BLOCK_WIDTHS) if d != d_out]
ADAPTERS = ("ln_tune", "bias_tune", "attn_tune", "lora", "adaptformer", "ssf", "fact")
MERGEABLE = ("ln_tune", "bias_tune", "attn_tune", "lora", "ssf", "fact")

# What each method wraps in every Hiera block (module names relative to the block). Bias Tune and SSF cover every
# Linear and LayerNorm of a block, as on SAM, so also the residual `proj` of the pooled blocks.
ALL_OPS = ("attn.qkv", "attn.proj", "mlp.proj_in", "mlp.proj_out", "layer_norm1", "layer_norm2")
WRAPPED = {
    "ln_tune": ("layer_norm1", "layer_norm2"),
    "bias_tune": (*ALL_OPS, "proj"),
    "attn_tune": ("attn",),
    "lora": ("attn.qkv",),
    "adaptformer": ("mlp",),
    "ssf": (*ALL_OPS, "proj"),
    "fact": ("attn.qkv",),
}
BLOCK = re.compile(r"vision_encoder\.backbone\.blocks\.(\d+)\.")


@pytest.fixture(scope="module")
def sam2() -> Sam2Model:
    torch.manual_seed(0)
    model = Sam2Model(tiny_sam2_config()).eval()
    with torch.no_grad():  # zero-initialised in transformers; non-zero in the real checkpoints
        model.no_memory_embedding.normal_(std=0.1)
    return model


def adapt(base: Sam2Model, name: str, **overrides):
    return hf_sam_peft.apply_method(copy.deepcopy(base), name, **overrides).eval()


def example_inputs(with_box_and_mask: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(1, 3, 256, 256, generator=g),
        "input_points": torch.tensor([[[[100.0, 120.0], [30.0, 200.0]]]]),
        "input_labels": torch.tensor([[[1, 0]]]),
    }
    if with_box_and_mask:
        inputs["input_boxes"] = torch.tensor([[[40.0, 50.0, 160.0, 170.0]]])
        inputs["input_masks"] = torch.randn(1, 1, 64, 64, generator=g)
    return inputs


@torch.no_grad()
def outputs(model) -> list[torch.Tensor]:
    """Every image feature level (the encoder's output after the neck), masks, IoU and object scores."""
    out = model(**example_inputs())
    return [*out.image_embeddings, out.pred_masks, out.iou_scores, out.object_score_logits]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-6) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.allclose(x, y, atol=atol, rtol=0), f"output {i} differs by {(x - y).abs().max():.2e}"


def wrapped_modules(model) -> set[str]:
    """`<block>.<name>` of every encoder module a tuner wrapped."""
    names = set()
    for name, module in base_of(model).named_modules():
        match = BLOCK.search(name + ".")
        if isinstance(module, BaseTunerLayer) and match:
            names.add(f"{match.group(1)}.{name[match.end():]}")
    return names


def expected_wrapped(name: str, blocks=range(len(BLOCK_WIDTHS))) -> set[str]:
    return {f"{i}.{m}" for i in blocks for m in WRAPPED[name] if m != "proj" or i in POOLED}


def test_encoder_layers_are_the_hiera_blocks(sam2):
    assert num_encoder_layers(sam2) == len(BLOCK_WIDTHS)
    blocks = sam2.vision_encoder.backbone.blocks
    assert [(b.dim, b.dim_out) for b in blocks] == BLOCK_WIDTHS


@pytest.mark.parametrize("name", ADAPTERS)
def test_wraps_the_intended_modules_of_every_block(sam2, name):
    assert wrapped_modules(adapt(sam2, name)) == expected_wrapped(name)


@pytest.mark.parametrize("name", ["freeze_encoder", *ADAPTERS, "fact_shared"])
def test_starts_as_the_pretrained_model(sam2, name):
    overrides = {"shared_factors": True} if name == "fact_shared" else {}
    model = adapt(sam2, name.replace("_shared", ""), **overrides)
    assert_close(outputs(model), outputs(sam2))


@pytest.mark.parametrize(
    "config",
    [
        hf_sam_peft.FreezeEncoderConfig, hf_sam_peft.LNTuneConfig, hf_sam_peft.BiasTuneConfig,
        hf_sam_peft.AttnTuneConfig, hf_sam_peft.AdaptFormerConfig, hf_sam_peft.SSFConfig, hf_sam_peft.FactConfig,
    ],
)
def test_plain_get_peft_model_with_our_configs(sam2, config):
    """Our tuners write SAM's default `modules_to_save` in SAM 2's layout themselves (one `point_embed`)."""
    model = get_peft_model(copy.deepcopy(sam2), config()).eval()
    assert "prompt_encoder.point_embed" in model.peft_config["default"].modules_to_save
    reference = hf_sam_peft.apply_method(copy.deepcopy(sam2), config().peft_type.value.lower())
    assert count_parameters(model) == count_parameters(reference)
    assert_close(outputs(model), outputs(sam2))


def test_plain_get_peft_model_with_lora_needs_sam2_modules_to_save(sam2):
    """peft's own LoRA tuner cannot translate the list: pass the model's (apply_method does)."""
    config = hf_sam_peft.qv_lora_config(modules_to_save=default_modules_to_save(sam2))
    model = get_peft_model(copy.deepcopy(sam2), config)
    assert count_parameters(model) == count_parameters(adapt(sam2, "lora"))
    assert "prompt_encoder.point_embed" in model.peft_config["default"].modules_to_save


def test_modules_to_save_translate_between_the_two_prompt_encoders(sam2):
    sam = SamModel(tiny_sam_config())
    assert default_modules_to_save(sam) == default_modules_to_save()
    sam2_names = default_modules_to_save(sam2)
    assert "prompt_encoder.point_embed" in sam2_names
    assert not any(re.match(r"prompt_encoder\.point_embed\.\d", n) for n in sam2_names)
    assert modules_to_save_for(sam, sam2_names) == default_modules_to_save()
    assert modules_to_save_for(sam2, ["mask_decoder", "unetr_decoder"]) == ["mask_decoder", "unetr_decoder"]


@pytest.mark.parametrize("name", ["full_ft", "freeze_encoder", *ADAPTERS, "fact_shared"])
def test_gradients_reach_exactly_what_the_method_trains(sam2, name):
    overrides = {"shared_factors": True} if name == "fact_shared" else {}
    model = adapt(sam2, name.replace("_shared", ""), **overrides).train()
    perturb_trainable(model)  # non-zero factors so every adapter tensor gets a signal
    loss = 0.0
    # every trainable part must be used: points and box corners, mask and no-mask embedding, single and multimask
    for inputs, multimask in ((example_inputs(), True), (example_inputs(with_box_and_mask=True), False)):
        out = model(**inputs, multimask_output=multimask)
        loss = loss + out.pred_masks.square().mean() + out.iou_scores.mean() + out.object_score_logits.mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} trains but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    encoder = [n for n in trainable if "vision_encoder." in n]
    base = base_of(model)
    # no_memory_embedding (added to the image features) trains with Full FT only, like the encoder
    assert base.no_memory_embedding.requires_grad == (name == "full_ft")
    if name == "full_ft":
        assert len(trainable) == len(list(sam2.parameters()))  # the Fourier basis is a buffer in SAM 2
        return
    # outside the encoder: exactly the prompt encoder's embeddings and the mask decoder (modules_to_save)
    outside = {re.sub(r"\.modules_to_save\.default", "", n.removeprefix("base_model.model.")) for n in trainable}
    outside -= {n.removeprefix("base_model.model.") for n in encoder}
    expected = {
        n for n, _ in sam2.named_parameters() if n.startswith(("mask_decoder.", "prompt_encoder."))
    }
    assert outside == expected
    # inside: the wrapped modules are exactly the method's, and only their adapter tensors train
    assert bool(encoder) == (name != "freeze_encoder")
    wrapped = wrapped_modules(model)
    assert wrapped == (expected_wrapped(name.replace("_shared", "")) if name != "freeze_encoder" else set())
    prefixes = tuple(f"base_model.model.vision_encoder.backbone.blocks.{w}." for w in wrapped)
    assert all(n.startswith(prefixes) and ".base_layer." not in n for n in encoder)


@pytest.mark.parametrize("name", ["freeze_encoder", *ADAPTERS, "fact_shared"])
def test_save_and_reload_give_identical_outputs(sam2, name, tmp_path):
    overrides = {"shared_factors": True} if name == "fact_shared" else {}
    model = adapt(sam2, name.replace("_shared", ""), **overrides)
    perturb_trainable(model)
    expected = outputs(model)
    assert not torch.allclose(expected[-3], outputs(sam2)[-3], atol=1e-5)  # not trivially the base model
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        saved = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert sum(torch.Size(s).numel() for s in saved.values()) == count_parameters(model)[0]
    assert "base_model.model.prompt_encoder.point_embed.weight" in saved
    assert not any("no_memory_embedding" in k or "shared_embedding" in k for k in saved)

    reloaded = hf_sam_peft.load_adapter(copy.deepcopy(sam2), str(tmp_path)).eval()
    assert_close(outputs(reloaded), expected, atol=0)
    # peft's own loader: q/v LoRA layers are not in the saved config (as on SAM), so register them for it
    config = register_qv_lora(LoraConfig.from_pretrained(tmp_path)) if name == "lora" else None
    reloaded = PeftModel.from_pretrained(copy.deepcopy(sam2), tmp_path, config=config).eval()
    assert_close(outputs(reloaded), expected, atol=0)


@pytest.mark.parametrize("name", ADAPTERS)
def test_layers_index_the_hiera_blocks(sam2, name):
    model = adapt(sam2, name, layers=[1, -1])
    assert wrapped_modules(model) == expected_wrapped(name, blocks=(1, 4))
    config = model.peft_config["default"]
    assert (config.layers_to_transform if name == "lora" else config.layers) == [1, 4]  # resolved, as saved
    everywhere = adapt(sam2, name)
    trainable = lambda m: {n: p.numel() for n, p in m.named_parameters() if p.requires_grad and "vision_encoder." in n}
    chosen = {n: k for n, k in trainable(everywhere).items() if int(BLOCK.search(n).group(1)) in (1, 4)}
    assert trainable(model) == chosen


def test_layers_out_of_range_names_the_encoder_size(sam2):
    with pytest.raises(ValueError, match="image encoder of 5 layers"):
        adapt(sam2, "ssf", layers=[5])


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_and_unload_keeps_outputs(sam2, name):
    model = adapt(sam2, name)
    perturb_trainable(model)
    expected = outputs(model)
    merged = model.merge_and_unload()
    assert type(merged) is Sam2Model
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.vision_encoder.modules())
    assert_close(outputs(merged), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["ssf", "fact", "lora"])
def test_merge_and_unmerge_restore_the_base_weights(sam2, name):
    model = adapt(sam2, name)
    perturb_trainable(model)
    expected = outputs(model)
    before = {k: v.clone() for k, v in base_of(model).vision_encoder.state_dict().items()}
    model.merge_adapter()
    assert_close(outputs(model), expected, atol=1e-5)
    model.unmerge_adapter()
    after = base_of(model).vision_encoder.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6 if name == "lora" else 0, rtol=0) for k in before)


def test_adaptformer_refuses_to_merge(sam2):
    with pytest.raises(ValueError, match="cannot be merged"):
        adapt(sam2, "adaptformer").merge_and_unload()


def test_qv_lora_on_a_pooled_block_uses_dim_out_and_leaves_k(sam2):
    model = adapt(sam2, "lora", r=4)
    perturb_trainable(model)
    layer = base_of(model).vision_encoder.backbone.blocks[POOLED[0]].attn.qkv
    d, d_out = BLOCK_WIDTHS[POOLED[0]]
    assert isinstance(layer, QVLoraMixin)
    assert layer.lora_A["default"].weight.shape == (2 * 4, d)
    assert layer.lora_B["default"].weight.shape == (2, d_out, 4)
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        adapted = layer(x)
        with model.disable_adapter():
            plain = layer(x)
    dq, dk, dv = (adapted - plain).abs().chunk(3, dim=-1)
    assert dk.max() == 0 and dq.max() > 0 and dv.max() > 0


def test_fact_on_a_pooled_block_and_shared_factors_per_width(sam2):
    r = 16
    per_block = adapt(sam2, "fact")
    layer = base_of(per_block).vision_encoder.backbone.blocks[POOLED[0]].attn.qkv
    d, d_out = BLOCK_WIDTHS[POOLED[0]]
    u, v = layer._factors["default"]
    assert (tuple(u.shape), tuple(v.shape)) == ((r, d), (d_out, r))

    shared = adapt(sam2, "fact", shared_factors=True)
    layers = [b.attn.qkv for b in base_of(shared).vision_encoder.backbone.blocks]
    us = [layer._factors["default"][0] for layer in layers]
    vs = [layer._factors["default"][1] for layer in layers]
    # U is shared by blocks reading the same width, V by blocks writing the same width
    for i, (d_i, do_i) in enumerate(BLOCK_WIDTHS):
        for j, (d_j, do_j) in enumerate(BLOCK_WIDTHS):
            assert (us[i] is us[j]) == (d_i == d_j)
            assert (vs[i] is vs[j]) == (do_i == do_j)
    encoder = count_parameters(shared)[0] - count_parameters(adapt(sam2, "freeze_encoder"))[0]
    in_widths = {d for d, _ in BLOCK_WIDTHS}
    out_widths = {d_out for _, d_out in BLOCK_WIDTHS}
    assert encoder == r * sum(in_widths) + r * sum(out_widths) + len(BLOCK_WIDTHS) * 2 * r * r


def test_full_ft_trains_everything_including_no_memory_embedding(sam2):
    model = adapt(sam2, "full_ft")
    assert all(p.requires_grad for p in model.parameters())
    assert count_parameters(model)[0] == count_parameters(sam2)[1]


bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (pip install 'hf-sam-peft[quant]')")


def test_qlora_quantizes_every_hiera_linear_and_trains(sam2):
    model = adapt(sam2, "qlora", r=4).train()
    four_bit = [m for m in base_of(model).vision_encoder.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # qkv, attn.proj, mlp.proj_in, mlp.proj_out per block, and the pooled blocks' residual proj
    assert len(four_bit) == 4 * len(BLOCK_WIDTHS) + len(POOLED)
    assert count_parameters(model)[0] == count_parameters(adapt(sam2, "lora", r=4))[0]
    perturb_trainable(model)
    model(**example_inputs()).pred_masks.square().mean().backward()
    lora_a = base_of(model).vision_encoder.backbone.blocks[POOLED[0]].attn.qkv.lora_A["default"].weight
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
