"""What every checkpoint format's converter shares: reading a file safely, two-way key tables, building a model
from converted weights without random initialisation, merging adapters before export, and the checks on
output paths.

One module per source format sits above this one (`convert_sam`: segment_anything / micro-sam;
`convert_litemedsam`: LiteMedSAM; `convert_sam2`: official SAM 2), and `hf_sam_peft.modeling.convert`
dispatches between them. Nothing here knows a format's key names, so this module imports no converter.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from hf_sam_peft.atomic import atomic_folder

__all__ = [
    "DECODER_STATE",
    "LITE_MEDSAM_SIGNATURE",
    "UNETR_ATTRIBUTE",
    "KeyRules",
    "build_with_weights",
    "check_file_target",
    "check_folder_target",
    "compile_key_rules",
    "count_numbered",
    "examples",
    "first_line",
    "plain_model_of",
    "plain_state",
    "read_checkpoint",
    "save_model_folder",
    "translate_all",
    "translate_key",
    "weights_and_decoder",
]

# Where a UNETR decoder hangs on a model (`hf_sam_peft.modeling.unetr.ATTRIBUTE_NAME`, spelled out so that the
# converters do not import the decoder, whose forward imports `hf_sam_peft.sam_forward`), and micro-sam's key for
# its state beside the model weights in one checkpoint file.
UNETR_ATTRIBUTE = "unetr_decoder"
DECODER_STATE = "decoder_state"
# A key every LiteMedSAM (TinyViT encoder) checkpoint has: the first conv of the patch embedding. The SAM reader
# names the format when it meets one; the dispatcher routes such a file to the LiteMedSAM converter.
LITE_MEDSAM_SIGNATURE = "image_encoder.patch_embed.seq.0.c.weight"

# (original regex, original template, transformers regex, transformers template) per rule
KeyRules = tuple[tuple[re.Pattern, str, re.Pattern, str], ...]


# ---------------------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------------------


def examples(keys: Iterable[object], n: int = 3) -> str:
    """Up to `n` of `keys`, sorted and quoted, with how many more there are: for one-line messages."""
    keys = sorted(map(str, keys))
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def first_line(error: BaseException, limit: int = 120) -> str:
    """The error's first sentence, short enough for a one-line message."""
    text = str(error).strip().splitlines()
    text = text[0].split(". ")[0] if text else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------------------
# Key tables
# ---------------------------------------------------------------------------------------------------------------


def _template_regex(template: str, placeholders: Mapping[str, str]) -> re.Pattern:
    """Compile a key template into a full-match regex with one named group per placeholder."""
    # with the capturing group, odd entries are placeholder names and even ones the literal text between them
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        f"(?P<{part}>{placeholders[part]})" if k % 2 else re.escape(part) for k, part in enumerate(parts)
    )
    return re.compile(pattern)


def compile_key_rules(templates: tuple[tuple[str, str], ...], placeholders: Mapping[str, str]) -> KeyRules:
    """A two-way key table compiled for `translate_key`: `templates` are (original key, transformers key) pairs in
    which `{name}` stands for the regex `placeholders[name]`, carried over unchanged."""
    return tuple(
        (_template_regex(original, placeholders), original, _template_regex(hf, placeholders), hf)
        for original, hf in templates
    )


def translate_key(key: str, to_hf: bool, rules: KeyRules) -> str | None:
    """The key on the other side of the table, or None when no rule knows it."""
    # the first rule whose regex matches the whole key translates it
    for sa_regex, sa_template, hf_regex, hf_template in rules:
        match = (sa_regex if to_hf else hf_regex).fullmatch(key)
        if match:
            return (hf_template if to_hf else sa_template).format(**match.groupdict())
    return None


def translate_all(
    state: Mapping[str, Tensor], to_hf: bool, unknown_hint: str, remedy: str, rules: KeyRules
) -> dict[str, Tensor]:
    """Every key translated one way; keys the table does not know are a one-line error
    ("state_dict has keys that <unknown_hint>: ... (<remedy>)")."""
    converted, unknown = {}, []
    for key, value in state.items():
        new_key = translate_key(key, to_hf=to_hf, rules=rules)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise ValueError(f"state_dict has keys that {unknown_hint}: {examples(unknown)} ({remedy})")
    return converted


def count_numbered(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    """Number of numbered submodules matching `pattern` (which has one `(\\d+)` group), checked to be 0..n-1."""
    regex = re.compile(pattern)
    indexes = {int(m.group(1)) for k in state_dict if (m := regex.match(k))}
    if indexes != set(range(len(indexes))):
        raise ValueError(f"state_dict has gaps in the numbering of {pattern!r}: {sorted(indexes)}")
    return len(indexes)


# ---------------------------------------------------------------------------------------------------------------
# Reading and building
# ---------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> object:
    """`torch.load(path, weights_only=True)` with one-line errors for missing, code-carrying or damaged files:
    only tensors (and plain containers) are unpickled, so a file can never run code on load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        # map_location="cpu": a checkpoint saved from a GPU loads on a CPU-only machine
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise ValueError(
                f"checkpoint {str(path)!r} holds Python objects besides tensors; refusing to execute code from "
                "the file (a full training checkpoint? export its weights first: micro_sam.util.export_custom_sam_model)"
            ) from None
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupt ({first_line(error)})") from None
    except Exception as error:  # the unpickler and zip reader raise many types on a damaged file
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupt ({first_line(error)})") from None
    return raw


def build_with_weights(model_class: type[nn.Module], config, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """`model_class(config)` built on the meta device (no random init) with `state_dict` loaded strictly."""
    with torch.device("meta"):
        model = model_class(config)
    name = model_class.__name__
    try:
        # assign=True: the meta tensors (no storage) are replaced by the checkpoint's, not copied into
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"state_dict does not fit {name}: {' '.join(str(error).split())[:500]}") from None
    # assign replaced the parameter objects, so ties (SamModel's alias of the positional basis) are re-made here
    model.tie_weights()
    leftover = [key for key, tensor in model.state_dict().items() if tensor.is_meta]
    if leftover:
        raise ValueError(f"state_dict left {name} tensors uninitialised: {examples(leftover)}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def check_folder_target(out_dir: Path, overwrite: bool) -> None:
    """A model folder may be written to `out_dir`: it is absent, empty, or `overwrite` allows replacing it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not empty; pass overwrite=True to replace it")


def check_file_target(path: Path, overwrite: bool) -> None:
    """A checkpoint file may be written to `path`: it is not a folder, and absent unless `overwrite`."""
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; expected a file name such as model.pth")
    if path.exists() and not overwrite:
        raise ValueError(f"path {str(path)!r} exists; pass overwrite=True to replace it")


def save_model_folder(model: nn.Module, processor, out_dir: Path) -> None:
    """`model` (and `processor`, unless None) saved into `out_dir`, written beside it and renamed into place so a
    failed run never leaves a half-written model. The caller checked the target (`check_folder_target`)."""
    with atomic_folder(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)


def plain_model_of(model: nn.Module, model_class: type[nn.Module]) -> nn.Module:
    """The plain `model_class` (SamModel, Sam2Model) inside `model`, with peft adapters merged into a copy (the
    caller's model is untouched)."""
    name = model_class.__name__
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a {name} or a peft model wrapping one, got {type(model).__name__}")
    if hasattr(model, "merge_and_unload"):
        try:
            # on a copy: merge_and_unload changes the wrapped model in place
            model = copy.deepcopy(model).merge_and_unload()
        except (ValueError, NotImplementedError, AttributeError, TypeError, RuntimeError) as error:
            raise ValueError(
                f"model's adapters cannot be merged into the base weights ({first_line(error)}); an original "
                "checkpoint has no place for unmerged adapter weights"
            ) from None
    if isinstance(model, model_class):
        return model
    found = [m for m in model.modules() if isinstance(m, model_class)]
    if len(found) != 1:
        raise ValueError(
            f"model must be or contain exactly one {name}, found {len(found)} in {type(model).__name__}"
        )
    return found[0]


def plain_state(module: nn.Module, skip_prefix: str | None = None) -> dict[str, Tensor]:
    """`module.state_dict()` as contiguous CPU tensors, without keys under `skip_prefix`."""
    return {
        # on the CPU, so a GPU model exports a file that loads anywhere; contiguous: safetensors refuses strided views
        k: v.detach().to("cpu").contiguous()
        for k, v in module.state_dict().items()
        if skip_prefix is None or not k.startswith(skip_prefix)
    }


def weights_and_decoder(
    model: nn.Module, model_class: type[nn.Module]
) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor] | None]:
    """The merged `model_class` model, its own weights, and the state of the UNETR decoder it carries (None
    without one)."""
    sam = plain_model_of(model, model_class)
    decoder = getattr(sam, UNETR_ATTRIBUTE, None)
    # without the decoder's keys, which no original key table knows; they are returned as its own state
    state = plain_state(sam, skip_prefix=f"{UNETR_ATTRIBUTE}.")
    return sam, state, None if decoder is None else plain_state(decoder)
