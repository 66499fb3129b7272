"""Loading an adapter back: `from_pretrained(adapter_id)` from a local folder or a Hub repo (online or cached).

The base model is the one the adapter names (or `base_model=`), checked against the size it was trained on;
the UNETR decoder in `unetr/` is attached and the recorded `point_multimask` set on the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from ..loading import load_adapter
from ..methods import freeze_positional_basis
from ..modeling.unetr import ATTRIBUTE_NAME as UNETR_ATTRIBUTE
from ..modeling.unetr import CONFIG_NAME as UNETR_CONFIG_NAME
from ..modeling.unetr import load_unetr
from .provenance import (
    ADAPTER_CONFIG_NAME,
    REPO_FILES,
    UNETR_SUBFOLDER,
    _is_quantized,
    _size_signature,
    read_json_file,
    read_provenance,
    recorded_point_multimask,
)

# keyword arguments `from_pretrained` passes on to huggingface_hub / transformers
HUB_KWARGS = frozenset({"revision", "cache_dir", "token", "local_files_only", "force_download"})


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
    from ..modeling.base_models import load_base_model

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
    from ..evaluation.predictor import set_point_multimask
    from ..modeling.base_models import load_base_model

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
        raise FileNotFoundError(f"{name!r} holds neither a peft adapter ({ADAPTER_CONFIG_NAME}) nor a SAM model")

    if not is_adapter:  # full fine-tuning: the whole model
        if base_model is not None:
            raise ValueError(f"{name!r} is a complete SAM model, not an adapter; drop base_model")
        model = load_base_model(folder)[0]  # SamModel, LiteSamModel or Sam2Model, as its config says
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
        from ..tuners import quantize_image_encoder

        quantize_image_encoder(model, quant_type=quant_type)
    return load_adapter(model, str(folder), is_trainable=is_trainable)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
