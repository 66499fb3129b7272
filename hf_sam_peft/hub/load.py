"""Loading an adapter back: `from_pretrained(adapter_id)` from a local folder or a Hub repo (online or cached),
and `load_adapter_folder`, the one loader that puts an adapter folder onto a base SAM.

`load_adapter_folder` is what every caller uses: `from_pretrained`, `hf_sam_peft.evaluation.load_model` and
the app's `ModelBank`. It checks the base against the size the adapter was trained on, attaches the UNETR
decoder, re-makes QLoRA's 4-bit image encoder, then loads through `hf_sam_peft.load_adapter` (q/v LoRA,
one-line errors for damaged files) and sets the recorded `point_multimask` on the model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from torch import nn

from ..atomic import recover_folder
from ..loading import load_adapter, read_adapter_config, set_point_multimask, unetr_config_from_weights
from ..methods import freeze_positional_basis
from ..modeling.unetr import ATTRIBUTE_NAME as UNETR_ATTRIBUTE
from ..modeling.unetr import CONFIG_NAME as UNETR_CONFIG_NAME
from ..modeling.unetr import attach_unetr, load_unetr
from ..sam_forward.forward import unwrap_sam
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
    """A local folder, or the Hub repo's snapshot (downloaded, or from the cache when offline).

    A local folder that a kill left half-replaced (only in its hidden ``.old`` copy) is put back first
    (:func:`hf_sam_peft.atomic.recover_folder`).
    """
    # before the isdir test: killed mid-replacement, the folder exists only as its backup; for a Hub id ("org/name",
    # no local "org/") this does nothing
    recover_folder(adapter_id)
    if os.path.isdir(adapter_id):
        return Path(adapter_id)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        # only an adapter repo's own files: whatever else a repo holds (optimizer states, logs) is not fetched
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
    # only the fields the adapter recorded are compared (an older record with fewer still checks those); a field
    # the base lacks reads as None and so differs
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


def recorded_quant_type(provenance: Mapping[str, Any]) -> str | None:
    """The 4-bit quant type a QLoRA adapter's image encoder trained with (`hf_sam_peft.json`), else None."""
    if provenance.get("method") != "qlora":
        return None
    return (provenance.get("hyperparameters") or {}).get("quant_type")


def adapter_unetr_settings(folder: str | os.PathLike, config: PeftConfig) -> dict[str, Any] | None:
    """UNETR settings when the adapter saves `unetr_decoder` in its `modules_to_save` (read from the weights'
    shapes: `hf_sam_peft.loading.unetr_config_from_weights`), else None."""
    if UNETR_ATTRIBUTE not in (getattr(config, "modules_to_save", None) or []):
        return None
    from ..loading import adapter_weights_file

    return unetr_config_from_weights(adapter_weights_file(os.fspath(folder)))


def check_adapter_folder(folder: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """`folder` as a Path, after checking it holds a peft adapter (`source`: how messages name it)."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        name = os.fspath(source if source is not None else folder)
        if (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"adapter {name!r} is a complete SAM model (config.json), not a peft adapter ({ADAPTER_CONFIG_NAME}); "
                "load it as the base model"
            )
        raise FileNotFoundError(f"adapter {name!r} has no {ADAPTER_CONFIG_NAME} (expected a peft adapter)")
    return folder


def load_adapter_folder(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    config: PeftConfig | None = None,
    own_model: bool = True,
    source: str | os.PathLike | None = None,
) -> PeftModel:
    """Load the adapter in the local `folder` onto `model` (a base SAM, modified in place, or a PeftModel to add
    it to under `adapter_name`): the one adapter loader.

    Before peft loads, the base is made what the adapter trained on: its size is checked against
    `hf_sam_peft.json`; when the adapter's weights hold a UNETR decoder (`modules_to_save`), a decoder goes on
    the base for peft to fill (the folder's `unetr/` copy, else an empty one shaped from those weights: peft
    silently skips an entry the base lacks); and for QLoRA the image encoder is quantized to the recorded
    4-bit type (a full-precision base gives other outputs). Then `hf_sam_peft.load_adapter`, and the recorded
    `point_multimask` is set. An adapter whose `modules_to_save` name the decoder but whose weights hold none
    (peft's default list) loads without that entry.

    `own_model=False` is for several adapters switched on one model (the app's `ModelBank`): the `unetr/`
    decoder and the recorded `point_multimask` belong to one adapter, so they are left off the model for the
    caller to keep per adapter. `config`: the adapter's `PeftConfig` when already read. `source`: how
    messages name the adapter (e.g. the Hub id it came from; default the folder).
    """
    folder = check_adapter_folder(folder, source)
    name = os.fspath(source if source is not None else folder)
    provenance = read_provenance(folder)
    if config is None:
        config = read_adapter_config(str(folder))
    # the SamModel itself, also when `model` is a PeftModel that already holds other adapters
    sam = unwrap_sam(model)
    _check_size(name, provenance, sam)
    settings = adapter_unetr_settings(folder, config)  # not None: the adapter's weights hold a decoder copy
    listed = list(getattr(config, "modules_to_save", None) or [])
    if settings is None and UNETR_ATTRIBUTE in listed:
        # the default modules_to_save name the decoder even when the trained model had none to save; peft would
        # wrap a decoder it finds on the base and look for the copy this adapter does not hold
        config = copy.copy(config)
        config.modules_to_save = [module for module in listed if module != UNETR_ATTRIBUTE]
    # the unetr/ copy first (it is the complete one, config included); else an empty decoder shaped from the
    # adapter's weights, for peft to fill; a decoder already on the base is left for peft to wrap
    if own_model and (folder / UNETR_SUBFOLDER / UNETR_CONFIG_NAME).is_file():
        setattr(sam, UNETR_ATTRIBUTE, load_unetr(folder / UNETR_SUBFOLDER, device=_device_of(sam)))
    elif settings is not None and not hasattr(sam, UNETR_ATTRIBUTE):
        attach_unetr(sam, **settings)  # peft fills it from the adapter's copy
    quant_type = recorded_quant_type(provenance)
    if quant_type is not None and _is_quantized(sam) is None:
        # the adapters already on this encoder were trained on full precision: quantizing under them would change
        # their outputs
        if isinstance(model, PeftModel):
            raise ValueError(
                f"adapter {name!r} is QLoRA (trained on a {quant_type} image encoder) but the model's encoder is "
                "full precision and already holds adapters; load it onto a base of its own"
            )
        from ..tuners import quantize_image_encoder

        quantize_image_encoder(model, quant_type=quant_type)
    loaded = load_adapter(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, config=config)
    if own_model:
        set_point_multimask(loaded, recorded_point_multimask(provenance))
    return loaded


def from_pretrained(
    adapter_id: str | os.PathLike,
    base_model: nn.Module | str | None = None,
    *,
    is_trainable: bool = False,
    **hub_kwargs: Any,
) -> nn.Module:
    """Load an adapter (local folder or Hub repo id) onto its base SAM: `hf_sam_peft.from_pretrained("org/name")`.

    `base_model`: a SamModel (modified in place) or its id/folder/name; default the one the adapter names
    (`hf_sam_peft.json`, else `adapter_config.json`'s `base_model_name_or_path`). The adapter goes on through
    `load_adapter_folder` (UNETR decoder as `unetr_decoder`, QLoRA's 4-bit encoder). Offline
    (`HF_HUB_OFFLINE=1`) everything comes from the Hub cache; online, the same call downloads what is missing.
    `hub_kwargs`: revision (of the adapter), cache_dir, token, local_files_only, force_download. Returns a
    PeftModel (a SamModel for `full_ft`), with the adapter's recorded `point_multimask` set on it
    (`hf_sam_peft.evaluation.predictor.point_multimask_of`).
    """
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
        # the decoder is not in model.safetensors (save_adapter writes it to unetr/ only)
        if (folder / UNETR_SUBFOLDER / UNETR_CONFIG_NAME).is_file():
            setattr(model, UNETR_ATTRIBUTE, load_unetr(folder / UNETR_SUBFOLDER, device=_device_of(model)))
        set_point_multimask(model, recorded_point_multimask(provenance))
        model.requires_grad_(is_trainable)
        # requires_grad_ above unfroze everything; SAM's random Fourier basis stays fixed, as it trained
        if is_trainable:
            freeze_positional_basis(model)
        return model.train(is_trainable)
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        saved = read_json_file(folder / ADAPTER_CONFIG_NAME)
        # save_adapter writes the same id into both files; an adapter saved by peft alone has only adapter_config's
        base_id = os.fspath(base_model) if base_model is not None else (
            provenance.get("base_model") or saved.get("base_model_name_or_path")
        )
        if not base_id:
            raise ValueError(f"adapter {name!r} names no base model; pass base_model=")
        model = _load_base(base_id, hub_kwargs)
    else:
        model = base_model
    return load_adapter_folder(model, folder, is_trainable=is_trainable, source=name)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
