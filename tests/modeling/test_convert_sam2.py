"""SAM 2 conversion against the reference implementation (the `sam2` package), the key tables of the four official
sizes, export round trips, refused inputs and the command line.

Numerical equality is checked on a tiny SAM 2 built from sam2's own classes: Hiera 16-128 wide with 5 blocks,
256² input, a 32-wide FPN (`tiny_sam2_config`'s image encoder); SAM2Base hard-codes the decoder's MLP width
(2048), its 8 heads and the prompt encoder's 16 mask channels, so the test's `Sam2Config` takes those. The
official sizes are checked on key names and shapes only (meta device): through our own table always, and
against sam2's `SAM2Base` built from its packaged configs where sam2 is installed. Without sam2 those tests skip,
naming the install line (it pulls neither torch nor torchvision).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
from unittest import mock

import pytest
import torch
from transformers import Sam2Config, Sam2MaskDecoderConfig, Sam2Model, Sam2PromptEncoderConfig

from hf_sam_peft.cli import main
from hf_sam_peft.modeling.convert import convert_checkpoint
from hf_sam_peft.modeling.convert_sam2 import (
    SAM2_MODEL_TYPES,
    convert_sam2_checkpoint,
    convert_sam2_state_dict,
    detect_sam2_model_type,
    export_sam2_checkpoint,
    load_sam2_checkpoint,
    load_sam2_config,
    sam2_model_from_state_dict,
    to_sam2_state_dict,
)
from hf_sam_peft.modeling.sam2 import SAM2_SIZES, sam2_config, tiny_sam2_config

TOL = 1e-4
IMAGE_SIZE = 256
SAM2_INSTALL = (
    "pip install hydra-core iopath && SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2==1.1.0"
)
_IMAGE_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.")
# the package's configs of the four sizes, by their file names
_OFFICIAL_CONFIGS = {
    f"{version}_hiera_{size}": f"configs/{version}/{version}_hiera_{short}.yaml"
    for version in ("sam2", "sam2.1")
    for short, size in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))
}


def _tiny_config() -> Sam2Config:
    """`tiny_sam2_config`'s image encoder with the prompt encoder and mask decoder sizes SAM2Base hard-codes."""
    vision = tiny_sam2_config(image_size=IMAGE_SIZE).vision_config
    width = vision.fpn_hidden_size
    return Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=width, image_size=IMAGE_SIZE),
        mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=width),
    )


def _perturb(model: torch.nn.Module) -> None:
    """Make every tensor distinct: both sides start norms at 1/0 and position tables at 0, where swapped or
    dropped keys would go unnoticed."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.05)


def _assert_same(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys(), sorted(set(state) ^ set(expected))[:5]
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not different, different[:5]


def _image_part(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(_IMAGE_PREFIXES) or k == "no_mem_embed"}


def _one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def _official_state(config: Sam2Config) -> dict[str, torch.Tensor]:
    """The official-layout image-model weights of a random `Sam2Model(config)`, built without sam2."""
    torch.manual_seed(0)
    model = Sam2Model(config).eval()
    _perturb(model)
    with torch.no_grad():  # transformers draws its two copies of SAM 2's one positional basis apart
        basis = model.shared_image_embedding.positional_embedding
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(basis)
    return to_sam2_state_dict(model.state_dict())


def _official_shapes(model_type: str) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return {k: v.shape for k, v in to_sam2_state_dict(Sam2Model(sam2_config(model_type)).state_dict()).items()}


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """The tiny SAM 2 in the official layout, plus two video-memory tensors."""
    state = _official_state(_tiny_config())
    state["maskmem_tpos_enc"] = torch.randn(7, 1, 1, 16)
    state["memory_encoder.out_proj.weight"] = torch.randn(16, 32, 1, 1)
    return state


@pytest.fixture
def tiny_file(tiny_state, tmp_path):
    path = tmp_path / "sam2.1_hiera_tiny_test.pt"
    torch.save({"model": tiny_state}, path)
    return path


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny_config.json"
    _tiny_config().to_json_file(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Key tables: the four official sizes (shapes only) and a tiny model (values)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", SAM2_SIZES)
def test_official_sizes_round_trip(model_type):
    with torch.device("meta"):  # shapes only
        state = Sam2Model(sam2_config(model_type)).state_dict()
    official = to_sam2_state_dict(state)
    assert all(k.startswith(_IMAGE_PREFIXES) or k == "no_mem_embed" for k in official)
    assert [official[f"sam_prompt_encoder.point_embeddings.{i}.weight"].shape for i in range(4)] == [(1, 256)] * 4
    assert official["no_mem_embed"].shape == state["no_memory_embedding"].shape == (1, 1, 256)
    assert detect_sam2_model_type(official) == model_type
    back = convert_sam2_state_dict(official)
    assert back.keys() == state.keys()
    assert all(back[k].shape == state[k].shape for k in state)
    rebuilt = ("prompt_encoder.point_embed.weight", "prompt_encoder.shared_embedding.positional_embedding")
    assert all(back[k] is state[k] for k in state if k not in rebuilt)  # renamed, not copied
    assert to_sam2_state_dict(back).keys() == official.keys()


def test_official_size_builds_from_the_shapes_alone():
    # stride-0 views of one zero: a complete sam2_hiera_tiny for next to no memory
    state = {k: torch.zeros(()).expand(shape) for k, shape in _official_shapes("sam2_hiera_tiny").items()}
    state["no_obj_ptr"] = torch.zeros(1, 256)  # video memory: ignored
    for model_type in (None, "sam2_hiera_tiny", "sam2.1_hiera_tiny"):
        model = sam2_model_from_state_dict(state, model_type)
        assert model.config.to_diff_dict() == sam2_config("sam2_hiera_tiny").to_diff_dict()
    with pytest.raises(ValueError, match="is 'sam2_hiera_small' but .* shapes of 'sam2_hiera_tiny'") as error:
        sam2_model_from_state_dict(state, "sam2_hiera_small")
    _one_line_error(error)
    with pytest.raises(ValueError, match="model_type is 'vit_b' but .* is a SAM 2 checkpoint; pass one of"):
        sam2_model_from_state_dict(state, "vit_b")


def test_tiny_round_trip_keeps_every_value(tiny_state):
    model = sam2_model_from_state_dict(tiny_state, config=_tiny_config())
    assert model.config.mask_decoder_config.num_attention_heads == 8
    state = model.state_dict()
    basis = state["shared_image_embedding.positional_embedding"]
    assert torch.equal(state["prompt_encoder.shared_embedding.positional_embedding"], basis)
    point = tiny_state["sam_prompt_encoder.point_embeddings.2.weight"]
    assert torch.equal(state["prompt_encoder.point_embed.weight"][2:3], point)
    _assert_same(to_sam2_state_dict(state), _image_part(tiny_state))
    four_heads = sam2_model_from_state_dict(tiny_state, config=_tiny_config(), decoder_num_heads=4)
    assert four_heads.config.mask_decoder_config.num_attention_heads == 4


# ---------------------------------------------------------------------------------------------------------------
# Refused inputs
# ---------------------------------------------------------------------------------------------------------------


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: _without(s, "sam_mask_decoder.conv_s0.weight"), r"lacks 'sam_mask_decoder.conv_s0.weight'"),
        (lambda s: _without(s, "sam_prompt_encoder.point_embeddings.1.weight"), "gaps in the numbering of its poi"),
        (
            lambda s: {**s, "sam_mask_decoder.iou_token.weight": torch.zeros(2, 32)},
            r"iou_token.weight' has shape \(2, 32\) where the given config has \(1, 32\)",
        ),
        (lambda s: {**s, "image_encoder.trunk.blocks.0.attn.qkv.weight": torch.zeros(48, 8)}, "has shape"),
        (
            lambda s: {**s, "sam_mask_decoder.hf_token.weight": torch.zeros(1, 32)},  # HQ-SAM 2
            "a SAM 2 does not have: 'sam_mask_decoder.hf_token",
        ),
        (lambda s: {**s, "image_encoder.trunk.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 16)}, "lora_A"),
        (
            lambda s: {**s, "sam_mask_decoder.output_hypernetworks_mlps.4.layers.0.weight": torch.zeros(32, 32)},
            "which the given config does not have",
        ),
        (lambda s: _without(s, "image_encoder.trunk.blocks.2.norm1.weight"), "lacks 'image_encoder.trunk.blocks.2"),
    ],
    ids=["missing", "point_gap", "token_shape", "qkv_shape", "hq_token", "adapter", "extra_mlp", "missing_block_norm"],
)
def test_refuses_incomplete_or_foreign_state(tiny_state, change, expected):
    with pytest.raises(ValueError, match=expected) as error:
        sam2_model_from_state_dict(change(dict(tiny_state)), config=_tiny_config())
    _one_line_error(error)


class _RunsCode:
    """Unpickling this would run a shell command: the loader must refuse before that."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_refuses_files_that_are_not_sam2_weights(tiny_state, tiny_file, tmp_path):
    path = tmp_path / "bad.pt"
    cases = [
        (torch.randn(3), "not a SAM 2 checkpoint: it holds a Tensor"),
        ([tiny_state], "not a SAM 2 checkpoint: it holds a list"),
        ({}, "it is empty"),
        ({"model": {"image_encoder.patch_embed.proj.weight": torch.zeros(1)}}, "keys look like 'image_encoder.patch"),
        ({"model": {**tiny_state, "sam_mask_decoder.note": "trained by me"}}, "non-tensor entries"),
    ]
    for payload, expected in cases:
        torch.save(payload, path)
        with pytest.raises(ValueError, match=expected) as error:
            load_sam2_checkpoint(path)
        _one_line_error(error)

    sentinel = tmp_path / "code_was_executed"
    torch.save({"model": tiny_state, "config": _RunsCode(sentinel)}, path)
    with pytest.raises(ValueError, match="refusing to execute code"):
        load_sam2_checkpoint(path)
    with pytest.raises(ValueError, match="refusing to execute code"):
        convert_checkpoint(path, tmp_path / "out")
    assert not sentinel.exists() and not (tmp_path / "out").exists()

    path.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_sam2_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_sam2_checkpoint(tmp_path / "missing.pt")


def test_other_shapes_need_a_config(tiny_file, config_file, tmp_path):
    # convert_checkpoint tells SAM 2 from SAM by the keys, then finds no official size in these shapes
    expected = r"none of the official sizes \(Hiera width 16, blocks per stage \[1, 1, 2, 1\]\).*--config"
    with pytest.raises(ValueError, match=expected) as error:
        convert_checkpoint(tiny_file, tmp_path / "out")
    _one_line_error(error)
    with pytest.raises(ValueError, match="not both"):
        convert_sam2_checkpoint(tiny_file, tmp_path / "out", "sam2_hiera_tiny", config=config_file)
    with pytest.raises(ValueError, match="must divide the decoder attention width 16"):
        convert_sam2_checkpoint(tiny_file, tmp_path / "out", config=config_file, decoder_num_heads=3)
    with pytest.raises(ValueError, match="model_type must be one of"):
        convert_checkpoint(tiny_file, tmp_path / "out", model_type="sam2_hiera_huge")
    assert not (tmp_path / "out").exists()
    # overwrite=True reaches the SAM 2 converter: an occupied folder is no error, the shapes are (kept as it was)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(tiny_file, occupied)
    with pytest.raises(ValueError, match="none of the official sizes"):
        convert_checkpoint(tiny_file, occupied, overwrite=True)
    assert (occupied / "keep.txt").read_text() == "mine"


def test_config_files(config_file, tmp_path):
    assert load_sam2_config(config_file).to_diff_dict() == _tiny_config().to_diff_dict()
    folder = tmp_path / "folder"
    _tiny_config().save_pretrained(folder)
    assert load_sam2_config(folder).vision_config.fpn_hidden_size == 32
    (tmp_path / "sam.json").write_text(json.dumps({"model_type": "sam"}))
    (tmp_path / "broken.json").write_text("{not json")
    for path, error_type, expected in [
        (tmp_path / "sam.json", ValueError, "model_type 'sam', expected 'sam2'"),
        (tmp_path / "broken.json", ValueError, "not valid JSON"),
        (tmp_path / "nowhere.json", FileNotFoundError, "neither a config.json nor a folder"),
    ]:
        with pytest.raises(error_type, match=expected):
            load_sam2_config(path)


# ---------------------------------------------------------------------------------------------------------------
# Files: conversion, export, video memory
# ---------------------------------------------------------------------------------------------------------------


def test_convert_and_export_files(tiny_state, tiny_file, config_file, tmp_path):
    out_dir = tmp_path / "converted"
    with pytest.warns(UserWarning, match=r"2 video-memory tensors \(maskmem_tpos_enc, memory_encoder\) are not conv"):
        model = convert_sam2_checkpoint(tiny_file, out_dir, config=config_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["converted", tiny_file.name, config_file.name])
    _assert_same(Sam2Model.from_pretrained(out_dir).state_dict(), model.state_dict())

    image_only = export_sam2_checkpoint(model, tmp_path / "image_only.pt")
    payload = torch.load(image_only, weights_only=True)
    assert list(payload) == ["model"]
    _assert_same(payload["model"], _image_part(tiny_state))
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        export_sam2_checkpoint(model, image_only)

    complete = export_sam2_checkpoint(model, tmp_path / "complete.pt", memory_from=tiny_file)
    _assert_same(torch.load(complete, weights_only=True)["model"], tiny_state)
    with pytest.raises(ValueError, match="holds no video-memory tensors") as error:
        export_sam2_checkpoint(model, tmp_path / "x.pt", memory_from=image_only)
    _one_line_error(error)
    wider_mlp = _tiny_config()
    wider_mlp.mask_decoder_config.mlp_dim = 64
    memory = {k: v for k, v in tiny_state.items() if k not in _image_part(tiny_state)}
    torch.save({"model": {**_official_state(wider_mlp), **memory}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other shapes than the model"):
        export_sam2_checkpoint(model, tmp_path / "x.pt", memory_from=tmp_path / "other.pt")
    assert not (tmp_path / "x.pt").exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert_sam2_checkpoint(complete, occupied, config=config_file)
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    with pytest.warns(UserWarning, match="video-memory"):
        convert_sam2_checkpoint(complete, occupied, config=config_file, overwrite=True)
    assert "model.safetensors" in {p.name for p in occupied.iterdir()}


def test_unetr_decoder_rides_beside_the_weights(tiny_state, config_file, tmp_path):
    """A decoder on the model (`unetr_decoder`, as hf_sam_peft.modeling.unetr attaches it) is written as
    `decoder_state` beside `model`, which is all sam2 reads; conversion ignores it with a warning."""
    model = sam2_model_from_state_dict(tiny_state, config=_tiny_config())
    model.unetr_decoder = torch.nn.Conv2d(32, 2, 1)
    payload = torch.load(export_sam2_checkpoint(model, tmp_path / "with_unetr.pt"), weights_only=True)
    assert sorted(payload) == ["decoder_state", "model"]
    _assert_same(payload["decoder_state"], model.unetr_decoder.state_dict())
    _assert_same(payload["model"], _image_part(tiny_state))
    with pytest.warns(UserWarning, match="UNETR decoder \\('decoder_state'\\); it is not converted"):
        convert_sam2_checkpoint(tmp_path / "with_unetr.pt", tmp_path / "converted", config=config_file)


def test_export_merges_peft_adapters(tiny_state, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = sam2_model_from_state_dict(tiny_state, config=_tiny_config())
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    path = export_sam2_checkpoint(peft_model, tmp_path / "merged.pt")
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())  # the caller's model keeps it
    merged = copy.deepcopy(peft_model).merge_and_unload()
    exported = torch.load(path, weights_only=True)["model"]
    _assert_same(exported, to_sam2_state_dict(merged.state_dict()))
    qkv = "image_encoder.trunk.blocks.0.attn.qkv.weight"
    assert not torch.equal(exported[qkv], tiny_state[qkv])  # the adapter changed it, and it was kept
    assert torch.equal(exported["sam_mask_decoder.iou_token.weight"], tiny_state["sam_mask_decoder.iou_token.weight"])


def test_export_refuses_foreign_models(tiny_sam, tmp_path):
    with pytest.raises(ValueError, match="exactly one Sam2Model"):
        export_sam2_checkpoint(tiny_sam, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="must be a Sam2Model"):
        export_sam2_checkpoint("a model", tmp_path / "x.pt")
    torch.manual_seed(0)
    fresh = Sam2Model(_tiny_config())  # transformers draws its two positional bases apart
    with pytest.raises(ValueError, match="SAM 2 has one positional basis"):
        export_sam2_checkpoint(fresh, tmp_path / "x.pt")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_convert_and_export(tiny_state, tiny_file, config_file, tmp_path, capsys):
    out_dir = tmp_path / "model"
    code, out, err = _cli(capsys, "convert", tiny_file, out_dir, "--config", config_file)
    assert code == 0 and "Sam2Model: Hiera [16, 32, 64, 128], 5 blocks, 256px images" in out
    notes = [line for line in err.splitlines() if line.startswith("note: ")]  # besides transformers' progress bar
    assert len(notes) == 1 and "video-memory tensors" in notes[0] and "--memory-from" in notes[0]
    code, _, err = _cli(capsys, "convert", tiny_file, out_dir, "--config", config_file)  # occupied
    assert code == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    assert _cli(capsys, "convert", tiny_file, out_dir, "--config", config_file, "--overwrite")[0] == 0
    code, _, err = _cli(capsys, "convert", tiny_file, tmp_path / "other")  # no official size: the remedy
    assert code == 2 and "--config" in err and not (tmp_path / "other").exists()

    exported = tmp_path / "back.pt"
    code, out, err = _cli(capsys, "export", out_dir, exported)
    assert code == 0 and "error" not in err and "official SAM 2 checkpoint" in out
    _assert_same(torch.load(exported, weights_only=True)["model"], _image_part(tiny_state))
    code, _, err = _cli(capsys, "export", out_dir, exported, "--memory-from", tiny_file)
    assert code == 2 and "exists" in err
    code, out, _ = _cli(capsys, "export", out_dir, exported, "--memory-from", tiny_file, "--overwrite")
    assert code == 0 and "video memory from the original" in out
    _assert_same(torch.load(exported, weights_only=True)["model"], tiny_state)
    code, _, err = _cli(capsys, "export", "tiny", tmp_path / "sam.pth", "--memory-from", tiny_file)
    assert code == 2 and "--memory-from is for SAM 2 models" in err


def test_cli_help_and_model_types(capsys):
    from hf_sam_peft.commands import convert as command

    parser = argparse.ArgumentParser(prog="hf-sam-peft")
    command.register(parser.add_subparsers(dest="command", required=True))
    texts = {}
    for name in ("convert", "export"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        texts[name] = capsys.readouterr().out
        assert "SAM 2" in texts[name] and "--memory-from" in texts[name]
    assert "weights_only" in texts["convert"] and "sam2.1_hiera_*.pt" in texts["convert"]
    assert "build_sam2" in texts["export"]
    args = parser.parse_args(["convert", "a.pt", "out", "--model-type", "sam2.1_hiera_large"])
    assert args.model_type == "sam2.1_hiera_large" and args.decoder_heads is None
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "a.pt", "out", "--model-type", "sam2_hiera_huge"])


# ---------------------------------------------------------------------------------------------------------------
# The reference implementation (sam2 1.1.0): numerical equality, strict loading, official key tables
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam2_package():
    if importlib.util.find_spec("sam2") is None:
        pytest.skip(f"sam2 (SAM 2's reference implementation) is not installed: {SAM2_INSTALL}")
    import sam2

    return sam2


def _reference_model(config: Sam2Config) -> torch.nn.Module:
    """sam2's SAM2Base with `config`'s image encoder, tiny video-memory modules, and the flags of the official
    SAM 2.1 configs (high-resolution skips, object scores, sigmoid IoU, no-memory token added to the features)."""
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.transformer import RoPEAttention
    from sam2.modeling.sam2_base import SAM2Base

    vision, hiera, decoder = config.vision_config, config.vision_config.backbone_config, config.mask_decoder_config
    width, memory_width, grid = vision.fpn_hidden_size, vision.fpn_hidden_size // 2, IMAGE_SIZE // 16
    trunk = Hiera(
        embed_dim=hiera.hidden_size,
        num_heads=hiera.num_attention_heads,
        stages=tuple(hiera.blocks_per_stage),
        global_att_blocks=tuple(hiera.global_attention_blocks),
        window_pos_embed_bkg_spatial_size=tuple(hiera.window_positional_embedding_background_size),
        window_spec=tuple(hiera.window_size_per_stage),
    )
    neck = FpnNeck(
        PositionEmbeddingSine(width), d_model=width, backbone_channel_list=list(vision.backbone_channel_list),
        fpn_top_down_levels=list(vision.fpn_top_down_levels), fpn_interp_model="nearest",
    )

    def rope(**kwargs):
        return RoPEAttention(
            embedding_dim=width, num_heads=1, downsample_rate=1, dropout=0.0, feat_sizes=(grid, grid), **kwargs
        )

    layer = MemoryAttentionLayer(
        activation="relu", cross_attention=rope(rope_k_repeat=True, kv_in_dim=memory_width), d_model=width,
        dim_feedforward=2 * width, dropout=0.0, pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False, self_attention=rope(),
    )
    memory_encoder = MemoryEncoder(
        out_dim=memory_width,
        mask_downsampler=MaskDownSampler(embed_dim=width, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(dim=width), num_layers=1),
        position_encoding=PositionEmbeddingSine(memory_width),
        in_dim=width,
    )
    return SAM2Base(
        ImageEncoder(trunk, neck, scalp=1),
        MemoryAttention(d_model=width, pos_enc_at_input=True, layer=layer, num_layers=1),
        memory_encoder,
        image_size=IMAGE_SIZE,
        directly_add_no_mem_embed=True,
        use_high_res_features_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=True,
        proj_tpos_enc_in_obj_ptrs=True,
        use_signed_tpos_enc_to_obj_ptrs=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        use_multimask_token_for_obj_ptr=True,
        use_mlp_for_obj_ptr_proj=True,
        no_obj_embed_spatial=True,
        sam_mask_decoder_extra_args=dict(  # what build_sam2 sets for image prediction, as transformers does
            dynamic_multimask_via_stability=decoder.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=decoder.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=decoder.dynamic_multimask_stability_thresh,
        ),
    ).eval()


@pytest.fixture(scope="module")
def reference(sam2_package):
    torch.manual_seed(0)
    model = _reference_model(_tiny_config())
    _perturb(model)
    return model


@pytest.fixture(scope="module")
def reference_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2") / "tiny_sam2.pt"
    torch.save({"model": reference.state_dict()}, path)  # the official layout
    return path


@pytest.fixture(scope="module")
def converted_pair(reference, reference_file, tmp_path_factory):
    """(converted model, reference embeddings, converted embeddings) of one random image; three maps each:
    stride 4 and 8 (through conv_s0 / conv_s1) and stride 16 (plus the no-memory token)."""
    out_dir = tmp_path_factory.mktemp("converted") / "tiny_sam2"
    with pytest.warns(UserWarning, match="video-memory tensors"):
        model = convert_sam2_checkpoint(reference_file, out_dir, config=_tiny_config())
    torch.manual_seed(1)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():  # what SAM2ImagePredictor.set_image computes
        _, features, _, _ = reference._prepare_backbone_features(reference.forward_image(image))
        features[-1] = features[-1] + reference.no_mem_embed
        sizes = [IMAGE_SIZE // stride for stride in (4, 8, 16)]
        expected = [f.permute(1, 2, 0).view(1, -1, size, size) for f, size in zip(features, sizes)]
        embeddings = Sam2Model.from_pretrained(out_dir).eval().get_image_embeddings(image)
    return model, expected, embeddings


def test_image_embeddings_match_reference(converted_pair):
    _, expected, embeddings = converted_pair
    assert len(embeddings) == len(expected) == 3
    for level, (ours, theirs) in enumerate(zip(embeddings, expected)):
        assert theirs.std() > 0.1, level  # a random model that does not output constants
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "multimask, stability", [(False, True), (False, False), (True, True)], ids=["single", "single_token0", "multi"]
)
@pytest.mark.parametrize("prompt", ["points", "box", "points+box"])
def test_masks_match_reference(reference, converted_pair, prompt, multimask, stability):
    """Masks, IoU and object scores as SAM2ImagePredictor._predict computes them (a box enters sam2's prompt
    encoder as two points labelled 2 and 3). `stability`: the official configs' single-mask output falls back
    to the best multimask output when mask token 0's is unstable (as it is in this random model); without it
    the single mask is token 0's."""
    model, expected_embeddings, embeddings = converted_pair
    points, labels = torch.tensor([[[60.0, 70.0], [100.0, 30.0]]]), torch.tensor([[1, 0]], dtype=torch.int32)
    box = torch.tensor([[20.0, 30.0, 150.0, 200.0]])
    use_points, use_box = "points" in prompt, "box" in prompt
    coords, coord_labels = [], []
    if use_box:
        coords.append(box.reshape(1, 2, 2))
        coord_labels.append(torch.tensor([[2, 3]], dtype=torch.int32))
    if use_points:
        coords.append(points)
        coord_labels.append(labels)
    with mock.patch.object(reference.sam_mask_decoder, "dynamic_multimask_via_stability", stability), \
            mock.patch.object(model.mask_decoder, "dynamic_multimask_via_stability", stability), torch.no_grad():
        sparse, dense = reference.sam_prompt_encoder(
            points=(torch.cat(coords, 1), torch.cat(coord_labels, 1)), boxes=None, masks=None
        )
        expected_masks, expected_iou, _, expected_score = reference.sam_mask_decoder(
            image_embeddings=expected_embeddings[-1],
            image_pe=reference.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=expected_embeddings[:-1],
        )
        out = model(
            image_embeddings=embeddings,
            input_points=points[:, None] if use_points else None,
            input_labels=labels[:, None] if use_points else None,
            input_boxes=box[None] if use_box else None,
            multimask_output=multimask,
        )
    assert expected_masks.std() > 200 * TOL  # not a constant: TOL would hide no mistake
    assert out.pred_masks.shape[2] == (3 if multimask else 1)
    torch.testing.assert_close(out.pred_masks[:, 0], expected_masks, atol=TOL, rtol=0)
    torch.testing.assert_close(out.iou_scores[:, 0], expected_iou, atol=TOL, rtol=0)
    torch.testing.assert_close(out.object_score_logits[:, 0], expected_score, atol=TOL, rtol=0)


def test_export_loads_into_sam2(reference, reference_file, converted_pair, tmp_path):
    model = converted_pair[0]
    original = reference.state_dict()
    fresh = _reference_model(_tiny_config())
    complete = export_sam2_checkpoint(model, tmp_path / "complete.pt", memory_from=reference_file)
    fresh.load_state_dict(torch.load(complete, weights_only=True)["model"], strict=True)  # what build_sam2 does
    _assert_same(fresh.state_dict(), original)

    image_only = export_sam2_checkpoint(model, tmp_path / "image_only.pt")
    result = fresh.load_state_dict(torch.load(image_only, weights_only=True)["model"], strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and not _image_part(dict.fromkeys(result.missing_keys))  # the video memory only


@pytest.mark.parametrize("name", sorted(_OFFICIAL_CONFIGS))
def test_official_key_tables_match_sam2(sam2_package, name):
    """sam2's SAM2Base of every packaged config (meta device) has exactly the image-model keys and shapes our
    export writes for that size, and the shapes name the size."""
    from hydra import compose
    from hydra.utils import instantiate

    linspace = torch.linspace

    def linspace_on_cpu(*args, **kwargs):  # Hiera reads its drop-path rates with .item()
        return linspace(*args, **{**kwargs, "device": "cpu"})

    with mock.patch("torch.linspace", linspace_on_cpu), torch.device("meta"):
        official = instantiate(compose(config_name=_OFFICIAL_CONFIGS[name]).model, _recursive_=True).state_dict()
        ours = to_sam2_state_dict(Sam2Model(sam2_config(name.replace("sam2.1_", "sam2_"))).state_dict())
    image = _image_part(official)
    assert {k: tuple(v.shape) for k, v in image.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert detect_sam2_model_type(official) == name.replace("sam2.1_", "sam2_")
    assert len(official) > len(image)  # the video memory, which conversion drops
