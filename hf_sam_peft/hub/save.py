"""`save_adapter`: an adapter folder (weights, UNETR decoder, provenance, model card), written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn

from ..atomic import atomic_folder, atomic_write_text
from ..loading import POINT_MULTIMASK_ATTRIBUTE
from ..modeling.unetr import ATTRIBUTE_NAME as UNETR_ATTRIBUTE
from ..modeling.unetr import save_unetr
from ..sam_forward.forward import unwrap_sam
from .card import DEFAULT_LICENSE, _metric_rows, render_card
from .provenance import (
    CARD_NAME,
    POINT_MULTIMASK_KEY,
    PROVENANCE_NAME,
    UNETR_SUBFOLDER,
    _active_adapter,
    _check_point_multimask,
    _jsonable,
    _repo_files,
    _unetr_of,
    describe_model,
)


def _save_weights(model: nn.Module, folder: Path, base_model_id: str | None) -> None:
    """peft's adapter files (or the whole SamModel for full fine-tuning), without the UNETR decoder copy
    of a plain SamModel (that goes to `unetr/`)."""
    if not isinstance(model, PeftModel):
        # model.safetensors then holds exactly SamModel's keys: transformers loads it with nothing unexpected
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{UNETR_ATTRIBUTE}.")}
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        return
    adapter = _active_adapter(model)
    config = model.peft_config[adapter]
    # adapter_config.json is written from the live config: set the base id for the save only, so saving does not
    # change the model the caller holds
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
    # a loaded adapter carries its recorded value as an attribute (set_point_multimask): re-saving keeps it
    if point_multimask is None:
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
    # everything goes into a temporary folder renamed over out_dir at the end: a failure leaves the old one whole
    with atomic_folder(out_dir, overwrite) as tmp:
        _save_weights(model, tmp, provenance["base_model"])
        if decoder is not None:
            save_unetr(decoder, tmp / UNETR_SUBFOLDER)
        # listed before the provenance and card are written (the provenance holds the list), so both are added
        provenance["files"] = sorted({*_repo_files(tmp), PROVENANCE_NAME, CARD_NAME})
        atomic_write_text(tmp / PROVENANCE_NAME, json.dumps(provenance, indent=2) + "\n")
        # the card is rendered from the very dict just written, so README.md and hf_sam_peft.json cannot disagree
        atomic_write_text(tmp / CARD_NAME, render_card(provenance, repo_id or os.fspath(out_dir)))
    return out_dir
