"""An adapter folder's files and its provenance (`hf_sam_peft.json`): what trained, on which base, how.

`describe_model` reads the provenance off a (peft-wrapped) SAM; `read_provenance` /
`recorded_point_multimask` read it back from a folder or Hub repo. The model card
(:mod:`hf_sam_peft.hub.card`) is rendered from this record alone.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from peft import PeftConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from torch import nn

from .. import __version__
from ..methods import METHODS, count_parameters
from ..modeling.unetr import ATTRIBUTE_NAME as UNETR_ATTRIBUTE
from ..modeling.unetr import UNETRDecoder
from ..sam_forward.forward import unwrap_sam

PROVENANCE_NAME = "hf_sam_peft.json"
POINT_MULTIMASK_KEY = "point_multimask"  # provenance key: how point prompts were trained (bool, or null)
RESIZE_INPUTS_KEY = "resize_inputs"  # key in the provenance's `extra`: trained on whole resized images (bool)
CARD_NAME = "README.md"
UNETR_SUBFOLDER = "unetr"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# What an adapter repo holds; also the files `push_folder_to_hub` uploads (never optimizer states etc.).
REPO_FILES: tuple[str, ...] = (
    ADAPTER_CONFIG_NAME,
    "adapter_model.safetensors",
    "config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    PROVENANCE_NAME,
    CARD_NAME,
    f"{UNETR_SUBFOLDER}/*",
)
# peft config fields that are bookkeeping, not hyper-parameters
_NOT_HYPERPARAMETERS = frozenset(
    {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
     "peft_version", "modules_to_save"}
)
# the parts of a SAM config an adapter depends on: a base that differs in one of them cannot take the adapter
_SIZE_FIELDS = {
    "vision_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim", "image_size",
                      "patch_size", "output_channels"),
    # SAM 2's Hiera sizes live one level down (a dotted part name is a nested sub-config)
    "vision_config.backbone_config": ("hidden_size", "blocks_per_stage", "embed_dim_per_stage", "image_size"),
    "mask_decoder_config": ("hidden_size", "num_hidden_layers"),
}


def _version() -> str:
    return __version__


def _jsonable(value: Any, name: str) -> Any:
    """`value` as plain JSON types (numpy / torch scalars, sets, enums, paths converted); TypeError otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _jsonable(value.value, name)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    # duck-typed rather than isinstance(np.generic): catches numpy scalars and 0-d arrays alike
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return value.item()  # numpy scalar
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, name) for k, v in value.items()}
    # peft stores target_modules as a set: sorted, so the same config always writes the same JSON
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v, name) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, name) for v in value]
    raise TypeError(f"{name} must hold JSON-like values (numbers, strings, lists, dicts), got {type(value).__name__}")


def _repo_files(folder: Path) -> list[str]:
    """Relative paths (posix) of the files in `folder` that belong in an adapter repo, sorted."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        # fnmatchcase: case-sensitive on every OS (fnmatch folds case on Windows); its * also crosses "/", so
        # "unetr/*" takes the whole subfolder
        if path.is_file() and any(fnmatch.fnmatchcase(rel, pattern) for pattern in REPO_FILES):
            out.append(rel)
    return out


def _active_adapter(model: PeftModel) -> str:
    name = model.active_adapter
    # peft gives a list where several adapters are active at once; the first is the one saved and described
    return name if isinstance(name, str) else name[0]


def _unetr_of(model: nn.Module) -> UNETRDecoder | None:
    """The model's active UNETR decoder (inside peft's `modules_to_save` wrapper if it is there)."""
    decoder = getattr(unwrap_sam(model), UNETR_ATTRIBUTE, None)
    if decoder is None or isinstance(decoder, UNETRDecoder):
        return decoder
    copies = getattr(decoder, "modules_to_save", None)  # peft's ModulesToSaveWrapper
    active = getattr(decoder, "active_adapter", None)
    active = active[0] if isinstance(active, (list, tuple)) else active
    if copies is not None and active in copies:
        return copies[active]
    original = getattr(decoder, "original_module", None)
    if isinstance(original, UNETRDecoder):
        return original
    raise TypeError(f"model.{UNETR_ATTRIBUTE} must be a UNETRDecoder, got {type(decoder).__name__}")


def _is_quantized(sam: nn.Module) -> str | None:
    """The 4-bit quant type of the image encoder's Linears (bitsandbytes), or None."""
    # by class name: bitsandbytes is optional and not imported just to ask
    for module in sam.vision_encoder.modules():
        if type(module).__name__ == "Linear4bit":
            # "fp4" is bitsandbytes' own default for Params4bit / Linear4bit when the weight records none
            return getattr(module.weight, "quant_type", None) or "fp4"
    return None


def _method_of(model: nn.Module, config: PeftConfig | None) -> str:
    """The paper method a model was built with, from its peft config (and 4-bit encoder for QLoRA)."""
    if config is None:
        return "full_ft"
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if peft_type == "lora":
        # the paper's q/v LoRA registers its layer with LoraConfig._register_custom_module (register_qv_lora)
        if not getattr(config, "_custom_modules", None):
            return "peft_lora"  # peft's own LoRA, not the paper's q/v-only form
        return "qlora" if _is_quantized(unwrap_sam(model)) else "lora"
    return peft_type


def _hyperparameters(method: str, config: PeftConfig | None, model: nn.Module) -> dict[str, Any]:
    """The method's paper hyper-parameters plus every other config field that differs from its default."""
    if config is None:
        return {}
    values = _jsonable(config.to_dict(), "peft config")
    # a default-constructed config is the reference for "differs"; some cannot be built bare (peft 0.21's
    # AdaLoraConfig() raises without total_step): then every field counts as set
    try:
        defaults = _jsonable(type(config)().to_dict(), "peft config")
    except (TypeError, ValueError):
        defaults = {}
    paper = METHODS[method].defaults if method in METHODS else {}
    keep = {
        k: v for k, v in values.items()
        if k not in _NOT_HYPERPARAMETERS and (k in paper or k not in defaults or defaults[k] != v)
    }
    quant_type = _is_quantized(unwrap_sam(model))
    if quant_type is not None:
        keep["quant_type"] = quant_type
    return dict(sorted(keep.items()))


def _size_signature(sam: nn.Module) -> dict[str, dict[str, Any]]:
    """The config fields of a SAM that decide whether an adapter fits it (empty for non-SAM configs)."""
    config = getattr(sam, "config", None)
    out = {}
    for part, names in _SIZE_FIELDS.items():
        sub = config
        for attribute in part.split("."):
            sub = getattr(sub, attribute, None)
        if sub is not None:
            out[part] = {n: _jsonable(getattr(sub, n), n) for n in names if hasattr(sub, n)}
    return out


def _trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); for an adapter loaded for inference (everything frozen) the trainable count is
    that of the parameters the adapter saves, i.e. what trained."""
    trainable, total = count_parameters(model)
    if trainable or not isinstance(model, PeftModel):
        return trainable, total

    # the saved tensors are the parameters themselves (no copies): matched by storage address, and popped so a
    # tensor saved under two keys counts once; a saved buffer matches no parameter and counts 0
    sizes = {p.data_ptr(): p.numel() for p in model.parameters()}
    state = get_peft_model_state_dict(model, adapter_name=_active_adapter(model))
    return sum(sizes.pop(t.data_ptr(), 0) for t in state.values()), total


def describe_model(
    model: nn.Module, *, method: str | None = None, base_model_id: str | None = None
) -> dict[str, Any]:
    """Provenance of a (peft-wrapped) SAM: method, hyper-parameters, base model and size, parameter counts."""
    sam = unwrap_sam(model)
    config = model.peft_config[_active_adapter(model)] if isinstance(model, PeftModel) else None
    if method is not None and (not isinstance(method, str) or not method):
        raise TypeError(f"method must be a non-empty string, got {method!r}")
    method = method or _method_of(model, config)
    if base_model_id is None:
        base_model_id = (config.base_model_name_or_path if config is not None else None) or None
        # `or None`: peft and transformers record "" for a model built from a config, which names nothing
        base_model_id = base_model_id or getattr(sam.config, "_name_or_path", None) or None
    if base_model_id is not None and not isinstance(base_model_id, str):
        raise TypeError(f"base_model_id must be a string (Hub id, folder or model name), got {base_model_id!r}")
    trainable, total = _trainable_parameters(model)
    decoder = _unetr_of(model)
    return {
        "hf_sam_peft_version": _version(),
        "method": method,
        "method_title": METHODS[method].title if method in METHODS else method,
        "peft_type": None if config is None else _jsonable(config.peft_type, "peft_type"),
        "hyperparameters": _hyperparameters(method, config, model),
        "modules_to_save": None if config is None else _jsonable(config.modules_to_save, "modules_to_save"),
        "base_model": base_model_id,
        "base_model_type": getattr(sam.config, "model_type", None),  # "sam", "sam2", LiteMedSAM's
        "base_model_size": _size_signature(sam),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "unetr": None if decoder is None else decoder.config.to_dict(),
    }


def read_json_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line ValueError naming the file and where it is malformed."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """The `hf_sam_peft.json` of an adapter folder ({} for an adapter saved by peft alone)."""
    path = Path(folder) / PROVENANCE_NAME
    return read_json_file(path) if path.is_file() else {}


def _check_point_multimask(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"point_multimask must be True, False or None, got {value!r}")
    return value


def adapter_provenance(adapter: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """The provenance of an adapter given as a folder, a Hub repo id or the provenance dict itself; {} if none.

    For a Hub id the provenance file is read from the Hub (or its cache offline); an adapter without one
    (saved by peft alone, or not reachable) records nothing.
    """
    if isinstance(adapter, Mapping):
        return adapter
    if os.path.isdir(adapter):
        return read_provenance(adapter)
    try:
        path = hf_hub_download(os.fspath(adapter), PROVENANCE_NAME)
    except (OSError, ValueError):  # no such file / repo, offline without a cache, not a repo id
        return {}
    return read_json_file(path)


def recorded_point_multimask(adapter: str | os.PathLike | Mapping[str, Any]) -> bool | None:
    """The `point_multimask` an adapter records (folder, Hub repo id or its provenance dict); None if none."""
    return _check_point_multimask(adapter_provenance(adapter).get(POINT_MULTIMASK_KEY))


def recorded_resize_inputs(adapter: str | os.PathLike | Mapping[str, Any]) -> bool | None:
    """Whether the adapter was trained on whole images resized to the model input (``resize_inputs``, recorded by
    ``train`` in the provenance's ``extra``); None where it records nothing (older adapters, plain peft)."""
    value = adapter_provenance(adapter).get("extra", {}).get(RESIZE_INPUTS_KEY)
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{RESIZE_INPUTS_KEY} in the adapter's {PROVENANCE_NAME} must be true or false, got {value!r}")
    return value
