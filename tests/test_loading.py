"""`hf_sam_peft.load_adapter` on damaged adapters: a one-line error naming the file, never a traceback from peft
or safetensors, never a silent partial load. The table of these inputs is tests/BAD_INPUTS.md."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SamModel

import hf_sam_peft
from hf_sam_peft.modeling.sam import tiny_sam_config

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def tiny_base() -> SamModel:
    torch.manual_seed(0)
    return SamModel(tiny_sam_config())


@pytest.fixture(scope="module", params=["lora", "fact"])
def saved(request, tmp_path_factory):
    """A trained-looking adapter folder (non-zero weights) of the method."""
    model = hf_sam_peft.apply_method(tiny_base(), request.param, r=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    folder = tmp_path_factory.mktemp(request.param) / "adapter"
    model.save_pretrained(folder)
    return folder


def variant(saved, tmp_path, change):
    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    change(folder)
    return folder


def one_line_error(folder, exc=ValueError) -> str:
    with pytest.raises(exc) as info:
        hf_sam_peft.load_adapter(tiny_base(), str(folder))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "weights_only" not in message
    return message


def edit_config(folder, **changes):
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_weights(folder, change):
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def test_the_intact_adapter_loads(saved):
    model = hf_sam_peft.load_adapter(tiny_base(), str(saved))
    assert model.peft_config["default"].r == 2


def test_unknown_peft_type(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: edit_config(f, peft_type="NOT_A_TUNER"))
    message = one_line_error(folder)
    assert str(folder / CONFIG) in message and "unknown peft_type 'NOT_A_TUNER'" in message


def test_malformed_adapter_config(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: (f / CONFIG).write_text('{"peft_type": "LORA", "r": '))
    message = one_line_error(folder)
    assert str(folder / CONFIG) in message and "malformed JSON (line 1, column" in message


def test_adapter_config_of_the_wrong_shape(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: (f / CONFIG).write_text("[1, 2]"))
    assert str(folder / CONFIG) in one_line_error(folder)


def test_missing_adapter_config(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: (f / CONFIG).unlink())
    assert f"no {CONFIG} in adapter folder" in one_line_error(folder, FileNotFoundError)


def test_missing_weights(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: (f / WEIGHTS).unlink())
    assert f"no {WEIGHTS} in adapter folder" in one_line_error(folder, FileNotFoundError)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_weights(saved, tmp_path, keep):
    def truncate(folder):
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: max(1, int(len(data) * keep))])

    folder = variant(saved, tmp_path, truncate)
    message = one_line_error(folder)
    assert str(folder / WEIGHTS) in message and "damaged or truncated" in message


def test_weights_without_tensors(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: save_file({}, str(f / WEIGHTS)))
    assert "hold no tensors (no adapter keys)" in one_line_error(folder)


def test_weights_without_adapter_keys(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: save_file({"encoder.weight": torch.zeros(2)}, str(f / WEIGHTS)))
    message = one_line_error(folder)
    assert str(folder / WEIGHTS) in message and "no adapter keys" in message


def test_missing_adapter_tensors_are_an_error_not_a_warning(saved, tmp_path):
    def drop_one(tensors):
        name = next(k for k in sorted(tensors) if "vision_encoder" in k)
        del tensors[name]

    folder = variant(saved, tmp_path, lambda f: edit_weights(f, drop_one))
    message = one_line_error(folder)
    assert str(folder / WEIGHTS) in message and "miss 1 of the adapter's" in message


def test_missing_modules_to_save_tensor(saved, tmp_path):
    def drop_decoder(tensors):
        for name in [k for k in tensors if "mask_decoder" in k][:1]:
            del tensors[name]

    folder = variant(saved, tmp_path, lambda f: edit_weights(f, drop_decoder))
    assert str(folder / WEIGHTS) in one_line_error(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(saved, tmp_path, value):
    def poison(tensors):
        name = next(k for k in sorted(tensors) if "vision_encoder" in k)
        tensors[name].view(-1)[0] = value

    folder = variant(saved, tmp_path, lambda f: edit_weights(f, poison))
    message = one_line_error(folder)
    assert str(folder / WEIGHTS) in message and "non-finite" in message


@pytest.mark.parametrize(
    "method, option, value, message",
    [
        ("lora", "lora_dropout", -0.1, "method 'lora': lora_dropout must be a number in [0, 1), got -0.1"),
        ("qlora", "lora_dropout", -0.1, "method 'qlora': lora_dropout must be a number in [0, 1), got -0.1"),
        ("fact", "dropout", -0.1, "method 'fact': dropout must be a number in [0, 1), got -0.1"),
        ("adaptformer", "dropout", -1.0, "method 'adaptformer': dropout must be a number in [0, 1), got -1.0"),
        ("fact", "dropout", "abc", "method 'fact': dropout must be a number in [0, 1), got 'abc'"),
        ("lora", "r", 0, "method 'lora': r must be a positive int, got 0"),
    ],
)
def test_bad_method_options(method, option, value, message):
    with pytest.raises(ValueError) as info:
        hf_sam_peft.method_config(method, **{option: value})
    assert message in str(info.value)
    base = tiny_base()
    with pytest.raises(ValueError):
        hf_sam_peft.apply_method(base, method, **{option: value})
    assert not any("lora" in n or "fact" in n for n, _ in base.named_modules())  # untouched


@pytest.mark.parametrize("config, field", [("AdaptFormerConfig", "dropout"), ("FactConfig", "dropout")])
def test_tuner_configs_reject_negative_dropout(config, field):
    cls = getattr(hf_sam_peft, config)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got -0.2"):
        cls(**{field: -0.2})


# --------------------------------------------------------------------- adding an adapter to a PeftModel


def _adapter(tmp_path, method: str, seed: int):
    model = hf_sam_peft.apply_method(tiny_base(), method, **({"r": 2} if method == "lora" else {}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    folder = tmp_path / f"{method}_{seed}"
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def _masks(model) -> torch.Tensor:
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 256, 256)
    return model(pixel_values=pixels, input_boxes=torch.tensor([[[40.0, 40.0, 160.0, 180.0]]])).pred_masks


def test_an_adapter_is_added_to_a_peft_model_as_if_loaded_alone(tmp_path):
    """load_adapter into a PeftModel: the new adapter gives what it gives loaded alone, q/v LoRA registered
    as for the first; the active adapter stays the active one."""
    first, second = _adapter(tmp_path, "lora", 1), _adapter(tmp_path, "lora", 2)
    alone = _masks(hf_sam_peft.load_adapter(tiny_base(), str(second)).eval())
    model = hf_sam_peft.load_adapter(tiny_base(), str(first)).eval()
    before = _masks(model)
    assert hf_sam_peft.load_adapter(model, str(second), adapter_name="second") is model
    assert model.active_adapter == "default" and torch.equal(_masks(model), before)
    model.set_adapter("second")
    assert torch.equal(_masks(model.eval()), alone) and not torch.equal(alone, before)


def test_adding_an_adapter_of_another_type_or_name_is_refused(tmp_path):
    model = hf_sam_peft.load_adapter(tiny_base(), str(_adapter(tmp_path, "lora", 1)))
    with pytest.raises(ValueError, match="is a SSF adapter but the model holds LORA adapters; peft keeps one"):
        hf_sam_peft.load_adapter(model, str(_adapter(tmp_path, "ssf", 2)), adapter_name="ssf")
    with pytest.raises(ValueError, match="adapter_name 'default' is already loaded"):
        hf_sam_peft.load_adapter(model, str(_adapter(tmp_path, "lora", 3)))
    assert list(model.peft_config) == ["default"]


def test_a_damaged_added_adapter_leaves_the_model_as_it_was(tmp_path):
    def drop_one(tensors):
        del tensors[next(k for k in sorted(tensors) if "vision_encoder" in k)]

    model = hf_sam_peft.load_adapter(tiny_base(), str(_adapter(tmp_path, "lora", 1))).eval()
    before = _masks(model)
    damaged = _adapter(tmp_path, "lora", 2)
    edit_weights(damaged, drop_one)
    with pytest.raises(ValueError, match="miss 1 of the adapter's"):
        hf_sam_peft.load_adapter(model, str(damaged), adapter_name="damaged")
    assert list(model.peft_config) == ["default"] and torch.equal(_masks(model), before)


def test_every_loader_names_a_truncated_weights_file(saved, tmp_path):
    """The one loader reads the weights' header for a UNETR copy before peft loads: still a one-line error."""
    from hf_sam_peft.evaluation.predictor import load_model
    from hf_sam_peft.hub import from_pretrained

    def truncate(folder):
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 2])

    folder = variant(saved, tmp_path, truncate)
    for load in (lambda: load_model("tiny", str(folder)), lambda: from_pretrained(folder, base_model=tiny_base())):
        with pytest.raises(ValueError) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and str(folder / WEIGHTS) in message and "damaged or truncated" in message
