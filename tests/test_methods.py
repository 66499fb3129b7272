"""The ten paper methods by name: exact parameter counts, defaults, errors and the `methods` command."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import SamModel

import hf_sam_peft
from hf_sam_peft.cli import main
from hf_sam_peft.methods import count_parameters, parameter_table
from hf_sam_peft.modeling.sam import sam_config

# Trainable parameters of the reference implementation (micro-sam's PEFT_Sam) on ViT-B, DESIGN §2.
VIT_B_TRAINABLE = {
    "full_ft": 93_735_472, "freeze_encoder": 4_064_560, "ln_tune": 4_101_424, "bias_tune": 4_165_936,
    "attn_tune": 32_505_648, "lora": 5_244_208, "qlora": 5_244_208, "adaptformer": 5_254_204,
    "ssf": 4_267_312, "fact": 4_365_616,
}


@pytest.fixture(scope="module")
def vit_b_meta():
    with torch.device("meta"):
        return SamModel(sam_config("vit_b"))


def test_vit_b_is_the_original_sam():
    assert count_parameters(SamModel(sam_config("vit_b")))[1] == 93_735_728


@pytest.mark.parametrize("name", [n for n in VIT_B_TRAINABLE if n != "qlora"])
def test_vit_b_trainable_counts_equal_the_reference(vit_b_meta, name):
    with torch.device("meta"):
        model = hf_sam_peft.apply_method(copy.deepcopy(vit_b_meta), name)
    assert count_parameters(model)[0] == VIT_B_TRAINABLE[name]


def test_vit_b_lora_count_on_real_weights():
    model = hf_sam_peft.apply_method(SamModel(sam_config("vit_b")), "lora")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == VIT_B_TRAINABLE["lora"]


def test_parameter_table_counts_qlora_as_lora_and_sizes_differ():
    rows = {r["method"]: r for r in parameter_table("vit_b")}
    assert {n: rows[n]["trainable"] for n in VIT_B_TRAINABLE} == VIT_B_TRAINABLE
    assert rows["lora"]["encoder_trainable"] == 12 * 4 * 768 * 32
    large = {r["method"]: r for r in parameter_table("vit_l", methods=("lora", "ln_tune"))}
    assert large["lora"]["encoder_trainable"] == 24 * 4 * 1024 * 32
    assert large["ln_tune"]["encoder_trainable"] == 24 * 4 * 1024


def test_full_ft_trains_everything_but_the_fixed_positional_basis(tiny_sam):
    model = hf_sam_peft.apply_method(tiny_sam, "full_ft")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["shared_image_embedding.positional_embedding"]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("lora", dict(r=32, lora_alpha=32, lora_dropout=0.0)),
        ("fact", dict(r=16, dropout=0.1, shared_factors=False, init="identity")),
        ("adaptformer", dict(projection_size=64, alpha=None, dropout=0.0)),
        ("ssf", dict(init="identity")),
    ],
)
def test_method_config_has_paper_defaults(name, expected):
    config = hf_sam_peft.method_config(name)
    assert {k: getattr(config, k) for k in expected} == expected
    assert "mask_decoder" in config.modules_to_save


def test_method_config_overrides_and_full_ft():
    assert hf_sam_peft.method_config("full_ft") is None
    assert hf_sam_peft.method_config("fact", r=8, shared_factors=True).r == 8
    assert hf_sam_peft.method_config("lora", r=8).r == 8


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="full_ft, freeze_encoder, ln_tune.*fact"):
        hf_sam_peft.method_config("prompt_tuning")


def test_bad_override_lists_valid_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\].*valid options: .*r\b"):
        hf_sam_peft.method_config("fact", rank=4)
    with pytest.raises(ValueError, match="full_ft' takes only the option 'layers'"):
        hf_sam_peft.method_config("full_ft", r=2)


def test_apply_method_rejects_non_sam_models():
    with pytest.raises(ValueError, match="SAM model with an image encoder"):
        hf_sam_peft.apply_method(torch.nn.Linear(2, 2), "lora")


def test_methods_command_prints_the_table(capsys):
    assert main(["methods", "--model", "vit_b"]) == 0
    out = capsys.readouterr().out
    for number in ("89,670,912", "1,179,648", "301,056", "202,752", "28,441,088", "5.2442", "4.3656"):
        assert number in out
    assert "FacT" in out and "QLoRA" in out


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "methods" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["lora", "fact", "freeze_encoder", "full_ft"])
def test_with_unetr_decoder_counts(vit_b_meta, name):
    """DESIGN §2 "with decoder": the UNETR decoder (transposed-conv upsampling) trains with every method.

    The reference's decoder has 11,028,931 parameters (DESIGN and Table 5 round it to 11,028,900)."""
    from hf_sam_peft.modeling.unetr import attach_unetr

    with torch.device("meta"):
        base = copy.deepcopy(vit_b_meta)
        decoder = attach_unetr(base)
        model = hf_sam_peft.apply_method(base, name)
    assert sum(p.numel() for p in decoder.parameters()) == 11_028_931
    assert count_parameters(model)[0] == VIT_B_TRAINABLE[name] + 11_028_931


# --- SAM 2 / 2.1 (transformers' Sam2Model with a Hiera image encoder; hf_sam_peft.modeling.sam2) ---------------
# Trainable parameters per method and size as (encoder part, total). Every total is the encoder part plus
# SAM2_DECODER = 4,221,329, what every method trains: the prompt encoder (6,220; its Fourier basis is a buffer in
# SAM 2) and the mask decoder (4,215,109 = SAM's 4,058,340 + conv_s0 8,224 + conv_s1 16,448 + the object-score
# token 256 and head 131,841). Full FT's encoder part is the whole vision encoder (Hiera + FPN neck) plus
# `no_memory_embedding` (256); QLoRA counts as LoRA (its 4-bit weights are frozen).
SAM2_DECODER = 4_221_329
SAM2_ENCODER_TRAINABLE = {
    "sam2_hiera_tiny": {
        "full_ft": 27_219_392, "freeze_encoder": 0, "ln_tune": 17_472, "bias_tune": 52_416, "attn_tune": 8_036_736,
        "lora": 559_104, "qlora": 559_104, "adaptformer": 607_596, "ssf": 104_832, "fact": 145_920,
    },
    "sam2_hiera_small": {
        "full_ft": 34_317_248, "freeze_encoder": 0, "ln_tune": 23_616, "bias_tune": 69_312, "attn_tune": 10_402_176,
        "lora": 755_712, "qlora": 755_712, "adaptformer": 806_000, "ssf": 138_624, "fact": 197_120,
    },
    "sam2_hiera_base_plus": {
        "full_ft": 69_107_072, "freeze_encoder": 0, "ln_tune": 41_440, "bias_tune": 119_056, "attn_tune": 21_643_776,
        "lora": 1_326_080, "qlora": 1_326_080, "adaptformer": 1_388_568, "ssf": 238_112, "fact": 343_808,
    },
    "sam2_hiera_large": {
        "full_ft": 212_703_536, "freeze_encoder": 0, "ln_tune": 107_424, "bias_tune": 301_968, "attn_tune": 68_662_656,
        "lora": 3_437_568, "qlora": 3_437_568, "adaptformer": 3_532_560, "ssf": 603_936, "fact": 883_968,
    },
}
SAM2_TRAINABLE = {  # totals, M as the CLI prints them
    "sam2_hiera_tiny": {
        "full_ft": 31_440_721, "freeze_encoder": 4_221_329, "ln_tune": 4_238_801, "bias_tune": 4_273_745,
        "attn_tune": 12_258_065, "lora": 4_780_433, "qlora": 4_780_433, "adaptformer": 4_828_925, "ssf": 4_326_161,
        "fact": 4_367_249,
    },
    "sam2_hiera_small": {
        "full_ft": 38_538_577, "freeze_encoder": 4_221_329, "ln_tune": 4_244_945, "bias_tune": 4_290_641,
        "attn_tune": 14_623_505, "lora": 4_977_041, "qlora": 4_977_041, "adaptformer": 5_027_329, "ssf": 4_359_953,
        "fact": 4_418_449,
    },
    "sam2_hiera_base_plus": {
        "full_ft": 73_328_401, "freeze_encoder": 4_221_329, "ln_tune": 4_262_769, "bias_tune": 4_340_385,
        "attn_tune": 25_865_105, "lora": 5_547_409, "qlora": 5_547_409, "adaptformer": 5_609_897, "ssf": 4_459_441,
        "fact": 4_565_137,
    },
    "sam2_hiera_large": {
        "full_ft": 216_924_865, "freeze_encoder": 4_221_329, "ln_tune": 4_328_753, "bias_tune": 4_523_297,
        "attn_tune": 72_883_985, "lora": 7_658_897, "qlora": 7_658_897, "adaptformer": 7_753_889, "ssf": 4_825_265,
        "fact": 5_105_297,
    },
}


def _linear(i: int, o: int) -> int:
    return i * o + o


def _conv(i: int, o: int, k: int) -> int:
    return i * o * k * k + o


def sam2_decoder_formula(c: int = 256, mlp: int = 2048, mask_in: int = 16, tokens: int = 4) -> int:
    """Prompt encoder + mask decoder of SAM 2 (width c, two-way transformer MLP `mlp`, mask-input channels)."""
    mlp3 = lambda i, h, o: _linear(i, h) + _linear(h, h) + _linear(h, o)
    attn = lambda inner: 3 * _linear(c, inner) + _linear(inner, c)  # q, k, v (c -> inner) and out (inner -> c)
    two_way_block = attn(c) + 2 * attn(c // 2) + _linear(c, mlp) + _linear(mlp, c) + 4 * 2 * c
    transformer = 2 * two_way_block + attn(c // 2) + 2 * c
    sam_mask_decoder = (
        c + tokens * c + transformer  # IoU token, mask tokens
        + _conv(c, c // 4, 2) + _conv(c // 4, c // 8, 2) + 2 * (c // 4)  # upscaling (transposed convs) + its norm
        + tokens * mlp3(c, c, c // 8) + mlp3(c, c, tokens)  # hypernetwork MLPs, IoU head
    )
    assert sam_mask_decoder == 4_058_340  # SAM's (DESIGN §8)
    sam2_mask_decoder = sam_mask_decoder + _linear(c, c // 8) + _linear(c, c // 4) + c + mlp3(c, c, 1)
    mask_embed = (  # two strided convs with their LayerNorms, then 1x1 to c
        _conv(1, mask_in // 4, 2) + _conv(mask_in // 4, mask_in, 2) + _conv(mask_in, c, 1) + 2 * (mask_in // 4) + 2 * mask_in
    )
    prompt_encoder = 4 * c + c + c + mask_embed  # point (4), not-a-point and no-mask embeddings
    return sam2_mask_decoder + prompt_encoder


def sam2_encoder_formulas(model_type: str) -> dict[str, int]:
    """The encoder part of each method from the config's per-block widths (d in, d_out out; m = 4·d_out).

    Hiera's first block of stages 2-4 has d != d_out (qkv d -> 3·d_out, and a residual `proj` d -> d_out).
    """
    from hf_sam_peft.modeling.sam2 import sam2_config

    config = sam2_config(model_type)
    hiera, c = config.vision_config.backbone_config, config.vision_config.fpn_hidden_size
    assert hiera.mlp_ratio == 4.0
    dims = hiera.embed_dim_per_stage
    blocks = [  # (d, d_out) of every block: a stage's first block reads the previous stage's width
        (dims[s - 1] if s and j == 0 else dims[s], dims[s]) for s, n in enumerate(hiera.blocks_per_stage) for j in range(n)
    ]
    pooled = lambda d, d_out: int(d != d_out)
    per_block = lambda f: sum(f(d, d_out) for d, d_out in blocks)

    def whole_block(d: int, d_out: int) -> int:
        m = 4 * d_out
        return (
            2 * d + _linear(d, 3 * d_out) + _linear(d_out, d_out) + 2 * d_out + _linear(d_out, m) + _linear(m, d_out)
            + pooled(d, d_out) * _linear(d, d_out)
        )

    d0 = dims[0]
    bg_h, bg_w = hiera.window_positional_embedding_background_size
    full = (
        _conv(3, d0, 7) + d0 * bg_h * bg_w + d0 * hiera.window_size_per_stage[0] ** 2  # patch + position embeddings
        + per_block(whole_block)
        + sum(_conv(ch, c, 1) for ch in config.vision_config.backbone_channel_list)  # FPN neck
        + c  # no_memory_embedding
    )
    r_lora, p, r_fact = 32, 64, 16
    lora = per_block(lambda d, d_out: 2 * r_lora * (d + d_out))  # A_q, A_v: d -> r; B_q, B_v: r -> d_out
    return {
        "full_ft": full,
        "freeze_encoder": 0,
        "ln_tune": per_block(lambda d, d_out: 2 * d + 2 * d_out),  # layer_norm1 (d), layer_norm2 (d_out)
        # biases of qkv 3d_out, attn.proj d_out, mlp m + d_out, layer_norm1 d, layer_norm2 d_out, residual proj d_out
        "bias_tune": per_block(lambda d, d_out: 10 * d_out + d + pooled(d, d_out) * d_out),
        "attn_tune": per_block(lambda d, d_out: _linear(d, 3 * d_out) + _linear(d_out, d_out)),  # no rel-pos tables
        "lora": lora,
        "qlora": lora,
        "adaptformer": per_block(lambda d, d_out: _linear(d_out, p) + _linear(p, d_out) + 1),  # on the MLP, + α
        "ssf": per_block(lambda d, d_out: 2 * (10 * d_out + d + pooled(d, d_out) * d_out)),  # γ, β where Bias Tune has b
        "fact": per_block(lambda d, d_out: r_fact * d + d_out * r_fact + 2 * r_fact**2),  # U, V, S_q, S_v
    }


@pytest.mark.parametrize("model_type", list(SAM2_ENCODER_TRAINABLE))
def test_sam2_pinned_counts_follow_the_closed_formulas(model_type):
    assert sam2_decoder_formula() == SAM2_DECODER
    assert sam2_encoder_formulas(model_type) == SAM2_ENCODER_TRAINABLE[model_type]
    assert {n: e + SAM2_DECODER for n, e in SAM2_ENCODER_TRAINABLE[model_type].items()} == SAM2_TRAINABLE[model_type]


@pytest.mark.parametrize("model_type", list(SAM2_ENCODER_TRAINABLE))
def test_sam2_parameter_table(model_type):
    rows = {r["method"]: r for r in parameter_table(model_type)}
    assert {n: r["encoder_trainable"] for n, r in rows.items()} == SAM2_ENCODER_TRAINABLE[model_type]
    assert {n: r["trainable"] for n, r in rows.items()} == SAM2_TRAINABLE[model_type]
    assert rows["full_ft"]["base_total"] == SAM2_TRAINABLE[model_type]["full_ft"]  # no frozen parameter in Full FT


def test_methods_command_prints_sam2_sizes(capsys):
    assert main(["methods", "--model", "sam2_hiera_tiny", "--model", "vit_b"]) == 0
    out = capsys.readouterr().out
    for number in ("27,219,392", "559,104", "145,920", "31.4407", "4.2213", "4.7804", "1,179,648"):
        assert number in out
    assert "sam2_hiera_tiny encoder" in out and "31,440,721 parameters" in out


def test_parameter_table_rejects_unknown_sizes():
    with pytest.raises(ValueError, match="model_type must be one of vit_b.*sam2_hiera_large"):
        parameter_table("sam2_hiera_huge")
