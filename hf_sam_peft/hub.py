"""Saving adapters with their model card and provenance, pushing them to the Hub, and loading them back.

An adapter folder (local, or a Hub repo) written by `save_adapter` holds:

- `adapter_config.json` + `adapter_model.safetensors`: peft's own files (the image-encoder adapter and the
  trained prompt encoder / mask decoder copies). For `full_ft` there is no adapter: `config.json` +
  `model.safetensors` of the whole SamModel instead.
- `unetr/unetr_config.json` + `unetr/unetr.safetensors` when the model carries a UNETR decoder
  (`model.unetr_decoder`). It is always written here, the one copy AIS tools can read without peft
  (`hf_sam_peft.modeling.unetr.load_unetr`). When training listed `unetr_decoder` in the peft config's
  `modules_to_save` (the cleanest way to train it next to an adapter), the adapter file holds the same
  weights as well; `from_pretrained` attaches the `unetr/` copy before peft loads, so both routes agree.
- `hf_sam_peft.json`: provenance (method, hyper-parameters, base model id and size, trainable parameter
  count, library version, training data, metrics, and `point_multimask`: whether point prompts were trained
  through SAM's multimask output (true), its single-mask output (false, e.g. LiteMedSAM, trained on boxes
  only) or not recorded (null)) — everything the model card is rendered from, so a pushed card can be
  re-rendered for another repo id without the model.
- `README.md`: the model card, from `model_cards/adapter_card.md` (a `string.Template`).

`from_pretrained(adapter_id)` is the one-line way back: it resolves a local folder or a Hub repo id through
huggingface_hub (online, or offline from the Hub cache with `HF_HUB_OFFLINE=1`: the same call), loads the
base model the adapter names, checks it has the size the adapter was trained on, and loads the adapter with
`hf_sam_peft.load_adapter`. It also sets the recorded `point_multimask` on the model, so
`hf_sam_peft.evaluation.SamPredictor(model)` answers a click through the output the adapter was trained for.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import os
import shutil
import string
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from torch import nn

from .atomic import atomic_folder, atomic_write_text
from .loading import load_adapter
from .methods import METHODS, count_parameters, freeze_positional_basis
from .modeling.unetr import ATTRIBUTE_NAME as UNETR_ATTRIBUTE
from .modeling.unetr import CONFIG_NAME as UNETR_CONFIG_NAME
from .modeling.unetr import UNETRDecoder, load_unetr, save_unetr
from .training.interactive import unwrap_sam

PROVENANCE_NAME = "hf_sam_peft.json"
POINT_MULTIMASK_KEY = "point_multimask"  # provenance key: how point prompts were trained (bool, or null)
CARD_NAME = "README.md"
UNETR_SUBFOLDER = "unetr"
ADAPTER_CONFIG_NAME = "adapter_config.json"
CARD_TEMPLATE = "adapter_card.md"
DEFAULT_LICENSE = "apache-2.0"  # SAM's own licence; pass license= when the training data asks for another
DEFAULT_COMMIT_MESSAGE = "Upload hf-sam-peft adapter"
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
# keyword arguments `from_pretrained` passes on to huggingface_hub / transformers
HUB_KWARGS = frozenset({"revision", "cache_dir", "token", "local_files_only", "force_download"})
# peft config fields that are bookkeeping, not hyper-parameters
_NOT_HYPERPARAMETERS = frozenset(
    {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
     "peft_version", "modules_to_save"}
)
# the parts of a SAM config an adapter depends on: a base that differs in one of them cannot take the adapter
_SIZE_FIELDS = {
    "vision_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim", "image_size",
                      "patch_size", "output_channels"),
    "mask_decoder_config": ("hidden_size", "num_hidden_layers"),
}


# --------------------------------------------------------------------------------------------- helpers


def _version() -> str:
    from . import __version__

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
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return value.item()  # numpy scalar
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, name) for k, v in value.items()}
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
        if path.is_file() and any(fnmatch.fnmatchcase(rel, pattern) for pattern in REPO_FILES):
            out.append(rel)
    return out


# ------------------------------------------------------------------------------------------ provenance


def _active_adapter(model: PeftModel) -> str:
    name = model.active_adapter
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
    for module in sam.vision_encoder.modules():
        if type(module).__name__ == "Linear4bit":
            return getattr(module.weight, "quant_type", None) or "fp4"
    return None


def _method_of(model: nn.Module, config: PeftConfig | None) -> str:
    """The paper method a model was built with, from its peft config (and 4-bit encoder for QLoRA)."""
    if config is None:
        return "full_ft"
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if peft_type == "lora":
        if not getattr(config, "_custom_modules", None):
            return "peft_lora"  # peft's own LoRA, not the paper's q/v-only form
        return "qlora" if _is_quantized(unwrap_sam(model)) else "lora"
    return peft_type


def _hyperparameters(method: str, config: PeftConfig | None, model: nn.Module) -> dict[str, Any]:
    """The method's paper hyper-parameters plus every other config field that differs from its default."""
    if config is None:
        return {}
    values = _jsonable(config.to_dict(), "peft config")
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
        sub = getattr(config, part, None)
        if sub is not None:
            out[part] = {n: _jsonable(getattr(sub, n), n) for n in names if hasattr(sub, n)}
    return out


def _trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); for an adapter loaded for inference (everything frozen) the trainable count is
    that of the parameters the adapter saves, i.e. what trained."""
    trainable, total = count_parameters(model)
    if trainable or not isinstance(model, PeftModel):
        return trainable, total
    from peft.utils import get_peft_model_state_dict

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


def recorded_point_multimask(adapter: str | os.PathLike | Mapping[str, Any]) -> bool | None:
    """The `point_multimask` an adapter records (folder, Hub repo id or its provenance dict); None if none.

    For a Hub id the provenance file is read from the Hub (or its cache offline); an adapter without one
    (saved by peft alone, or not reachable) records nothing.
    """
    if isinstance(adapter, Mapping):
        return _check_point_multimask(adapter.get(POINT_MULTIMASK_KEY))
    if os.path.isdir(adapter):
        return _check_point_multimask(read_provenance(adapter).get(POINT_MULTIMASK_KEY))
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(os.fspath(adapter), PROVENANCE_NAME)
    except (OSError, ValueError):  # no such file / repo, offline without a cache, not a repo id
        return None
    provenance = read_json_file(path)
    return _check_point_multimask(provenance.get(POINT_MULTIMASK_KEY))


# ------------------------------------------------------------------------------------------ model card


def _cell(value: Any, code: bool = False) -> str:
    """A table cell: floats to 4 significant digits, ints with thousands separators; `code` puts strings in
    backticks (regexes and names then show as written, not as markdown)."""
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, str):
        text = f"`{value}`" if code and value else value
    else:
        text = f"`{json.dumps(value)}`"
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, code: Sequence[str] = ()
) -> str:
    """A GitHub markdown table of `rows` (columns: the keys in order of first appearance; string values of
    the `code` columns in backticks)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, ""), c in code) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _metric_rows(metrics: Any) -> list[dict[str, Any]]:
    """Metrics as table rows: a dict of scalars gives `metric | value` rows, a list of dicts its own columns."""
    if isinstance(metrics, Mapping):
        if any(isinstance(v, (Mapping, list, tuple)) for v in metrics.values()):
            raise ValueError("metrics must be a dict of scalars or a list of dicts (one per table row)")
        return [{"metric": k, "value": v} for k, v in metrics.items()]
    if isinstance(metrics, (list, tuple)) and metrics and all(isinstance(r, Mapping) for r in metrics):
        return [dict(r) for r in metrics]
    raise ValueError(f"metrics must be a dict of scalars or a non-empty list of dicts, got {type(metrics).__name__}")


def _training_data_text(data: Any) -> str:
    if data is None:
        return "Not recorded."
    if isinstance(data, str):
        return data
    if isinstance(data, Mapping):
        return "\n".join(f"- **{k}**: {_cell(v)}" for k, v in data.items())
    return "\n".join(f"- {_cell(v)}" for v in data)


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repo id ("org/name") rather than a local path or a model name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.count("/") != 1 or os.path.exists(name) or name.startswith((".", "/")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _alternative_text(method: str, base: str, repo_id: str, has_unetr: bool, quant_type: str | None) -> str:
    """How to load without `hf_sam_peft.from_pretrained` (the import still registers our tuner types)."""
    if method == "full_ft":
        text = (
            "This is a fully fine-tuned SamModel (no adapter); transformers loads it as it is:\n\n"
            f'```python\nfrom transformers import SamModel\n\nmodel = SamModel.from_pretrained("{repo_id}")\n```'
        )
    elif method in ("lora", "qlora"):
        quantize = f'hf_sam_peft.quantize_image_encoder(base, quant_type="{quant_type or "nf4"}")\n'
        text = (
            "peft does not record that this LoRA adapts only the q and v slices of the fused `qkv` projections, "
            "so load it onto the base model with `hf_sam_peft.load_adapter` (peft's `PeftModel.from_pretrained` "
            "underneath):\n\n```python\nimport hf_sam_peft\nfrom transformers import SamModel\n\n"
            f'base = SamModel.from_pretrained("{base}")\n{quantize if method == "qlora" else ""}'
            f'model = hf_sam_peft.load_adapter(base, "{repo_id}")\n```'
        )
    else:
        text = (
            "With peft directly: import `hf_sam_peft` first, which registers its tuner types with peft "
            "(without it peft does not know this adapter's type):\n\n```python\nimport hf_sam_peft  # noqa: F401\n"
            "from peft import PeftModel\nfrom transformers import SamModel\n\n"
            f'model = PeftModel.from_pretrained(SamModel.from_pretrained("{base}"), "{repo_id}")\n```'
        )
    if has_unetr:
        text += (
            "\n\nThe UNETR decoder for automatic instance segmentation is in `unetr/`: "
            "`hf_sam_peft.modeling.unetr.load_unetr(folder)` reads it without peft; attach it as "
            "`base.unetr_decoder` before loading the adapter by hand."
        )
    return text


def _template_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards" / CARD_TEMPLATE, here.parent / "model_cards" / CARD_TEMPLATE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model card template {CARD_TEMPLATE} not found next to the hf_sam_peft package")


def render_card(provenance: Mapping[str, Any], repo_id: str, template: str | os.PathLike | None = None) -> str:
    """The README.md model card of an adapter, from its provenance (`hf_sam_peft.json`) and repo id."""
    from huggingface_hub import ModelCardData

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}")
    for key in ("method", "trainable_parameters"):
        if key not in provenance:
            raise ValueError(f"provenance lacks {key!r}; write it with hf_sam_peft.hub.save_adapter")
    method = provenance["method"]
    title = provenance.get("method_title") or method
    base = provenance.get("base_model")
    front = ModelCardData(
        library_name="transformers" if method == "full_ft" else "peft",
        base_model=base if _is_hub_id(base) else None,  # the Hub only accepts repo ids here
        license=provenance.get("license") or DEFAULT_LICENSE,
        pipeline_tag="mask-generation",
        tags=["segment-anything", "hf-sam-peft", method],
    ).to_yaml()

    hyper = provenance.get("hyperparameters") or {}
    paper = METHODS[method] if method in METHODS else None
    method_text = f"**{title}**" + (f" ({paper.kind} fine-tuning of the image encoder)" if paper else "")
    method_text += "; the prompt encoder and mask decoder are trained in full and saved with the adapter."
    point_multimask = provenance.get(POINT_MULTIMASK_KEY)
    if point_multimask is False:
        method_text += (
            " Point prompts were trained through SAM's **single-mask output** (`point_multimask: false` in "
            "`hf_sam_peft.json`): answer a click with `multimask_output=False`, not with SAM's three masks "
            "(hf-sam-peft's predictor, app and `evaluate` do this for you)."
        )
    elif point_multimask is True:
        method_text += (
            " Point prompts were trained through SAM's multimask output, as SAM's own (`point_multimask: true`)."
        )
    if provenance.get("unetr"):
        method_text += (f" A UNETR decoder for automatic instance segmentation ({provenance['unetr'].get('upsampling')}"
                        " upsampling) was trained with it.")
    table = markdown_table([{"hyper-parameter": k, "value": v} for k, v in hyper.items()], code=["value"]) if hyper else (
        "No hyper-parameters: " + ("every weight trains." if method == "full_ft" else "the method has none.")
    )
    if provenance.get("extra"):
        table += "\n\nOther settings:\n\n" + markdown_table(
            [{"setting": k, "value": v} for k, v in provenance["extra"].items()], code=["value"]
        )

    trainable, total = provenance["trainable_parameters"], provenance.get("total_parameters")
    trainable_text = f"**{trainable:,}** trainable parameters"
    if total:
        trainable_text += f" of {total:,} in the model ({100.0 * trainable / total:.2f}%)"
    trainable_text += "."
    size = (provenance.get("base_model_size") or {}).get("vision_config")
    if size:
        trainable_text += " Image encoder: " + ", ".join(f"{k} {v}" for k, v in size.items()) + "."

    metrics = provenance.get("metrics")
    evaluation = "" if not metrics else "\n## Evaluation\n\n" + markdown_table(_metric_rows(metrics)) + "\n"
    base_text = f"[`{base}`](https://huggingface.co/{base})" if _is_hub_id(base) else (
        f"`{base}`" if base else "Not recorded: pass `base_model=` when loading."
    )
    files = provenance.get("files") or []
    values = {
        "front_matter": front,
        "title": f"{title} adapter for Segment Anything" if method != "full_ft" else "Fine-tuned Segment Anything",
        "summary": f"Segment Anything (transformers `SamModel`) fine-tuned with hf-sam-peft's `{method}` method.",
        "base_model_text": base_text,
        "method_text": method_text,
        "hyperparameter_table": table,
        "trainable_text": trainable_text,
        "training_data_text": _training_data_text(provenance.get("training_data")),
        "evaluation_section": evaluation,
        "repo_id": repo_id,
        "alternative_text": _alternative_text(
            method, base or "<base SAM model>", repo_id, bool(provenance.get("unetr")), hyper.get("quant_type")
        ),
        "file_list": "\n".join(f"- `{f}`" for f in files) if files else "- see the repository",
        "version": provenance.get("hf_sam_peft_version", _version()),
    }
    text = Path(template).read_text(encoding="utf-8") if template is not None else _template_path().read_text("utf-8")
    return string.Template(text).substitute(values)


# ------------------------------------------------------------------------------------------------ save


def _save_weights(model: nn.Module, folder: Path, base_model_id: str | None) -> None:
    """peft's adapter files (or the whole SamModel for full fine-tuning), without the UNETR decoder copy
    of a plain SamModel (that goes to `unetr/`)."""
    if not isinstance(model, PeftModel):
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{UNETR_ATTRIBUTE}.")}
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        return
    adapter = _active_adapter(model)
    config = model.peft_config[adapter]
    previous = config.base_model_name_or_path
    config.base_model_name_or_path = base_model_id or previous
    try:
        model.save_pretrained(
            folder, selected_adapters=[adapter], safe_serialization=True, save_embedding_layers=False
        )  # SAM has no token embeddings; "auto" would look the base up on the Hub
    finally:
        config.base_model_name_or_path = previous
    if adapter != "default":  # peft puts non-default adapters in a subfolder; an adapter repo has them at the top
        for path in (folder / adapter).iterdir():
            os.replace(path, folder / path.name)
        (folder / adapter).rmdir()


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_model_id: str | None = None,
    method: str | None = None,
    training_data: Any = None,
    metrics: Any = None,
    extra: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    overwrite: bool = False,
    point_multimask: bool | None = None,
) -> Path:
    """Write `model`'s adapter, UNETR decoder, `hf_sam_peft.json` and model card into `out_dir` (atomically).

    `base_model_id`: Hub id, folder or model name of the base (default: what the peft config or SamModel
    recorded; also written into `adapter_config.json`). `method`: default inferred from the peft config.
    `training_data`: text, list or dict for the card. `metrics`: a dict of scalars or a list of row dicts
    (evaluation table). `extra`: other settings (learning rate, steps, ...). `repo_id`: the id the card's
    loading snippet uses (default: `out_dir`). `point_multimask`: whether point prompts were trained through
    SAM's multimask output (`InteractiveTrainingArguments.point_multimask`); stored as `"point_multimask"`
    in `hf_sam_peft.json` and read back by every loader, so predictors answer a click through the output
    that was trained. Default: what the model carries from loading (`from_pretrained`), else not recorded
    (null: SAM's multimask behaviour).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a SamModel or a PeftModel wrapping one, got {type(model).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise TypeError(f"out_dir must be a folder path, got {out_dir!r}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict of settings, got {type(extra).__name__}")
    if not isinstance(license, str) or not license:
        raise ValueError(f"license must be a licence id such as 'apache-2.0', got {license!r}")
    _check_point_multimask(point_multimask)
    if point_multimask is None:
        from .evaluation.predictor import POINT_MULTIMASK_ATTRIBUTE

        point_multimask = getattr(unwrap_sam(model), POINT_MULTIMASK_ATTRIBUTE, None)
    out_dir = Path(out_dir)
    provenance = describe_model(model, method=method, base_model_id=base_model_id)
    if metrics is not None:
        _metric_rows(metrics)  # validate before writing anything
    provenance.update(
        training_data=_jsonable(training_data, "training_data"),
        metrics=_jsonable(metrics, "metrics"),
        extra=_jsonable(dict(extra or {}), "extra"),
        license=license,
    )
    provenance[POINT_MULTIMASK_KEY] = point_multimask
    decoder = _unetr_of(model)
    with atomic_folder(out_dir, overwrite) as tmp:
        _save_weights(model, tmp, provenance["base_model"])
        if decoder is not None:
            save_unetr(decoder, tmp / UNETR_SUBFOLDER)
        provenance["files"] = sorted({*_repo_files(tmp), PROVENANCE_NAME, CARD_NAME})
        atomic_write_text(tmp / PROVENANCE_NAME, json.dumps(provenance, indent=2) + "\n")
        atomic_write_text(tmp / CARD_NAME, render_card(provenance, repo_id or os.fspath(out_dir)))
    return out_dir


# ------------------------------------------------------------------------------------------------ push


def _upload(folder: Path, repo_id: str, private: bool, token: str | None, commit_message: str, api: Any) -> str:
    from huggingface_hub import HfApi

    if not isinstance(commit_message, str) or not commit_message:
        raise ValueError(f"commit_message must be a non-empty string, got {commit_message!r}")
    api = api if api is not None else HfApi(token=token)
    repo_url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", None) or repo_id  # the Hub may complete the namespace
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model",
        allow_patterns=list(REPO_FILES),
    )
    return str(getattr(commit, "commit_url", None) or getattr(repo_url, "url", None) or repo_url)


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a string like 'org/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repo_id must be a Hub repo id like 'org/name', got {repo_id!r}") from exc


def push_adapter_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    api: Any = None,
    **card_kwargs: Any,
) -> str:
    """Save `model` with `save_adapter` (card written for `repo_id`) and upload it; returns the commit URL.

    `card_kwargs` go to `save_adapter` (base_model_id, method, training_data, metrics, extra, license,
    point_multimask).
    `api`: an `huggingface_hub.HfApi` (default: `HfApi(token=token)`).
    """
    _check_repo_id(repo_id)
    if "repo_id" in card_kwargs or "overwrite" in card_kwargs:
        raise TypeError("push_adapter_to_hub sets repo_id and overwrite itself")
    with tempfile.TemporaryDirectory(prefix="hf_sam_peft_push_") as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter", repo_id=repo_id, **card_kwargs)
        return _upload(folder, repo_id, private, token, commit_message, api)


def prepare_upload(
    adapter_dir: str | os.PathLike, repo_id: str, dest: str | os.PathLike, base_model: Any = None
) -> list[str]:
    """Copy an adapter folder's repo files into `dest` with the card re-rendered for `repo_id`; returns them.

    A folder without `hf_sam_peft.json` (saved by peft or a Trainer checkpoint) is loaded onto its base
    (`base_model`, default the one its config names) and saved again, so its card has real counts.
    """
    _check_repo_id(repo_id)
    src, dest = Path(adapter_dir), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"adapter folder {src} does not exist")
    provenance = read_provenance(src)
    if not provenance:
        model = from_pretrained(src, base_model=base_model)
        save_adapter(model, dest, repo_id=repo_id, overwrite=True)
        return _repo_files(dest)
    if base_model is not None:
        raise ValueError(f"{src} already records its base model in {PROVENANCE_NAME}; drop base_model")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in _repo_files(src):
        if rel != CARD_NAME:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    atomic_write_text(dest / CARD_NAME, render_card(provenance, repo_id))
    return _repo_files(dest)


def push_folder_to_hub(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    base_model: Any = None,
    api: Any = None,
) -> str:
    """Upload a saved adapter folder (only its repo files, card re-rendered for `repo_id`); returns the commit URL."""
    with tempfile.TemporaryDirectory(prefix="hf_sam_peft_push_") as tmp:
        prepare_upload(adapter_dir, repo_id, tmp, base_model=base_model)
        return _upload(Path(tmp), repo_id, private, token, commit_message, api)


# ------------------------------------------------------------------------------------------------ load


def resolve_adapter_folder(adapter_id: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    """A local folder, or the Hub repo's snapshot (downloaded, or from the cache when offline)."""
    if os.path.isdir(adapter_id):
        return Path(adapter_id)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(str(adapter_id), allow_patterns=list(REPO_FILES), **hub_kwargs))
    except HFValidationError:
        raise FileNotFoundError(f"adapter {str(adapter_id)!r} is neither a local folder nor a Hub repo id") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"adapter repo {adapter_id!r} not found on the Hub (or no access: pass token=)") from None
    except LocalEntryNotFoundError:
        cache = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
        why = "offline mode (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise FileNotFoundError(
            f"adapter {adapter_id!r} is not a local folder and not in the Hub cache at {cache} ({why})"
        ) from None


def _load_base(base_id: str, hub_kwargs: dict[str, Any]) -> nn.Module:
    """The adapter's base model by name, folder or Hub id (`hf_sam_peft.modeling.load_base_model`)."""
    from .modeling.base_models import load_base_model

    kwargs = {k: v for k, v in hub_kwargs.items() if k != "revision"}  # the revision is the adapter's
    try:
        return load_base_model(base_id, **kwargs)[0]
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"base model {base_id!r} could not be loaded: {str(exc).splitlines()[0]}") from None


def _check_size(adapter_id: str, provenance: Mapping[str, Any], base: nn.Module) -> None:
    saved = provenance.get("base_model_size") or {}
    current = _size_signature(base)
    for part, fields in saved.items():
        diff = {k: (v, current.get(part, {}).get(k)) for k, v in fields.items() if current.get(part, {}).get(k) != v}
        if diff:
            detail = ", ".join(f"{part}.{k} {a} in the adapter but {b} in the base" for k, (a, b) in diff.items())
            raise ValueError(
                f"adapter {adapter_id!r} does not fit this base model (trained on another SAM size: {detail}); "
                f"its base model is {provenance.get('base_model')!r}"
            )


def from_pretrained(
    adapter_id: str | os.PathLike,
    base_model: nn.Module | str | None = None,
    *,
    is_trainable: bool = False,
    **hub_kwargs: Any,
) -> nn.Module:
    """Load an adapter (local folder or Hub repo id) onto its base SAM: `hf_sam_peft.from_pretrained("org/name")`.

    `base_model`: a SamModel (modified in place) or its id/folder/name; default the one the adapter names
    (`hf_sam_peft.json`, else `adapter_config.json`'s `base_model_name_or_path`). The UNETR decoder in
    `unetr/` is attached as `unetr_decoder`. Offline (`HF_HUB_OFFLINE=1`) everything comes from the Hub
    cache; online, the same call downloads what is missing. `hub_kwargs`: revision (of the adapter),
    cache_dir, token, local_files_only, force_download. Returns a PeftModel (a SamModel for `full_ft`), with
    the adapter's recorded `point_multimask` set on it (`hf_sam_peft.evaluation.predictor.point_multimask_of`).
    """
    from .evaluation.predictor import set_point_multimask

    from transformers import SamModel

    if not isinstance(adapter_id, (str, os.PathLike)) or not os.fspath(adapter_id):
        raise TypeError(f"adapter_id must be a Hub repo id or a folder path, got {adapter_id!r}")
    unknown = sorted(set(hub_kwargs) - HUB_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; hub options are {sorted(HUB_KWARGS)}")
    if isinstance(base_model, PeftModel):
        raise TypeError("base_model must be the plain base SamModel, not a PeftModel")
    if base_model is not None and not isinstance(base_model, (nn.Module, str, os.PathLike)):
        raise TypeError(f"base_model must be a SamModel or its id/folder, got {type(base_model).__name__}")
    name = os.fspath(adapter_id)
    folder = resolve_adapter_folder(adapter_id, hub_kwargs)
    provenance = read_provenance(folder)
    is_adapter = (folder / ADAPTER_CONFIG_NAME).is_file()
    if not is_adapter and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{name!r} holds neither a peft adapter ({ADAPTER_CONFIG_NAME}) nor a SamModel")

    if not is_adapter:  # full fine-tuning: the whole model
        if base_model is not None:
            raise ValueError(f"{name!r} is a complete SamModel, not an adapter; drop base_model")
        model = SamModel.from_pretrained(folder)
    else:
        if base_model is None or isinstance(base_model, (str, os.PathLike)):
            saved = read_json_file(folder / ADAPTER_CONFIG_NAME)
            base_id = os.fspath(base_model) if base_model is not None else (
                provenance.get("base_model") or saved.get("base_model_name_or_path")
            )
            if not base_id:
                raise ValueError(f"adapter {name!r} names no base model; pass base_model=")
            model = _load_base(base_id, hub_kwargs)
        else:
            model = base_model
        _check_size(name, provenance, model)
    if (folder / UNETR_SUBFOLDER / UNETR_CONFIG_NAME).is_file():
        setattr(model, UNETR_ATTRIBUTE, load_unetr(folder / UNETR_SUBFOLDER, device=_device_of(model)))
    set_point_multimask(model, recorded_point_multimask(provenance))
    if not is_adapter:
        model.requires_grad_(is_trainable)
        if is_trainable:
            freeze_positional_basis(model)
        return model.train(is_trainable)
    quant_type = (provenance.get("hyperparameters") or {}).get("quant_type")
    if quant_type is not None and provenance.get("method") == "qlora" and _is_quantized(model) is None:
        from .tuners import quantize_image_encoder

        quantize_image_encoder(model, quant_type=quant_type)
    return load_adapter(model, str(folder), is_trainable=is_trainable)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


__all__ = [
    "POINT_MULTIMASK_KEY", "PROVENANCE_NAME", "REPO_FILES", "describe_model", "from_pretrained", "markdown_table",
    "prepare_upload", "push_adapter_to_hub", "push_folder_to_hub", "read_provenance", "recorded_point_multimask",
    "render_card", "save_adapter",
]
