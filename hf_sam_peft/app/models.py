"""A base SAM and several adapters held at once, switched in place for side-by-side comparison.

Adapters of one peft type share a single :class:`~peft.PeftModel` and are switched with peft's
``set_adapter``; the base model is the same weights under ``disable_adapter()``. peft cannot mix adapter
types in one ``PeftModel`` (``add_adapter`` refuses), so each further peft type (e.g. SSF beside LoRA) wraps
its own copy of the base model, made once at start-up; so does each QLoRA quant type, whose image encoder is
4-bit (the base itself stays full precision). Nothing is reloaded when switching. Every adapter goes on
through the one adapter loader, :func:`hf_sam_peft.hub.load.load_adapter_folder`.

A UNETR decoder (for "segment all") comes with an adapter either as ``"unetr_decoder"`` in its
``modules_to_save`` (switched by peft with the adapter) or as ``<adapter>/unetr`` (attached while that
adapter is active). The base model never runs AIS: an empty decoder placeholder is not a trained one.

Each adapter's ``"point_multimask"`` (``hf_sam_peft.json``, :func:`hf_sam_peft.hub.save_adapter`) is kept
in its :class:`AdapterInfo`; :meth:`ModelBank.point_multimask` tells the page whether a lone click is
answered through SAM's multimask output or, for an adapter that trained points through the single mask
(e.g. a LiteMedSAM adapter: that base was trained on boxes only), through the single-mask output.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from peft import PeftConfig, PeftModel
from torch import nn

from hf_sam_peft.evaluation.predictor import model_device_dtype
from hf_sam_peft.hub import read_provenance, recorded_point_multimask, resolve_adapter_folder
from hf_sam_peft.hub.load import (
    adapter_unetr_settings,
    check_adapter_folder,
    load_adapter_folder,
    recorded_quant_type,
)
from hf_sam_peft.hub.provenance import read_json_file
from hf_sam_peft.loading import point_multimask_of, read_adapter_config
from hf_sam_peft.modeling.unetr import ATTRIBUTE_NAME, CONFIG_NAME, load_unetr
from hf_sam_peft.sam_forward.forward import unwrap_sam

__all__ = ["BASE_NAME", "AdapterInfo", "ModelBank", "adapter_names", "recorded_base"]

BASE_NAME = "base"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def adapter_names(sources: Sequence[str]) -> list[str]:
    """Short unique display names (folder or repo basename), usable as peft adapter names (no dots)."""
    names: list[str] = []
    for source in sources:
        # adapter names become ModuleDict keys inside the peft model, which refuse dots: keep [A-Za-z0-9_-] only
        stem = _NAME_CHARS.sub("_", Path(os.fspath(source).rstrip("/\\")).name).strip("_") or "adapter"
        name, index = stem, 2
        # "base" names the base model: an adapter folder called base becomes base_2
        while name in names or name == BASE_NAME:
            name, index = f"{stem}_{index}", index + 1
        names.append(name)
    return names


@dataclass(frozen=True)
class AdapterInfo:
    """One loaded adapter: its display name, where it came from, its peft type, whether it can run AIS, and
    how it trained point prompts (``point_multimask``: True multimask, False single mask, None not recorded)."""

    name: str
    source: str
    peft_type: str
    has_decoder: bool
    point_multimask: bool | None = None


class ModelBank:
    """Base SAM + adapters; :meth:`use` activates one by name and yields the model to run.

    ``use`` holds a lock, so concurrent requests (several browser tabs) never see each other's adapter.
    """

    def __init__(self, base_model: nn.Module, adapters: Sequence[str] = ()) -> None:
        unwrap_sam(base_model)  # one-line TypeError for anything but SAM
        if isinstance(base_model, PeftModel):
            raise TypeError("base_model must be the plain SamModel, not a PeftModel")
        if isinstance(adapters, str) or not all(isinstance(a, str) and a for a in adapters):
            raise ValueError(f"adapters must be a list of adapter folders or Hub repo ids, got {adapters!r}")
        self._lock = threading.RLock()
        self.adapters: dict[str, AdapterInfo] = {}
        self._group_of: dict[str, tuple[str, str | None]] = {}  # adapter name -> its group
        self._groups: dict[tuple[str, str | None], nn.Module] = {}  # (peft type, 4-bit quant type) -> PeftModel
        self._folder_decoders: dict[str, nn.Module] = {}

        # every folder checked before any adapter loads: a bad one fails at once, not after the others loaded
        folders = [check_adapter_folder(resolve_adapter_folder(source, {}), source) for source in adapters]
        configs = [read_adapter_config(str(folder)) for folder in folders]
        provenances = [read_provenance(folder) for folder in folders]
        # one PeftModel per (peft type, 4-bit quant type): peft cannot mix tuner types, and QLoRA needs a 4-bit encoder
        groups = [(_type_name(c), recorded_quant_type(p)) for c, p in zip(configs, provenances)]
        kinds = list(dict.fromkeys(groups))
        # The base model itself goes under the first full-precision group (it answers "base" with its adapters
        # disabled); every other group, and each 4-bit (QLoRA) one, gets a copy taken before any adapter
        # changes the base in place.
        self._base_group = next((kind for kind in kinds if kind[1] is None), None)
        bases = {kind: base_model if kind == self._base_group else copy.deepcopy(base_model) for kind in kinds}
        self.base_model = base_model

        for name, source, folder, config, provenance, kind in zip(
            adapter_names(adapters), adapters, folders, configs, provenances, groups
        ):
            # the group's PeftModel once its first adapter made one; until then its base, which peft wraps in place
            target = self._groups.get(kind, bases[kind])
            self._groups[kind] = load_adapter_folder(
                # own_model=False: the unetr/ decoder and point_multimask stay off the shared model; the bank
                # keeps them per adapter
                target, folder, adapter_name=name, config=config, own_model=False, source=source
            )
            if (folder / "unetr" / CONFIG_NAME).is_file():
                decoder = load_unetr(folder / "unetr", device=_device(self._groups[kind]))
                self._folder_decoders[name] = decoder.requires_grad_(False).eval()  # BatchNorm: running stats
            self._group_of[name] = kind
            # a decoder inside the adapter's weights switches with set_adapter; a folder one is attached in use()
            in_adapter = adapter_unetr_settings(folder, config) is not None
            self.adapters[name] = AdapterInfo(
                name, source, kind[0], in_adapter or name in self._folder_decoders,
                recorded_point_multimask(provenance),
            )
        # inference only: dropout off, BatchNorm on its running statistics
        for model in self._groups.values():
            model.eval()
        base_model.eval()

    @property
    def names(self) -> list[str]:
        """``"base"`` followed by the adapters in the order given."""
        return [BASE_NAME, *self.adapters]

    def has_decoder(self, name: str) -> bool:
        """Whether ``name`` can run automatic instance segmentation (it carries a trained UNETR decoder)."""
        self._check(name)
        return name != BASE_NAME and self.adapters[name].has_decoder

    def point_multimask(self, name: str) -> bool:
        """Whether ``name`` answers a lone click through SAM's multimask output (False: its adapter trained
        points through the single-mask output). The base model: what it carries, by default True (SAM)."""
        self._check(name)
        if name == BASE_NAME:
            return point_multimask_of(self.base_model)
        recorded = self.adapters[name].point_multimask
        # nothing recorded: SAM's own behaviour (a lone click through the multimask output)
        return True if recorded is None else recorded

    def _check(self, name: str) -> None:
        if name not in self.names:
            raise ValueError(f"model must be one of {self.names}, got {name!r}")

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """Activate ``name`` (``"base"`` or an adapter) and yield the model that runs it."""
        self._check(name)
        # held while the caller runs the model (the yields below): another tab's set_adapter must not
        # switch adapters under a running prediction
        with self._lock:
            if name == BASE_NAME:
                if self._base_group is None:  # no adapter, or only 4-bit ones (on copies): the base is untouched
                    yield self.base_model
                    return
                model = self._groups[self._base_group]
                # the same weights with every adapter of the group off: no copy of the base
                with model.disable_adapter():
                    yield model
                return
            model = self._groups[self._group_of[name]]
            # inference_mode=True: without it peft's set_adapter makes the adapter's weights trainable again
            model.set_adapter(name, inference_mode=True)
            decoder = self._folder_decoders.get(name)
            if decoder is None:
                yield model
                return
            sam = model.get_base_model()
            previous = getattr(sam, ATTRIBUTE_NAME, None)
            setattr(sam, ATTRIBUTE_NAME, decoder)
            try:
                yield model
            finally:
                # even after an error: the next adapter must never run with this one's decoder
                if previous is None:
                    delattr(sam, ATTRIBUTE_NAME)
                else:
                    setattr(sam, ATTRIBUTE_NAME, previous)


def _type_name(config: PeftConfig) -> str:
    """``"LORA"``, ``"SSF"``: the peft type as plain text (peft's own types are an enum, ours strings)."""
    return str(getattr(config.peft_type, "value", config.peft_type))


def _device(model: nn.Module):
    return model_device_dtype(model)[0]


def recorded_base(adapter: str) -> str | None:
    """The base model an adapter names (``hf_sam_peft.json``, else ``adapter_config.json``), if any."""
    folder = resolve_adapter_folder(adapter, {})
    base = read_provenance(folder).get("base_model")
    if not base and (folder / "adapter_config.json").is_file():
        base = read_json_file(folder / "adapter_config.json").get("base_model_name_or_path")
    return base or None
