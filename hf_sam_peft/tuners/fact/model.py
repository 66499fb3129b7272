"""FacT tuner model."""

from __future__ import annotations

from peft.config import PeftConfig

from ..base import SamTunerModel
from .layer import FactLayer, SharedFactors


class FactModel(SamTunerModel):
    """Factor-tuning of q and v in each image-encoder block; mergeable.

    With `shared_factors=True`, U and V are created once per adapter and width (U by input, V by output width) and
    referenced by every layer (registered on the first layer only, so peft saves, loads and freezes them exactly
    once).
    """

    prefix: str = "fact_"
    tuner_layer_cls = FactLayer

    def _layer_kwargs(self, adapter_name: str, config: PeftConfig) -> dict:
        if not config.shared_factors:
            return {}
        if "_fact_shared" not in self.__dict__:
            self.__dict__["_fact_shared"] = {}
        shared: SharedFactors = self.__dict__["_fact_shared"]
        return {"shared": shared}
