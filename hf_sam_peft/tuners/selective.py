"""Selective fine-tuning: train copies of chosen *existing* parameters of the image encoder.

LN Tune, Bias Tune and Attn Tune differ only in which parameters they pick. The layer keeps a trainable copy
of exactly those tensors per adapter and runs the base module with them swapped in
(`torch.func.functional_call`), so the adapter file holds only what trains and merging is an exact copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .base import SamTunerConfig, SamTunerLayer, SamTunerModel


def _key(param_name: str) -> str:
    # ParameterDict keys cannot contain dots
    return param_name.replace(".", "__")


@dataclass
class SelectiveConfig(SamTunerConfig):
    """Which parameters (names relative to each targeted module) train."""

    trainable_parameters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.trainable_parameters, (list, tuple)) or not all(
            isinstance(n, str) for n in self.trainable_parameters
        ):
            raise TypeError("trainable_parameters must be a list of parameter names such as ['bias']")


class SelectiveLayer(SamTunerLayer):
    """Holds `<prefix>params[adapter][name]`, a trainable copy of `base_layer.<name>`."""

    adapter_layer_names: tuple[str, ...] = ("selective_params",)

    @property
    def _store(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    def update_layer(self, adapter_name: str, config: SelectiveConfig, **kwargs: Any) -> None:
        if not hasattr(self, self.adapter_layer_names[0]):
            setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        base_params = dict(self.get_base_layer().named_parameters())
        # one list serves every encoder (ViT's rel_pos_h, TinyViT's attention_biases, SAM 3's q_proj.*): each
        # module keeps the names it has, and only a module that has none of them is an error
        names = [n for n in config.trainable_parameters if n in base_params]
        if not names:
            raise ValueError(
                f"none of trainable_parameters={list(config.trainable_parameters)} exists in the targeted "
                f"{type(self.get_base_layer()).__name__} (it has {sorted(base_params)})"
            )
        # copies, not the base tensors: the base stays as loaded, so disabling or unmerging gives the pretrained values
        self._store[adapter_name] = nn.ParameterDict(
            {_key(n): nn.Parameter(base_params[n].detach().clone()) for n in names}
        )
        # a plain dict, not module state: the names are derived from the config again on load
        self._param_names = getattr(self, "_param_names", {})
        self._param_names[adapter_name] = names

    def _named_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        store = self._store[adapter_name]
        return {n: store[_key(n)] for n in self._param_names[adapter_name]}

    def adapted_forward(self, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        # swaps the copies in for this call only (the base module is not modified); strict=False: every parameter
        # not named here is the base module's own
        return functional_call(self.get_base_layer(), self._named_values(adapter_name), args, kwargs, strict=False)

    def merged_values(self, adapter_name: str, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: v.detach() for n, v in self._named_values(adapter_name).items()}


class SelectiveModel(SamTunerModel):
    """Injects `tuner_layer_cls` (a `SelectiveLayer`) on every targeted module."""
