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

    def _layer_kwargs(self, adapter_name: str, config: PeftConfig, key: str = "") -> dict:
        # SAM 3's ViT: q and v are Linears of their own (`attention.q_proj` / `v_proj`); one block's two share U and
        # V (FacT's factors are per block, S per projection), so each gets its role and the block's factor dict
        role = next((r for r in ("q", "v") if key.endswith(f".{r}_proj")), None)
        kwargs: dict = {} if role is None else {"role": role}
        # created on first use: peft injects from inside BaseTuner.__init__, before a subclass's __init__ could set
        # them up; plain bookkeeping dicts (the tensors in them are registered on their owning layers)
        if config.shared_factors:
            kwargs["shared"] = self.__dict__.setdefault("_fact_shared", {})
        elif role is not None:
            blocks: dict[str, SharedFactors] = self.__dict__.setdefault("_fact_blocks", {})
            # the attention module's path, shared by its q_proj and v_proj
            kwargs["shared"] = blocks.setdefault(key.rsplit(".", 1)[0], {})
        return kwargs
