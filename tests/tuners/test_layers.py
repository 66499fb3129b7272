"""`layers`: every encoder tuner adapts only the chosen `vision_encoder.layers.<i>`, and backward stops above them."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from transformers import SamModel

import hf_sam_peft
from hf_sam_peft.methods import count_parameters
from hf_sam_peft.modeling.sam import tiny_sam_config
from hf_sam_peft.tuners import register_qv_lora
from hf_sam_peft.tuners.base import LAYERS_PATTERN
from hf_sam_peft.speed import EfficiencyOptions, prepare_model
from tests.tuners.helpers import assert_outputs_close, outputs, perturb_trainable

ADAPTERS = ("ln_tune", "bias_tune", "attn_tune", "lora", "adaptformer", "ssf", "fact")
# DESIGN §2: trainable encoder parameters on ViT-B, all 12 blocks; every method's adapter is the same per block
# (ViT-B's global-attention blocks 2, 5, 8, 11 are split evenly), so the last 6 blocks hold exactly half
VIT_B_ENCODER = {
    "ln_tune": 36_864, "bias_tune": 101_376, "attn_tune": 28_441_088, "lora": 1_179_648, "adaptformer": 1_189_644,
    "ssf": 202_752, "fact": 301_056,
}
BLOCK = re.compile(r"vision_encoder\.layers\.(\d+)\.")


@pytest.fixture(scope="module")
def sam4() -> SamModel:
    """A tiny ViT SAM with 4 blocks (the last one global)."""
    torch.manual_seed(0)
    return SamModel(tiny_sam_config(num_hidden_layers=4)).eval()


def adapt(base: SamModel, name: str, **overrides) -> PeftModel:
    return hf_sam_peft.apply_method(copy.deepcopy(base), name, **overrides).eval()


def encoder_trainable(model) -> dict[str, int]:
    """Trainable encoder parameters by name (peft's adapter names)."""
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and "vision_encoder." in n}


def blocks_of(names) -> set[int]:
    return {int(BLOCK.search(n).group(1)) for n in names}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapts_exactly_the_chosen_blocks(sam4, name):
    everywhere = encoder_trainable(adapt(sam4, name))
    chosen = encoder_trainable(adapt(sam4, name, layers=[1, 3]))
    assert blocks_of(everywhere) == {0, 1, 2, 3}
    assert blocks_of(chosen) == {1, 3}
    # the same parameters as the all-block adapter has in those blocks, nothing else
    assert chosen == {n: k for n, k in everywhere.items() if int(BLOCK.search(n).group(1)) in (1, 3)}
    decoder = count_parameters(adapt(sam4, "freeze_encoder"))[0]
    assert count_parameters(adapt(sam4, name, layers=[1, 3]))[0] == decoder + sum(chosen.values())


@pytest.mark.parametrize("name", ["ln_tune", "lora"])
def test_negative_and_int_layers_resolve_against_the_model(sam4, name):
    last = adapt(sam4, name, layers=-1)
    assert blocks_of(encoder_trainable(last)) == {3}
    config = last.peft_config["default"]
    saved = config.layers_to_transform if name == "lora" else config.layers
    assert saved == [3]  # the saved config names the block, not "the last"
    assert encoder_trainable(adapt(sam4, name, layers=[-2, -1])) == encoder_trainable(adapt(sam4, name, layers=[2, 3]))


def test_custom_config_resolves_negative_layers_in_get_peft_model(sam4):
    from peft import get_peft_model

    config = hf_sam_peft.method_config("ssf", layers=[-1])  # no model yet: kept as given (a recipe's method_options)
    assert config.layers == [-1]
    model = get_peft_model(copy.deepcopy(sam4), config)
    assert model.peft_config["default"].layers == [3]
    assert blocks_of(encoder_trainable(model)) == {3}


def test_lora_uses_peft_layers_to_transform():
    config = hf_sam_peft.method_config("lora", layers=[6, 7])
    assert isinstance(config, LoraConfig)
    # peft reads layers_pattern as a regex: `vision_encoder.layers.<i>` (SAM) or `backbone.blocks.<i>` (SAM 2)
    assert (config.layers_to_transform, config.layers_pattern) == ([6, 7], LAYERS_PATTERN)
    assert config.target_modules == {"attn.qkv"}  # a name suffix: peft ignores layers_to_transform for a regex
    # a recipe's method_options are checked with method_config before any model exists: negatives stay as given
    assert hf_sam_peft.method_config("lora", layers=[-2, -1]).layers_to_transform == [-2, -1]


def test_deprecated_last_blocks_overrides_is_layers():
    from hf_sam_peft.training.efficiency import last_blocks_overrides

    with pytest.warns(DeprecationWarning, match=r"layers=list\(range\(-2, 0\)\)"):
        assert last_blocks_overrides("lora", 12, 2) == {"layers": [10, 11]}
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="k must be"):
        last_blocks_overrides("lora", 12, 13)


@pytest.mark.parametrize("name", list(VIT_B_ENCODER))
def test_vit_b_last_six_blocks_hold_half(name):
    """ViT-B on the meta device (as `methods.parameter_table`): LoRA r 32 in blocks 6-11 = 1,179,648 / 2."""
    from hf_sam_peft.modeling.sam import sam_config

    with torch.device("meta"):
        base = SamModel(sam_config("vit_b"))
        decoder = count_parameters(hf_sam_peft.apply_method(copy.deepcopy(base), "freeze_encoder"))[0]
        model = hf_sam_peft.apply_method(base, name, layers=list(range(-6, 0)))
    assert count_parameters(model)[0] - decoder == VIT_B_ENCODER[name] // 2
    assert blocks_of(encoder_trainable(model)) == set(range(6, 12))


@pytest.mark.parametrize(
    "layers, message",
    [
        ([4], r"layers \[4\] out of range"),
        ([-5], r"layers \[-5\] out of range"),
        ([1, 1], "layers names a block twice"),
        ([3, -1], "layers names a block twice"),
        ([1.0], "layers must be an int or a non-empty list of ints"),
        ("1", "layers must be an int or a non-empty list of ints"),
        ([], "layers must be an int or a non-empty list of ints"),
        (True, "layers must be an int or a non-empty list of ints"),
    ],
)
@pytest.mark.parametrize("name", ["lora", "bias_tune"])
def test_bad_layers_are_one_line_errors(sam4, name, layers, message):
    with pytest.raises(ValueError, match=message) as info:
        hf_sam_peft.apply_method(copy.deepcopy(sam4), name, layers=layers)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"method {name!r}: ")


def test_freeze_encoder_rejects_layers(sam4):
    with pytest.raises(ValueError, match="layers must stay None for FreezeEncoderConfig: it adapts no encoder block"):
        hf_sam_peft.apply_method(copy.deepcopy(sam4), "freeze_encoder", layers=[1])


def test_lora_layers_with_own_target_modules_is_an_error():
    with pytest.raises(ValueError, match="layers picks blocks of the default q/v target"):
        hf_sam_peft.method_config("lora", layers=[1], target_modules=["attn.qkv"])


@pytest.mark.parametrize("name", ADAPTERS)
def test_save_and_load_round_trip(sam4, name, tmp_path):
    model = adapt(sam4, name, layers=[0, 2])
    perturb_trainable(model)
    expected = outputs(model)
    assert not torch.allclose(expected[0], outputs(sam4)[0], atol=1e-5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["layers_to_transform" if name == "lora" else "layers"] == [0, 2]
    config = PeftConfig.from_pretrained(tmp_path)
    if name == "lora":
        register_qv_lora(config)  # peft does not serialise the q/v layer (hf_sam_peft.load_adapter does this)
    for reloaded in (
        PeftModel.from_pretrained(copy.deepcopy(sam4), tmp_path, config=config),
        hf_sam_peft.load_adapter(copy.deepcopy(sam4), str(tmp_path)),
    ):
        reloaded.eval()
        assert blocks_of(n for n, _ in reloaded.named_parameters() if reloaded.prefix in n) == {0, 2}
        assert_outputs_close(outputs(reloaded), expected, atol=0)


def test_tiny_vit_layers_are_stages():
    """LiteMedSAM's TinyViT: `layers.<i>` is stage i; its blocks are `layers.<i>.blocks.<j>`."""
    from hf_sam_peft.modeling import LiteSamModel
    from hf_sam_peft.modeling.lite_medsam import tiny_lite_sam_config

    torch.manual_seed(0)
    base = LiteSamModel(tiny_lite_sam_config()).eval()
    n_stages = len(base.vision_encoder.layers)
    for name in ("lora", "ln_tune"):
        model = hf_sam_peft.apply_method(copy.deepcopy(base), name, layers=[-1])
        names = encoder_trainable(model)
        assert names and blocks_of(names) == {n_stages - 1}
        assert all(re.search(rf"vision_encoder\.layers\.{n_stages - 1}\.blocks\.\d+\.", n) for n in names)
    with pytest.raises(ValueError, match=r"in layers \[0\] matches no module"):  # stage 0 is convolutional
        hf_sam_peft.apply_method(copy.deepcopy(base), "attn_tune", layers=[0])


def saved_tensors_per_block(model, pixels: torch.Tensor) -> tuple[Counter, torch.Tensor, list[torch.Tensor]]:
    """Tensors autograd saves for backward during the encoder's forward, by block; also each block's input."""
    encoder = model.get_base_model().vision_encoder
    where: list = [None]
    counts: Counter = Counter()
    inputs: list[torch.Tensor] = []
    hooks = []

    def enter(i, args) -> None:
        where[0] = i
        inputs.append(args[0])

    for i, block in enumerate(encoder.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: enter(i, args)))
        hooks.append(block.register_forward_hook(lambda m, args, out: where.__setitem__(0, None)))
    hooks.append(encoder.patch_embed.register_forward_pre_hook(lambda m, args: where.__setitem__(0, "patch_embed")))
    hooks.append(encoder.patch_embed.register_forward_hook(lambda m, args, out: where.__setitem__(0, None)))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        counts[where[0]] += 1
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            embedding = encoder(pixels).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return counts, embedding, inputs


@pytest.mark.parametrize("checkpoint_first", [False, True])
def test_backward_stops_at_the_first_adapted_block(sam4, checkpoint_first):
    """No graph and no saved activation below the first adapted block (also when peft hooked the patch embedding).

    `checkpoint_first`: gradient checkpointing on before `get_peft_model`, which makes peft add transformers'
    `enable_input_require_grads` hook (the patch embedding's output requires grad: a graph through every block);
    `prepare_model` removes it.
    """
    base = copy.deepcopy(sam4).train()
    if checkpoint_first:
        base.vision_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = hf_sam_peft.apply_method(base, "lora", layers=[2, 3]).train()
    perturb_trainable(model)  # LoRA's B starts at zero, which would leave A without gradient
    pixels = torch.randn(1, 3, 256, 256)
    if checkpoint_first:  # the hook peft added really forces a graph through the frozen blocks
        _, _, inputs = saved_tensors_per_block(model, pixels)
        assert inputs[0].requires_grad and inputs[2].grad_fn is not None
    prepare_model(model, EfficiencyOptions.plain(checkpoint_encoder=checkpoint_first))
    counts, embedding, inputs = saved_tensors_per_block(model, pixels)
    assert not inputs[2].requires_grad and inputs[2].grad_fn is None  # the hidden state entering block 2
    assert counts["patch_embed"] == counts[0] == counts[1] == 0
    if not checkpoint_first:  # (checkpointing saves through its own hooks, which replace ours)
        assert counts[2] > 0 and counts[3] > 0
    embedding.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert blocks_of(grads) == {2, 3} and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_all_blocks_adapted_keeps_activations_everywhere(sam4):
    """The counterpart: with every block adapted, every block saves tensors for backward."""
    model = hf_sam_peft.apply_method(copy.deepcopy(sam4), "lora").train()
    counts, _, inputs = saved_tensors_per_block(model, torch.randn(1, 3, 256, 256))
    assert all(counts[i] > 0 for i in range(4))
    assert inputs[1].grad_fn is not None
