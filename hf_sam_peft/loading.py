"""Loading adapters onto a base SAM: peft's normal path, plus what peft cannot know by itself.

Use `load_adapter(base, path_or_repo_id)` rather than `PeftModel.from_pretrained` directly when the adapter may
be q/v LoRA (peft does not save custom LoRA layer registrations) or when you want a one-line error for an adapter
trained on a SAM of another size. Importing `hf_sam_peft` (which this module does) registers our tuner types.
"""

from __future__ import annotations

import os
import re
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel
from safetensors import safe_open
from torch import nn

from .tuners.base import find_image_encoder
from .tuners.lora import is_qv_lora_state, register_qv_lora

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_weights_file(model_id: str, subfolder: str | None = None, **hub_kwargs: Any) -> str:
    """Path of an adapter's safetensors file: in a local folder, or fetched through the Hub cache."""
    local = os.path.join(model_id, subfolder or "", ADAPTER_WEIGHTS)
    if os.path.isfile(local):
        return local
    if os.path.isdir(model_id):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in adapter folder {model_id!r}")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(model_id, ADAPTER_WEIGHTS, subfolder=subfolder, **hub_kwargs)


def adapter_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only."""
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape (\S+ ?\S*) from checkpoint, the shape in current model is (\S+ ?\S*)\.")


def load_adapter(
    base_model: nn.Module,
    model_id: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    config: PeftConfig | None = None,
    **kwargs: Any,
) -> PeftModel:
    """`PeftModel.from_pretrained(base_model, model_id)` that also handles q/v LoRA and explains size mismatches."""
    find_image_encoder(base_model)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "subfolder", "cache_dir", "token", "local_files_only") if k in kwargs}
    if config is None:
        config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
    if isinstance(config, LoraConfig) and not config._custom_modules:
        shapes = adapter_tensor_shapes(adapter_weights_file(model_id, **hub_kwargs))
        if is_qv_lora_state(config, shapes):
            register_qv_lora(config)
    try:
        return PeftModel.from_pretrained(
            base_model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
        )
    except RuntimeError as exc:
        match = _SIZE_MISMATCH.search(str(exc))
        if match is None:
            raise
        key, saved, current = match.groups()
        raise ValueError(
            f"adapter {model_id!r} does not fit this base model (trained on another SAM size?): {key} has shape "
            f"{saved} in the adapter but {current} in the base model"
        ) from None
