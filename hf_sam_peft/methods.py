"""The paper's ten ways to fine-tune SAM's image encoder, by name, with the paper's defaults in one table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from .tuners import (
    AdaptFormerConfig,
    AttnTuneConfig,
    BiasTuneConfig,
    FactConfig,
    FreezeEncoderConfig,
    LNTuneConfig,
    SSFConfig,
    quantize_image_encoder,
    qv_lora_config,
)
from .tuners.base import check_layers, find_image_encoder, num_encoder_layers


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: how to build its peft config and the paper's defaults for it."""

    name: str
    title: str
    kind: str  # "full", "selective" or "additive"
    build: Optional[Callable[..., PeftConfig]]  # None: no peft config (full fine-tuning)
    defaults: dict[str, Any] = field(default_factory=dict)
    # options that act on the base model rather than the adapter config
    model_options: dict[str, Any] = field(default_factory=dict)


# The paper's defaults (DESIGN §2). Everything not listed uses the config class's own default.
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("full_ft", "Full FT", "full", None),
        Method("freeze_encoder", "Freeze Encoder", "selective", FreezeEncoderConfig),
        Method("ln_tune", "LN Tune", "selective", LNTuneConfig),
        Method("bias_tune", "Bias Tune", "selective", BiasTuneConfig),
        Method("attn_tune", "Attn Tune", "selective", AttnTuneConfig),
        # LoRA's scale is 1 (lora_alpha = r; qv_lora_config keeps it so when only r is overridden)
        Method("lora", "LoRA", "additive", qv_lora_config, dict(r=32, lora_dropout=0.0)),
        Method(
            "qlora", "QLoRA", "additive", qv_lora_config, dict(r=32, lora_dropout=0.0),
            model_options=dict(quant_type="nf4"),
        ),
        Method("adaptformer", "AdaptFormer", "additive", AdaptFormerConfig, dict(projection_size=64, alpha=None, dropout=0.0)),
        Method("ssf", "SSF", "additive", SSFConfig, dict(init="identity")),
        Method("fact", "FacT", "additive", FactConfig, dict(r=16, dropout=0.1, shared_factors=False, init="identity")),
    ]
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}; got {name!r}")
    return METHODS[name]


def _config_fields(method: Method) -> set[str]:
    if method.build is qv_lora_config:  # peft's LoraConfig, plus our `layers` (its layers_to_transform)
        return {f.name for f in dataclasses.fields(LoraConfig) if f.init} - {"peft_type"} | {"layers"}
    return {f.name for f in dataclasses.fields(method.build) if f.init} - {"peft_type"}


def _split_overrides(method: Method, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split user overrides into config kwargs and model options; unknown names get a clear error."""
    model_opts = {k: overrides[k] for k in overrides if k in method.model_options}
    config_kw = {k: v for k, v in overrides.items() if k not in model_opts}
    if method.build is None:
        if config_kw:
            raise ValueError(f"method 'full_ft' takes no options, got {sorted(config_kw)}")
        return {}, model_opts
    valid = _config_fields(method)
    unknown = sorted(set(config_kw) - valid)
    if unknown:
        choices = sorted(valid | set(method.model_options))
        raise ValueError(f"unknown option(s) {unknown} for method {method.name!r}; valid options: {', '.join(choices)}")
    return {**method.defaults, **config_kw}, {**method.model_options, **model_opts}


def method_config(name: str, **overrides: Any) -> Optional[PeftConfig]:
    """The peft config of a paper method with its defaults (None for `full_ft`), e.g. `method_config("fact", r=8)`."""
    method = get_method(name)
    config_kw, _ = _split_overrides(method, overrides)
    return None if method.build is None else _build_config(method, config_kw)


def _build_config(method: Method, config_kw: dict[str, Any], num_layers: Optional[int] = None) -> PeftConfig:
    """The method's config; a bad option value (e.g. a negative dropout) is a one-line error naming the method.

    `num_layers`: the model's encoder layers, against which `layers` is checked and negative indices resolved.
    """
    try:
        if num_layers is not None and config_kw.get("layers") is not None:
            config_kw = {**config_kw, "layers": check_layers(config_kw["layers"], num_layers)}
        return method.build(**config_kw)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"method {method.name!r}: {' '.join(str(exc).split())}") from None


def freeze_positional_basis(model: nn.Module) -> None:
    """Keep SAM's fixed random Fourier basis (`shared_image_embedding`) frozen, as in the reference."""
    for module in model.modules():
        if type(module).__name__ == "SamPositionalEmbedding":
            module.requires_grad_(False)


def apply_method(model: nn.Module, name: str, adapter_name: str = "default", **overrides: Any) -> nn.Module:
    """Return `model` ready to train with a paper method: a `PeftModel`, or the model itself for `full_ft`.

    The prompt encoder and mask decoder always train. `qlora` first quantizes every image-encoder Linear to
    4 bit (`quant_type="nf4"` or `"fp4"`). `layers` (every method with encoder adapters): which
    `vision_encoder.layers.<i>` to adapt, an int or a list, negative counting from the end (`[-2, -1]`: the last
    two blocks); the others stay frozen, so backward stops at the first adapted block.
    """
    method = get_method(name)
    find_image_encoder(model)
    if isinstance(model, PeftModel):
        raise TypeError("model is already a PeftModel; pass the base SamModel (or use model.add_adapter)")
    config_kw, model_opts = _split_overrides(method, overrides)
    if method.build is None:
        model.requires_grad_(True)
        freeze_positional_basis(model)
        return model
    # a bad option (or `layers` out of this model's range) fails before the model is touched
    config = _build_config(method, config_kw, num_encoder_layers(model))
    if "quant_type" in model_opts:
        quantize_image_encoder(model, quant_type=model_opts["quant_type"])
    return get_peft_model(model, config, adapter_name=adapter_name)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting shared tensors once and peft's frozen originals not at all."""
    seen: set[int] = set()
    trainable = total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or ".original_module." in name:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def parameter_table(model_type: str = "vit_b", methods: tuple[str, ...] = METHOD_NAMES) -> list[dict[str, Any]]:
    """Trainable parameters per method for a SAM size, from configs only (built on the meta device, no weights).

    QLoRA is counted as LoRA: its 4-bit weights are frozen, so its trainable parameters are LoRA's.
    """
    import copy

    import torch
    from transformers import SamModel

    from .modeling.sam import sam_config

    with torch.device("meta"):
        base = SamModel(sam_config(model_type))
        base_total = count_parameters(base)[1]
        # the prompt encoder + mask decoder part, trained by every method
        decoder = count_parameters(apply_method(copy.deepcopy(base), "freeze_encoder"))[0]
        rows = []
        for name in methods:
            model = apply_method(copy.deepcopy(base), "lora" if name == "qlora" else name)
            rows.append({"method": name, "title": METHODS[name].title, "trainable": count_parameters(model)[0]})
    for row in rows:
        row["encoder_trainable"] = row["trainable"] - decoder
        row["percent"] = 100.0 * row["trainable"] / base_total
        row["base_total"] = base_total
    return rows
