"""The paper's ten ways to fine-tune SAM's image encoder, and ten of peft's own, by name, with defaults in one table.

The same names and configs serve SAM (ViT), LiteMedSAM (TinyViT), SAM 2 (transformers' `Sam2Model`, Hiera),
SAM-HQ (`SamHQModel`, SAM's ViT), the SAM 3 tracker (`Sam3TrackerModel`, SAM 3's ViT with separate q/k/v
projections) and EdgeTAM (`EdgeTamModel`, convolutional RepViT: only `full_ft` and `freeze_encoder` fit, every
other method is a one-line error from `hf_sam_peft.tuners.native.check_fits`): the tuners find each encoder's
blocks (`hf_sam_peft.tuners.base`). `METHOD_NAMES` are the paper's ten (what a
study runs by default); `PEFT_METHOD_NAMES` are peft's tuners placed where the paper's LoRA sits
(`hf_sam_peft.tuners.native`); `ALL_METHOD_NAMES` both.
"""

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
from .tuners.native import NATIVE_BUILDERS, check_fits, leaf_modules_to_save
from .tuners.base import (
    SAM3_VIT,
    check_layers,
    declare_untied_embeddings,
    encoder_family,
    default_modules_to_save,
    encoder_layers,
    find_image_encoder,
    modules_to_save_for,
    num_encoder_layers,
)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: how to build its peft config and the paper's defaults for it."""

    name: str
    title: str
    kind: str  # "full", "selective", "additive" (the paper's) or "peft" (peft's own tuners, unchanged)
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
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)  # the paper's ten

_PEFT_TITLES = {
    "dora": "DoRA", "vera": "VeRA", "ia3": "IA3", "oft": "OFT", "boft": "BOFT", "loha": "LoHa", "lokr": "LoKr",
    "adalora": "AdaLoRA", "hra": "HRA", "fourierft": "FourierFT",
}
METHODS.update({name: Method(name, _PEFT_TITLES[name], "peft", NATIVE_BUILDERS[name]) for name in _PEFT_TITLES})
PEFT_METHOD_NAMES: tuple[str, ...] = tuple(_PEFT_TITLES)
ALL_METHOD_NAMES: tuple[str, ...] = METHOD_NAMES + PEFT_METHOD_NAMES


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(ALL_METHOD_NAMES)}; got {name!r}")
    return METHODS[name]


def _config_fields(method: Method) -> set[str]:
    # `-` binds tighter than `|`: (fields - {"peft_type"}) | extras; peft_type is fixed by the config class
    if method.build is qv_lora_config:  # peft's LoraConfig, plus our `layers` (its layers_to_transform)
        return {f.name for f in dataclasses.fields(LoraConfig) if f.init} - {"peft_type"} | {"layers"}
    native = getattr(method.build, "config_class", None)
    if native is not None:  # peft's config, plus where it sits: `target` (block Linears) and `layers`
        return {f.name for f in dataclasses.fields(native) if f.init} - {"peft_type"} | {"layers", "target"}
    return {f.name for f in dataclasses.fields(method.build) if f.init} - {"peft_type"}


def _split_overrides(method: Method, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split user overrides into config kwargs and model options; unknown names get a clear error."""
    model_opts = {k: overrides[k] for k in overrides if k in method.model_options}
    config_kw = {k: v for k, v in overrides.items() if k not in model_opts}
    if method.build is None:
        if set(config_kw) - {"layers"}:
            raise ValueError(f"method 'full_ft' takes only the option 'layers', got {sorted(config_kw)}")
        return config_kw, model_opts
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


def _build_config(method: Method, config_kw: dict[str, Any], model: Optional[nn.Module] = None) -> PeftConfig:
    """The method's config; a bad option value (e.g. a negative dropout) is a one-line error naming the method.

    `model`: the SAM to adapt, against whose encoder `layers` is checked and negative indices resolved, and in
    whose prompt-encoder layout `modules_to_save` is written (SAM 2's differs; peft's LoRA cannot translate it).
    """
    try:
        if model is not None:
            if config_kw.get("layers") is not None:
                config_kw = {**config_kw, "layers": check_layers(config_kw["layers"], num_encoder_layers(model))}
            # written into the config here because peft's own tuners (LoRA, native) cannot translate SAM's
            # list to SAM 2's prompt encoder the way SamTunerModel._prepare_adapter_config does
            names = modules_to_save_for(model, config_kw.get("modules_to_save", default_modules_to_save()))
            check_fits(method.name, model)
            if method.kind == "peft":
                names = leaf_modules_to_save(model, names)
            config_kw = {**config_kw, "modules_to_save": names}
            if method.build is qv_lora_config and encoder_family(model) == SAM3_VIT:
                config_kw["fused_qkv"] = False  # SAM 3's q and v are Linears of their own: peft's plain LoRA
        return method.build(**config_kw)
    except (ValueError, TypeError) as exc:
        # peft's messages span lines: collapsed to one, prefixed with the method, without the chained traceback
        raise type(exc)(f"method {method.name!r}: {' '.join(str(exc).split())}") from None


# SAM's and SAM 2's fixed random Fourier basis (`shared_image_embedding`, shared with the prompt encoder);
# by class name, so no model class has to be imported (or exist in the installed transformers) to match it
POSITIONAL_BASIS_TYPES = frozenset({
    "SamPositionalEmbedding", "Sam2PositionalEmbedding", "SamHQPositionalEmbedding", "Sam3TrackerPositionalEmbedding",
    "EdgeTamPositionalEmbedding",
})


def freeze_positional_basis(model: nn.Module) -> None:
    """Keep SAM's fixed random Fourier basis (`shared_image_embedding`) frozen, as in the reference.

    (transformers' SAM 2 already keeps it in a buffer; a parameter there, e.g. from a conversion, is frozen too.)
    """
    for module in model.modules():
        if type(module).__name__ in POSITIONAL_BASIS_TYPES:
            module.requires_grad_(False)


def apply_method(model: nn.Module, name: str, adapter_name: str = "default", **overrides: Any) -> nn.Module:
    """Return `model` ready to train with a paper method: a `PeftModel`, or the model itself for `full_ft`.

    `model`: a SAM (`SamModel`, LiteMedSAM) or SAM 2 (`Sam2Model`). The prompt encoder and mask decoder always
    train. `qlora` first quantizes every image-encoder Linear to 4 bit (`quant_type="nf4"` or `"fp4"`). `layers`
    (every method, Full FT included): which `vision_encoder.layers.<i>` (SAM 2:
    `vision_encoder.backbone.blocks.<i>`) to adapt, an int or a list, negative counting from the end (`[-2, -1]`:
    the last two blocks); the others stay frozen, so backward stops at the first adapted block (Full FT with
    `layers` trains those blocks whole, the patch embedding and neck stay frozen). SAM 2's
    `no_memory_embedding` (added to the image features) trains with Full FT only, like the image encoder.
    peft's own methods (`PEFT_METHOD_NAMES`) take their peft config's options plus `target` and `layers`
    (`hf_sam_peft.tuners.native`).
    """
    method = get_method(name)
    find_image_encoder(model)
    if isinstance(model, PeftModel):
        raise TypeError("model is already a PeftModel; pass the base SamModel (or use model.add_adapter)")
    config_kw, model_opts = _split_overrides(method, overrides)
    if method.build is None:
        layers = config_kw.get("layers")
        layers = None if layers is None else check_layers(layers, num_encoder_layers(model))
        # everything on first (a model may come in frozen), then the encoder narrowed and the basis frozen again
        model.requires_grad_(True)
        if layers is not None:  # only these encoder blocks (and everything outside the encoder) train
            find_image_encoder(model).requires_grad_(False)
            blocks = encoder_layers(model)
            for index in layers:
                blocks[index].requires_grad_(True)
        freeze_positional_basis(model)
        return model
    # a bad option (or `layers` out of this model's range) fails before the model is touched
    config = _build_config(method, config_kw, model)
    # before peft wraps the encoder: the 4-bit q/v LoRA layer is picked by the base layer's type (Linear4bit)
    if "quant_type" in model_opts:
        quantize_image_encoder(model, quant_type=model_opts["quant_type"])
    declare_untied_embeddings(model)
    try:
        return get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as exc:  # e.g. peft finding an option that does not fit a layer's shape: name the method
        raise ValueError(f"method {method.name!r}: {' '.join(str(exc).split())}") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting shared tensors once and peft's frozen originals not at all."""
    seen: set[int] = set()
    trainable = total = 0
    # a tensor reachable under two names (SAM's shared_image_embedding, FacT's shared factors) counts once;
    # `.original_module.`: the frozen original that peft's ModulesToSaveWrapper keeps beside its trainable copy
    for name, p in model.named_parameters():
        if id(p) in seen or ".original_module." in name:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def meta_base_model(model_type: str) -> nn.Module:
    """A SAM (`vit_b|l|h`) or SAM 2 (`sam2_hiera_tiny|small|base_plus|large`) size on the meta device: shapes only."""
    import torch
    from transformers import Sam2Model, SamModel

    from .modeling.sam import VIT_SIZES, sam_config
    from .modeling.sam2 import SAM2_SIZES, sam2_config

    if model_type not in VIT_SIZES and model_type not in SAM2_SIZES:
        raise ValueError(f"model_type must be one of {', '.join([*VIT_SIZES, *SAM2_SIZES])}, got {model_type!r}")
    with torch.device("meta"):
        if model_type in SAM2_SIZES:
            return Sam2Model(sam2_config(model_type))
        return SamModel(sam_config(model_type))


def parameter_table(
    model_type: str = "vit_b", methods: tuple[str, ...] = METHOD_NAMES, last_k: Optional[int] = None
) -> list[dict[str, Any]]:
    """Trainable parameters per method for a SAM or SAM 2 size, from configs only (meta device, no weights).

    QLoRA is counted as LoRA: its 4-bit weights are frozen, so its trainable parameters are LoRA's. The encoder
    part is everything beyond the prompt encoder + mask decoder (Freeze Encoder's count); for SAM 2's Full FT
    it includes `no_memory_embedding`. `last_k`: every method limited to the encoder's last k blocks.
    """
    if last_k is not None and (isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1):
        raise ValueError(f"last_k must be a positive int (a number of encoder blocks), got {last_k!r}")
    import contextlib
    import copy

    import torch

    base = meta_base_model(model_type)
    with torch.device("meta"):
        base_total = count_parameters(base)[1]
        # the prompt encoder + mask decoder part, trained by every method
        decoder = count_parameters(apply_method(copy.deepcopy(base), "freeze_encoder"))[0]
        rows = []
        if last_k is not None and last_k > num_encoder_layers(base):
            raise ValueError(f"last_k={last_k} exceeds the {num_encoder_layers(base)} encoder blocks of {model_type}")
        placement = {} if last_k is None else {"layers": list(range(-last_k, 0))}
        for name in methods:
            # Freeze Encoder rejects `layers` (it adapts no block)
            options = {} if name == "freeze_encoder" else placement
            # BOFT builds its permutation buffers element by element (`.item()`), which the meta device cannot:
            # those are made on the CPU (small, no weights) and peft moves them to the base's (meta) device
            context = torch.device("cpu") if name == "boft" else contextlib.nullcontext()
            if METHODS[name].kind == "peft":
                try:
                    check_fits(name, base)
                except ValueError as exc:
                    rows.append({"method": name, "title": METHODS[name].title, "trainable": None, "why": str(exc)})
                    continue
            # a fresh copy per method: apply_method changes the model in place; QLoRA as LoRA (bitsandbytes does not
            # quantize on the meta device; its trainable parameters are LoRA's)
            with context:
                model = apply_method(copy.deepcopy(base), "lora" if name == "qlora" else name, **options)
            rows.append({"method": name, "title": METHODS[name].title, "trainable": count_parameters(model)[0]})
    for row in rows:
        fits = row["trainable"] is not None
        row["encoder_trainable"] = row["trainable"] - decoder if fits else None
        row["percent"] = 100.0 * row["trainable"] / base_total if fits else None
        row["base_total"] = base_total
    return rows
