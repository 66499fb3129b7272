"""Conversion against the reference implementation (segment_anything), export round trips and refused inputs.

Numerical equality is checked on a tiny SAM (all code paths, multimask included); ViT-B is checked for the
complete key/shape mapping and for loading back into `sam_model_registry` (its 1024² forward takes ~20 s on
2 CPU cores, twice: too slow for the suite, and the tiny model runs the same code).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
import warnings
from functools import partial

import pytest
import torch

from hf_sam_peft.modeling.convert import (
    convert_checkpoint,
    convert_sam_state_dict,
    detect_model_type,
    export_to_segment_anything,
    load_sam_checkpoint,
    sam_config_from_state_dict,
    sam_model_from_state_dict,
    to_segment_anything_state_dict,
)
from hf_sam_peft.modeling.sam import VIT_SIZES, sam_config

TOL = 1e-4
TINY_DECODER_HEADS = 2

# What segment_anything's package import takes from torchvision (its predictor helpers; the model classes use none).
_TORCHVISION_STANDINS = {
    "torchvision": (),
    "torchvision.transforms": (),
    "torchvision.transforms.functional": ("resize", "to_pil_image"),
    "torchvision.ops": (),
    "torchvision.ops.boxes": ("batched_nms", "box_area"),
}


def _unavailable(*args, **kwargs):
    raise RuntimeError("torchvision stand-in: not available in these tests")


@pytest.fixture(scope="module")
def sa():
    """The segment_anything package, imported beside stand-ins for torchvision that are removed again (DESIGN §8)."""
    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything (the reference implementation) is not installed: pip install segment-anything")
    import transformers  # noqa: F401  (first, so that it never sees the stand-ins)

    added = []
    for name, attributes in _TORCHVISION_STANDINS.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            for attribute in attributes:
                setattr(module, attribute, _unavailable)
            sys.modules[name] = module
            added.append(name)
    try:
        import segment_anything
        import segment_anything.modeling  # noqa: F401
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return segment_anything


def _perturb(model: torch.nn.Module) -> None:
    """Make every tensor distinct: segment_anything starts norms at 1/0 and position tables at 0, where swapped
    or dropped keys would go unnoticed."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.05)


@pytest.fixture(scope="module")
def tiny_reference(sa):
    """A small original SAM: 64 wide, 2 blocks (block 1 global), 2 heads, 256² images, window 4, 32 channels."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=256,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        out_chans=32,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=[1],
    )
    prompt_encoder = PromptEncoder(
        embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=8
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=TINY_DECODER_HEADS),
        transformer_dim=32,
        iou_head_depth=3,
        iou_head_hidden_dim=24,
    )
    model = Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder).eval()
    _perturb(model)
    return model


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(tiny_reference.state_dict(), path)
    return path


def _reference_masks(reference, embeddings, points=None, boxes=None, multimask=False):
    sparse, dense = reference.prompt_encoder(points=points, boxes=boxes, masks=None)
    return reference.mask_decoder(
        image_embeddings=embeddings,
        image_pe=reference.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


# ---------------------------------------------------------------------------------------------------------------
# Numerical equality (tiny)
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_config_read_from_shapes(tiny_reference):
    config = sam_config_from_state_dict(tiny_reference.state_dict(), decoder_num_heads=TINY_DECODER_HEADS)
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (64, 2, 2)
    assert (vision.image_size, vision.patch_size, vision.window_size, vision.mlp_dim) == (256, 16, 4, 128)
    assert list(vision.global_attn_indexes) == [1]
    assert (vision.output_channels, vision.num_pos_feats) == (32, 16)
    assert config.prompt_encoder_config.mask_input_channels == 8
    assert config.mask_decoder_config.iou_head_hidden_dim == 24
    assert config.mask_decoder_config.num_attention_heads == TINY_DECODER_HEADS
    assert detect_model_type(tiny_reference.state_dict()) == "custom"


@pytest.fixture(scope="module")
def tiny_pair(tiny_reference):
    """(converted model, reference image embeddings, converted image embeddings) for one random image."""
    model = sam_model_from_state_dict(tiny_reference.state_dict(), decoder_num_heads=TINY_DECODER_HEADS)
    torch.manual_seed(1)
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        return model, tiny_reference.image_encoder(image), model.get_image_embeddings(image)


def test_tiny_image_embeddings_match_reference(tiny_pair):
    _, expected, embeddings = tiny_pair
    assert expected.std() > 0.1  # a random model that does not output constants
    torch.testing.assert_close(embeddings, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", ["points", "box", "points+box"])
def test_tiny_masks_match_reference(tiny_reference, tiny_pair, prompt, multimask):
    model, expected_embeddings, embeddings = tiny_pair
    points = torch.tensor([[[60.0, 70.0], [100.0, 30.0]]])
    labels = torch.tensor([[1, 0]])
    box = torch.tensor([[20.0, 30.0, 150.0, 200.0]])
    use_points, use_box = "points" in prompt, "box" in prompt
    with torch.no_grad():
        expected_masks, expected_iou = _reference_masks(
            tiny_reference,
            expected_embeddings,
            points=(points, labels) if use_points else None,
            boxes=box if use_box else None,
            multimask=multimask,
        )
        out = model(
            image_embeddings=embeddings,
            input_points=points[:, None] if use_points else None,
            input_labels=labels[:, None] if use_points else None,
            input_boxes=box[None] if use_box else None,
            multimask_output=multimask,
        )
    assert expected_masks.std() > 1e-3
    assert out.pred_masks.shape[2] == (3 if multimask else 1)
    torch.testing.assert_close(out.pred_masks[:, 0], expected_masks, atol=TOL, rtol=0)
    torch.testing.assert_close(out.iou_scores[:, 0], expected_iou, atol=TOL, rtol=0)


def test_convert_checkpoint_writes_loadable_folder(tiny_reference, tiny_checkpoint, tmp_path):
    from transformers import SamModel, SamProcessor

    out_dir = tmp_path / "converted"
    model = convert_checkpoint(tiny_checkpoint, out_dir, decoder_num_heads=TINY_DECODER_HEADS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # the temporary folder is gone
    assert (out_dir / "model.safetensors").is_file()
    reloaded = SamModel.from_pretrained(out_dir)
    reference_state = model.state_dict()
    assert reloaded.state_dict().keys() == reference_state.keys()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
    processor = SamProcessor.from_pretrained(out_dir)
    assert processor.image_processor.size["longest_edge"] == 256
    # the exported checkpoint is the original, bit for bit
    exported = to_segment_anything_state_dict(reloaded.state_dict())
    original = tiny_reference.state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_convert_checkpoint_refuses_wrong_type_and_occupied_folder(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="shapes of 'custom'"):
        convert_checkpoint(tiny_checkpoint, tmp_path / "a", model_type="vit_b")
    with pytest.raises(ValueError, match="model_type must be one of"):
        convert_checkpoint(tiny_checkpoint, tmp_path / "a", model_type="vit_x")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(tiny_checkpoint, occupied, decoder_num_heads=TINY_DECODER_HEADS)
    assert (occupied / "keep.txt").read_text() == "mine"
    convert_checkpoint(tiny_checkpoint, occupied, decoder_num_heads=TINY_DECODER_HEADS, overwrite=True)
    assert sorted(p.name for p in occupied.iterdir()) == ["config.json", "model.safetensors", "processor_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


# ---------------------------------------------------------------------------------------------------------------
# Real sizes: mapping, detection, loading back into segment_anything
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(VIT_SIZES))
def test_detects_sam_sizes(sa, model_type):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        state = sa.sam_model_registry[model_type]().state_dict()
    assert detect_model_type(state) == model_type
    found, expected = sam_config_from_state_dict(state), sam_config(model_type)
    for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        found_dict, expected_dict = getattr(found, part).to_dict(), getattr(expected, part).to_dict()
        for key in ("initializer_range", "mlp_dim", "global_attn_indexes"):
            found_dict.pop(key, None), expected_dict.pop(key, None)
        assert found_dict == expected_dict, part
    assert list(found.vision_config.global_attn_indexes) == VIT_SIZES[model_type]["global_attn_indexes"]


def test_vit_b_matches_and_round_trips_through_segment_anything(sa, tmp_path):
    torch.manual_seed(0)
    reference = sa.sam_model_registry["vit_b"]()
    _perturb(reference)
    original = reference.state_dict()
    model = sam_model_from_state_dict(original)
    assert sum(p.numel() for p in model.parameters()) == 93_735_728  # DESIGN §8, the tied basis counted once
    basis = model.shared_image_embedding.positional_embedding
    assert model.prompt_encoder.shared_embedding.positional_embedding is basis

    # the converted ViT-B computes what the original computes (one 1024² image, a box and a point prompt)
    model.eval()
    reference.eval()
    torch.manual_seed(2)
    image = torch.randn(1, 3, 1024, 1024)
    box = torch.tensor([[200.0, 300.0, 600.0, 700.0]])
    points, labels = torch.tensor([[[400.0, 500.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        expected = reference.image_encoder(image)
        embeddings = model.get_image_embeddings(image)
        expected_masks, expected_iou = _reference_masks(reference, expected, points=(points, labels), boxes=box)
        out = model(image_embeddings=embeddings, input_points=points[:, None], input_labels=labels[:, None],
                    input_boxes=box[None], multimask_output=False)
    assert expected.std() > 0.1
    torch.testing.assert_close(embeddings, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(out.pred_masks[:, 0], expected_masks, atol=TOL, rtol=0)
    torch.testing.assert_close(out.iou_scores[:, 0], expected_iou, atol=TOL, rtol=0)

    path = export_to_segment_anything(model, tmp_path / "sam_vit_b.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["sam_vit_b.pth"]
    loaded = sa.sam_model_registry["vit_b"](checkpoint=str(path))  # strict load by the reference itself
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key


# ---------------------------------------------------------------------------------------------------------------
# peft models
# ---------------------------------------------------------------------------------------------------------------


def test_export_merges_peft_adapters(sa, tiny_reference, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = sam_model_from_state_dict(tiny_reference.state_dict(), decoder_num_heads=TINY_DECODER_HEADS)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = peft_model.base_model.model.vision_encoder(image).last_hidden_state
    path = export_to_segment_anything(peft_model, tmp_path / "merged.pth")
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())  # the caller's model keeps its adapter

    from copy import deepcopy

    merged_reference = deepcopy(tiny_reference)
    merged_reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        exported = merged_reference.image_encoder(image)
        unadapted = tiny_reference.image_encoder(image)
    torch.testing.assert_close(exported, expected, atol=TOL, rtol=0)
    assert (exported - unadapted).abs().max() > 10 * TOL  # the adapter changed something, and it was kept


def test_export_refuses_unmergeable_and_foreign_models(tmp_path):
    class Unmergeable(torch.nn.Module):
        def merge_and_unload(self):
            raise NotImplementedError("this method has no merge")

    with pytest.raises(ValueError, match="cannot be merged"):
        export_to_segment_anything(Unmergeable(), tmp_path / "x.pth")
    with pytest.raises(ValueError, match="exactly one SamModel"):
        export_to_segment_anything(torch.nn.Linear(2, 2), tmp_path / "x.pth")
    with pytest.raises(TypeError, match="model must be"):
        export_to_segment_anything("not a model", tmp_path / "x.pth")
    assert not any(tmp_path.iterdir())


def test_export_refuses_unknown_weights(tiny_sam):
    state = dict(tiny_sam.state_dict())
    state["vision_encoder.layers.0.attn.qkv.lora_A.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="lora_A"):
        to_segment_anything_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Wrapped formats and refused files
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["sam.", "module.sam."])
def test_unwraps_micro_sam_format(tiny_reference, tmp_path, prefix):
    original = tiny_reference.state_dict()
    wrapped = {
        "model_state": {prefix + k: v for k, v in original.items()},
        "decoder_state": {"base.conv.weight": torch.zeros(1)},
    }
    path = tmp_path / "micro_sam.pt"
    torch.save(wrapped, path)
    with pytest.warns(UserWarning, match="decoder_state"):
        loaded = load_sam_checkpoint(path)
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_accepts_persisted_pixel_statistics(tiny_reference):
    state = dict(tiny_reference.state_dict())
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    state["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_sam_state_dict(state)
    assert not any("pixel" in k for k in converted)
    state["pixel_mean"] = torch.zeros(3, 1, 1)
    with pytest.warns(UserWarning, match="image_mean"):
        convert_sam_state_dict(state)


class _RunsCode:
    """Unpickling this would run a shell command: the loader must refuse before that."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_refuses_pickle_that_runs_code(tiny_reference, tmp_path):
    sentinel = tmp_path / "code_was_executed"
    path = tmp_path / "evil.pth"
    torch.save({"model_state": tiny_reference.state_dict(), "config": _RunsCode(sentinel)}, path)
    with pytest.raises(ValueError, match="refusing to execute code"):
        load_sam_checkpoint(path)
    assert not sentinel.exists()


def test_refuses_truncated_file(tiny_checkpoint, tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_sam_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_sam_checkpoint(path)


def test_refuses_other_architectures(tmp_path):
    resnet_like = {
        "conv1.weight": torch.randn(64, 3, 7, 7),
        "bn1.weight": torch.randn(64),
        "layer1.0.conv1.weight": torch.randn(64, 64, 3, 3),
        "fc.weight": torch.randn(1000, 512),
    }
    path = tmp_path / "resnet.pth"
    torch.save(resnet_like, path)
    with pytest.raises(ValueError, match="not an original SAM.*conv1.weight"):
        load_sam_checkpoint(path)
    torch.save(torch.randn(3), path)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_sam_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_sam_checkpoint(tmp_path / "missing.pth")


def test_refuses_sam_with_extra_weights(tiny_reference):
    state = dict(tiny_reference.state_dict())
    state["mask_decoder.hf_token.weight"] = torch.zeros(1, 32)  # e.g. HQ-SAM
    with pytest.raises(ValueError, match="hf_token"):
        convert_sam_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from hf_sam_peft.commands import convert as command

    parser = argparse.ArgumentParser(prog="hf-sam-peft")
    command.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_convert_and_export(tiny_reference, tiny_checkpoint, tmp_path, capsys):
    parser = _parser()
    out_dir = tmp_path / "model"
    args = parser.parse_args(["convert", str(tiny_checkpoint), str(out_dir), "--decoder-heads", "2"])
    assert args.func(args) == 0
    assert "2 blocks" in capsys.readouterr().out
    exported = tmp_path / "back.pth"
    args = parser.parse_args(["export", str(out_dir), str(exported)])
    assert args.func(args) == 0
    state, original = torch.load(exported, weights_only=True), tiny_reference.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    with pytest.raises(ValueError, match="exists"):
        args.func(args)
    args = parser.parse_args(["export", str(out_dir), str(exported), "--overwrite"])
    assert args.func(args) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", str(tiny_checkpoint), str(out_dir), "--model-type", "vit_x"])


def test_cli_help_explains_safety(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "weights_only" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# One module per format, a dispatcher above them
# ---------------------------------------------------------------------------------------------------------------

# every public name `hf_sam_peft.modeling.convert` offered before the split, and the module that now holds it
_MOVED = {
    "convert_sam_state_dict": "convert_sam", "detect_model_type": "convert_sam",
    "export_to_segment_anything": "convert_sam", "load_sam_checkpoint": "convert_sam",
    "sam_config_from_state_dict": "convert_sam", "sam_model_from_state_dict": "convert_sam",
    "to_segment_anything_state_dict": "convert_sam", "sam_processor": "convert_sam",
    "PIXEL_MEAN": "convert_sam", "PIXEL_STD": "convert_sam",
    "export_to_lite_medsam": "convert_litemedsam", "to_lite_medsam_state_dict": "convert_litemedsam",
    "build_with_weights": "convert_common", "compile_key_rules": "convert_common",
    "convert_checkpoint": "convert", "export_checkpoint": "convert", "EXPORT_LAYOUTS": "convert",
}


def test_the_dispatcher_keeps_every_old_name_without_a_warning():
    """`from hf_sam_peft.modeling.convert import X` still gives the one X (no copy, no DeprecationWarning)."""
    import importlib

    import subprocess

    code = (
        "import warnings; warnings.filterwarnings('error', category=DeprecationWarning, module='hf_sam_peft'); "
        "from hf_sam_peft.modeling.convert import *; from hf_sam_peft.modeling.convert import build_with_weights"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # a fresh interpreter
    convert = importlib.import_module("hf_sam_peft.modeling.convert")
    assert set(convert.__all__) <= set(_MOVED)
    for name, module in _MOVED.items():
        home = importlib.import_module(f"hf_sam_peft.modeling.{module}")
        assert getattr(convert, name) is getattr(home, name), name


def test_the_converters_share_the_unetr_attribute_name():
    """convert_common spells the decoder's attribute out (it does not import the decoder module): the same name."""
    from hf_sam_peft.modeling.convert_common import UNETR_ATTRIBUTE
    from hf_sam_peft.modeling.unetr import ATTRIBUTE_NAME

    assert UNETR_ATTRIBUTE == ATTRIBUTE_NAME


def test_the_sam_converter_refuses_a_lite_medsam_model(tmp_path):
    from hf_sam_peft.modeling.lite_medsam import LiteSamModel, tiny_lite_sam_config

    with pytest.raises(ValueError, match="LiteMedSAM .*export_to_lite_medsam"):
        export_to_segment_anything(LiteSamModel(tiny_lite_sam_config()), tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
