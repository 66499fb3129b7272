"""Loading adapters onto a base SAM: peft's normal path, plus what peft cannot know by itself.

Use `load_adapter(base, path_or_repo_id)` rather than `PeftModel.from_pretrained` directly when the adapter may
be q/v LoRA (peft does not save custom LoRA layer registrations) or when you want a one-line error for an adapter
trained on a SAM of another size. Importing `hf_sam_peft` (which this module does) registers our tuner types.

This is the peft layer of the one adapter loader, `hf_sam_peft.hub.load.load_adapter_folder`, which prepares the
base (UNETR decoder, QLoRA's 4-bit encoder, the size check) from the adapter folder's files before it calls
`load_adapter`; `from_pretrained`, `hf_sam_peft.evaluation.load_model` and the app's `ModelBank` all go through
it. Here too: the attribute loaders set on a loaded model to say how its adapter trained point prompts
(`set_point_multimask` / `point_multimask_of`), and the UNETR settings read from an adapter's saved weights.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel
from safetensors import safe_open
from torch import nn
import torch
from huggingface_hub import hf_hub_download
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import get_peft_model_state_dict

from .tuners.base import declare_untied_embeddings, find_image_encoder
from .tuners.lora import is_qv_lora_state, register_qv_lora
from .modeling.unetr import ATTRIBUTE_NAME

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_weights_file(model_id: str, subfolder: str | None = None, **hub_kwargs: Any) -> str:
    """Path of an adapter's safetensors file: in a local folder, or fetched through the Hub cache."""
    local = os.path.join(model_id, subfolder or "", ADAPTER_WEIGHTS)
    if os.path.isfile(local):
        return local
    # a local folder without the file is an error here, not a Hub lookup of the path as a repo id
    if os.path.isdir(model_id):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in adapter folder {model_id!r}")

    return hf_hub_download(model_id, ADAPTER_WEIGHTS, subfolder=subfolder, **hub_kwargs)


def adapter_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only (a one-line ValueError
    naming the file when it is damaged)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError: a truncated or corrupt file
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"adapter weights {path} are damaged or truncated ({detail})") from None


# torch's load_state_dict message; `\S+ ?\S*` spans at most one space, i.e. shapes of up to two dims such as
# "torch.Size([2, 64])": a mismatch of 3-D or 4-D tensors alone is not matched
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape (\S+ ?\S*) from checkpoint, the shape in current model is (\S+ ?\S*)\.")


def read_adapter_config(model_id: str, subfolder: str | None = None, **hub_kwargs: Any) -> PeftConfig:
    """The adapter's `PeftConfig`; a one-line ValueError names the file when it is malformed or its peft_type unknown."""
    local = os.path.join(model_id, subfolder or "", ADAPTER_CONFIG)
    if os.path.isdir(model_id) and not os.path.isfile(local):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in adapter folder {model_id!r}")
    # a local file is checked first: for these faults peft's own errors do not name the file (an unknown
    # peft_type is a bare KeyError from its mapping)
    if os.path.isfile(local):
        try:
            with open(local, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"adapter config {local} is malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"adapter config {local} is not UTF-8 text ({exc.reason})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"adapter config {local}: expected a JSON object, got {type(raw).__name__}")
        peft_type = raw.get("peft_type")
        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ValueError(
                f"adapter config {local}: unknown peft_type {peft_type!r} (neither peft's nor hf_sam_peft's, "
                "e.g. LORA, FACT, ADAPTFORMER, SSF; saved by a newer version?)"
            )
        where = local
    else:
        where = f"{model_id!r}"
    try:
        return PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"adapter config {where} is invalid: {' '.join(str(exc).split())}") from None


def check_adapter_weights(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the adapter's tensors, after checking the file: readable (not truncated), not empty,
    every tensor floating point (BatchNorm's step counters aside) with finite values. One-line ValueErrors name
    the file (and the tensor)."""
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            if not shapes:
                raise ValueError(f"adapter weights {path} hold no tensors (no adapter keys)")
            if not any(k.startswith("base_model.model.") for k in shapes):
                raise ValueError(
                    f"adapter weights {path} hold no adapter keys (peft's start with 'base_model.model.'; "
                    f"found e.g. {next(iter(shapes))!r})"
                )
            for name in shapes:
                tensor = f.get_tensor(name)
                # peft copies every saved tensor into a float parameter: int8 / int32 values would be cast
                # silently; BatchNorm's step counter (an int64 buffer, in a modules_to_save decoder) is the
                # one integer tensor an adapter holds
                if not tensor.is_floating_point() and not name.endswith(".num_batches_tracked"):
                    raise ValueError(
                        f"adapter weights {path}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                        "expected floating point (integer or quantised adapter weights cannot be loaded into "
                        "float parameters)"
                    )
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(f"adapter weights {path}: tensor {name} has {bad} non-finite values (NaN/inf)")
    except ValueError:  # ours, from the checks above: not to be reworded as "damaged"
        raise
    except Exception as exc:  # SafetensorError, OSError: a truncated or corrupt file
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"adapter weights {path} are damaged or truncated ({detail})") from None
    return shapes


def load_adapter(
    base_model: nn.Module,
    model_id: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    config: PeftConfig | None = None,
    **kwargs: Any,
) -> PeftModel:
    """`PeftModel.from_pretrained(base_model, model_id)` that also handles q/v LoRA and explains bad adapters.

    `base_model` may already be a `PeftModel`: the adapter is then added to it under `adapter_name` (peft's
    `add_adapter` + `load_adapter`; one peft type per model, as peft requires), with the same checks, and the
    model's active adapter is left as it was.

    One-line errors (ValueError / FileNotFoundError) for: a malformed adapter_config.json or an unknown
    peft_type (naming the file), a truncated or corrupt weights file, one without adapter tensors, non-finite
    weights, weights that miss some of the adapter's tensors (peft would only warn and leave them at their
    initial values), and an adapter trained on a SAM of another size.
    """
    find_image_encoder(base_model)
    adding = isinstance(base_model, PeftModel)
    if adding and adapter_name in base_model.peft_config:
        raise ValueError(f"adapter_name {adapter_name!r} is already loaded into this model; pick another name")
    hub_kwargs = {k: kwargs[k] for k in ("revision", "subfolder", "cache_dir", "token", "local_files_only") if k in kwargs}
    if config is None:
        config = read_adapter_config(model_id, **hub_kwargs)
    weights = adapter_weights_file(model_id, **hub_kwargs)
    shapes = check_adapter_weights(weights)
    # a config read from disk never has custom modules (peft does not save them): the tensor shapes tell
    if isinstance(config, LoraConfig) and not config._custom_modules:
        if is_qv_lora_state(config, shapes):
            register_qv_lora(config)
    declare_untied_embeddings(base_model)  # EdgeTAM: peft would ask for input embeddings it cannot name
    try:
        with warnings.catch_warnings():  # missing keys are checked below, as an error
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            if adding:
                model = _add_adapter(base_model, model_id, adapter_name, is_trainable, config, **kwargs)
            else:
                model = PeftModel.from_pretrained(
                    base_model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config,
                    **kwargs,
                )
    except KeyError as exc:  # peft looks up saved modules_to_save tensors by name
        raise ValueError(f"adapter weights {weights} miss the tensor {exc.args[0] if exc.args else exc}") from None
    except RuntimeError as exc:
        match = _SIZE_MISMATCH.search(str(exc))
        if match is None:
            raise
        key, saved, current = match.groups()
        raise ValueError(
            f"adapter {model_id!r} does not fit this base model (trained on another SAM size?): {key} has shape "
            f"{saved} in the adapter but {current} in the base model"
        ) from None
    # the keys the loaded adapter would save, i.e. the file's key format; any not in the file kept its init values
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing = sorted(expected - set(shapes))
    if missing:
        if adding:  # leave the caller's PeftModel as it was
            model.delete_adapter(adapter_name)
        if not (expected & set(shapes)):
            raise ValueError(
                f"adapter weights {weights} hold no tensors of this {config.peft_type} adapter (no adapter keys; "
                f"e.g. {missing[0]})"
            )
        raise ValueError(
            f"adapter weights {weights} miss {len(missing)} of the adapter's {len(expected)} tensors "
            f"(e.g. {missing[0]}); they would stay at their initial values"
        )
    return model


def _add_adapter(
    model: PeftModel, model_id: str, adapter_name: str, is_trainable: bool, config: PeftConfig, **kwargs: Any
) -> PeftModel:
    """`config`'s adapter added to `model` and its weights loaded; removed again when the load fails."""
    types = {str(getattr(c.peft_type, "value", c.peft_type)) for c in model.peft_config.values()}
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if types != {kind}:
        raise ValueError(
            f"adapter {model_id!r} is a {kind} adapter but the model holds {', '.join(sorted(types))} adapters; "
            "peft keeps one adapter type per model (load it onto its own copy of the base)"
        )
    # before add_adapter: the new layers take requires_grad from it
    config.inference_mode = not is_trainable
    model.add_adapter(adapter_name, config)  # the active adapter stays the active one
    try:
        model.load_adapter(model_id, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    except Exception:
        model.delete_adapter(adapter_name)
        raise
    return model


# ------------------------------------------------------------------------------------ what loaders record


# set by the loaders on the SamModel inside a loaded model: how its adapter trained point prompts
POINT_MULTIMASK_ATTRIBUTE = "hf_sam_peft_point_multimask"


def set_point_multimask(model: nn.Module, point_multimask: bool | None) -> nn.Module:
    """Record on `model` (the SamModel inside it) whether its points were trained through the multimask
    output (None: not recorded, i.e. SAM's default); returns `model`."""
    from .sam_forward.kinds import unwrap_sam  # sam_forward imports the data stack: not at `import hf_sam_peft`

    if point_multimask is not None and not isinstance(point_multimask, bool):
        raise TypeError(f"point_multimask must be True, False or None, got {point_multimask!r}")
    setattr(unwrap_sam(model), POINT_MULTIMASK_ATTRIBUTE, point_multimask)
    return model


def point_multimask_of(model: nn.Module) -> bool:
    """Whether `model` answers a lone point through SAM's multimask output: what its adapter recorded
    (`set_point_multimask`, done by the loaders), else True (SAM's own way)."""
    # lazy: sam_forward imports the data stack: not at `import hf_sam_peft`
    from .sam_forward.kinds import unwrap_sam

    value = getattr(unwrap_sam(model), POINT_MULTIMASK_ATTRIBUTE, None)
    return True if value is None else bool(value)


def unetr_config_from_weights(path: str) -> dict[str, Any] | None:
    """UNETR settings (features, upsampling) read from the shapes of the decoder an adapter's weights file saves
    in `modules_to_save` (header only); None when it saves none. They build the empty decoder that peft then
    fills: peft silently skips a `modules_to_save` entry the base model lacks."""
    marker = f".{ATTRIBUTE_NAME}."
    shapes = {k.split(marker, 1)[1]: shape for k, shape in adapter_tensor_shapes(path).items() if marker in k}
    if not shapes:
        return None
    # only the transposed-conv variant has this tensor; a Conv2d weight's dim 0 is its output channels
    transposed = "deconv1.block.0.block.weight" in shapes
    features = [shapes["base.block.1.weight"][0]]
    features += [shapes[f"decoder.blocks.{i}.block.1.weight"][0] for i in range(3)]
    return {"features": tuple(features), "upsampling": "transposed" if transposed else "interpolate"}
