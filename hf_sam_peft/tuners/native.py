"""peft's own methods on SAM's image encoder: DoRA, VeRA, IA3, OFT, BOFT, LoHa, LoKr, AdaLoRA, HRA, FourierFT.

These are not the paper's methods: they are peft's tuners, unchanged (peft's layers, save, load, merge and
unload), given defaults that place them where the paper's LoRA sits. The paper's LoRA adapts the q and v
slices of each block's fused ``attn.qkv`` (micro_sam/models/peft_sam.py, ``LoRASurgery``); peft's methods wrap
whole ``nn.Linear`` modules, so they adapt the whole ``attn.qkv`` and, where the method allows, the block's MLP
(``mlp.lin1``/``lin2`` in SAM's ViT, ``mlp.fc1``/``fc2`` in TinyViT and SAM 3's ViT, ``mlp.proj_in``/``proj_out``
in Hiera). SAM 3's ViT has separate ``attention.q_proj`` / ``k_proj`` / ``v_proj``: ``target="qkv"`` takes all three.

``target``: which Linears of each encoder block (``"qkv_mlp"``, the default; ``"qkv"``; ``"mlp"``).
``layers``: only the blocks ``vision_encoder.layers.<i>`` (SAM 2: ``vision_encoder.backbone.blocks.<i>``) for i in
``layers``, negative counting from the end; written into the target regex rather than peft's
``layers_to_transform``, because the mask decoder's two-way transformer also has ``layers.<i>.mlp.lin1`` and
peft's layer pattern would match it.

peft's LN tuning (``LNTuningConfig``) is not a separate method: on the same LayerNorms it trains the same
parameters as ``ln_tune`` (tests/tuners/test_native.py shows equal counts and equal outputs after a training
step); ``ln_tune`` trains them in place, without peft's copy of each norm.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from peft import (
    AdaLoraConfig,
    BOFTConfig,
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    VeraConfig,
)

from torch import nn

from .base import REPVIT, check_layers, default_modules_to_save, encoder_family, encoder_regex, find_image_encoder

QKV: tuple[str, ...] = ("attn.qkv", "attention.q_proj", "attention.k_proj", "attention.v_proj")  # fused | SAM 3
MLP_IN: tuple[str, ...] = ("mlp.lin1", "mlp.fc1", "mlp.proj_in")  # ViT, TinyViT (and SAM 3), Hiera
MLP_OUT: tuple[str, ...] = ("mlp.lin2", "mlp.fc2", "mlp.proj_out")
TARGETS: dict[str, tuple[str, ...]] = {"qkv_mlp": QKV + MLP_IN + MLP_OUT, "qkv": QKV, "mlp": MLP_IN + MLP_OUT}

# names users bring from other models' attention (q_proj, query, ...): SAM has none, its q/k/v are one Linear
_SPLIT_ATTENTION = re.compile(r"(?:^|[._])(?:q|k|v|q_proj|k_proj|v_proj|query|key|value)$")


def block_regex(suffixes: tuple[str, ...], layers: Optional[list[int]] = None) -> str:
    """A peft ``target_modules`` regex: ``<suffix>`` inside image-encoder blocks (only blocks ``layers``)."""
    return encoder_regex(*suffixes, layers=layers)


def _check_target(method: str, target: Any, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The block Linears ``target`` names; a q/v-style request gets a one-line error naming the alternative."""
    custom = kwargs.get("target_modules")
    asked = [target] if isinstance(target, str) else []
    if isinstance(custom, (list, tuple, set)):
        asked += [str(name) for name in custom]
    elif isinstance(custom, str):
        asked.append(custom)
    if target in ("qv", "q_v", "q,v") or any(_SPLIT_ATTENTION.search(name) for name in asked):
        raise ValueError(
            f"peft's {method} wraps whole Linear layers and SAM fuses q, k and v into one attn.qkv, so it cannot "
            "adapt q and v alone: use target='qkv' (all of q, k, v) or method 'lora' (the paper's q/v-slice LoRA)"
        )
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    return TARGETS[target]


def _native(config_class: type[PeftConfig], method: str, defaults: dict[str, Any],
            prepare: Optional[Callable[[tuple[str, ...], list[int] | None, dict[str, Any]], None]] = None,
            ) -> Callable[..., PeftConfig]:
    """A config builder for one peft method: block targets, ``layers``, SAM's ``modules_to_save``, defaults."""

    def build(target: str = "qkv_mlp", layers: int | list[int] | None = None, **kwargs: Any) -> PeftConfig:
        suffixes = _check_target(method, target, kwargs)
        layers = check_layers(layers)
        # the indices go into the regex as written, where `-1` would match no block
        if layers is not None and any(i < 0 for i in layers):
            raise ValueError(
                f"layers {layers}: negative indices need the model; use apply_method(model, ...) to resolve them"
            )
        options = {**defaults, **kwargs}
        options.setdefault("target_modules", block_regex(suffixes, layers))
        # SAM's layout (no model here): `methods._build_config` passes the model's own list, which wins
        options.setdefault("modules_to_save", default_modules_to_save())
        if prepare is not None:
            prepare(suffixes, layers, options)
        return config_class(**options)

    build.__name__ = f"{method.lower()}_config"
    build.__doc__ = f"peft's {config_class.__name__} on the image encoder's blocks (see hf_sam_peft.tuners.native)."
    build.config_class = config_class  # the options a user may pass: this class's fields
    return build


def _ia3_feedforward(suffixes: tuple[str, ...], layers: list[int] | None, options: dict[str, Any]) -> None:
    """IA3 scales a feed-forward layer's input, every other target's output (Liu et al. 2022: k, v and the
    MLP's hidden activation); the MLP's second Linear is that feed-forward layer."""
    if "feedforward_modules" not in options:
        out = tuple(s for s in suffixes if s in MLP_OUT)
        # no MLP target (target="qkv"): every target then scales its output
        options["feedforward_modules"] = block_regex(out, layers) if out else []


def _adalora_schedule(suffixes: tuple[str, ...], layers: list[int] | None, options: dict[str, Any]) -> None:
    """AdaLoRA needs its schedule's length; the trainer sets ``total_step`` to the run's ``max_steps`` when it
    starts (:class:`hf_sam_peft.training.callbacks.AdaLoraAllocation`), so this is only a placeholder."""
    options.setdefault("total_step", 1000)


# ``r`` values: DoRA as the paper's LoRA (32); the others keep peft's defaults unless a block dimension forbids.
NATIVE_BUILDERS: dict[str, Callable[..., PeftConfig]] = {
    "dora": _native(LoraConfig, "DoRA", dict(r=32, lora_alpha=32, lora_dropout=0.0, use_dora=True)),
    "vera": _native(VeraConfig, "VeRA", dict(r=256, vera_dropout=0.0)),
    "ia3": _native(IA3Config, "IA3", {}, prepare=_ia3_feedforward),
    "oft": _native(OFTConfig, "OFT", dict(r=0, oft_block_size=32)),
    "boft": _native(BOFTConfig, "BOFT", dict(boft_block_size=4, boft_n_butterfly_factor=1)),
    "loha": _native(LoHaConfig, "LoHa", dict(r=8, alpha=8)),
    "lokr": _native(LoKrConfig, "LoKr", dict(r=8, alpha=8)),
    "adalora": _native(AdaLoraConfig, "AdaLoRA", dict(init_r=12, target_r=8), prepare=_adalora_schedule),
    "hra": _native(HRAConfig, "HRA", dict(r=8)),
    "fourierft": _native(FourierFTConfig, "FourierFT", dict(n_frequency=1000, scaling=150.0)),
}

# Encoders whose blocks apply their Linears to (batch, height, width, channels) tensors: SAM's ViT (also SAM-HQ's),
# SAM 2's Hiera and SAM 3's ViT (windowed attention on the spatial layout). peft's OFT reads any 4-D input as a
# convolution's and unfolds it (peft/tuners/oft/layer.py, OFTRotationModule.forward), so it cannot run there;
# LiteMedSAM's TinyViT feeds (batch, tokens, channels).
SPATIAL_TOKEN_ENCODERS = frozenset({"SamVisionEncoder", "SamHQVisionEncoder", "Sam2VisionModel", "Sam3VisionModel"})

# EdgeTAM's RepViT is convolutional (BatchNorm'd convolutions, squeeze-excitation; no attention, MLP Linears or
# LayerNorm): every method but these targets modules of transformer blocks it does not have. (Bias Tune / LN Tune
# re-read for BatchNorm would be other methods, and BatchNorm's batch statistics make them differ further.)
CONVOLUTIONAL_FITS: tuple[str, ...] = ("full_ft", "freeze_encoder")



def check_fits(method: str, model: nn.Module) -> None:
    """A one-line error where ``method`` (any of ``hf_sam_peft.methods``) cannot run on ``model``'s image encoder,
    naming what can."""
    encoder = type(find_image_encoder(model)).__name__
    family = encoder_family(model)
    if family == REPVIT and method not in CONVOLUTIONAL_FITS:
        raise ValueError(
            f"method {method!r} adapts transformer blocks (attention, MLP, LayerNorm), which {type(model).__name__}'s "
            f"convolutional RepViT image encoder does not have; methods that fit: {', '.join(CONVOLUTIONAL_FITS)}"
        )
    if method == "oft" and encoder in SPATIAL_TOKEN_ENCODERS:
        raise ValueError(
            f"method 'oft': peft's OFT treats the (batch, height, width, channels) input that {encoder}'s blocks "
            "give their Linears as a convolution's; use 'boft' (peft's butterfly OFT, which handles it) or 'hra'"
        )


def leaf_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with each composite module (no ``weight`` of its own: SAM's mask decoder, mask embedding, a
    UNETR decoder) replaced by its submodules that hold parameters directly.

    Why: peft's generic ``merge_and_unload`` (BaseTuner._unload_and_optionally_merge -> _replace_module, used by
    every method here but LoRA/DoRA, whose tuner overrides it) copies ``weight`` from each ``modules_to_save``
    wrapper it unloads, and a module without one fails there. Per-leaf wrappers train and save the same
    tensors, under the leaves' names.
    """
    modules = dict(model.named_modules())
    out: list[str] = []
    for name in names:
        matches = [key for key in modules if key == name or key.endswith("." + name)]
        if not matches:
            out.append(name)  # absent in this model (e.g. no UNETR decoder): peft skips it
            continue
        for key in matches:
            module = modules[key]
            # a leaf, or a module with a `weight` of its own, survives peft's unload as it is
            if hasattr(module, "weight") or not any(True for _ in module.children()):
                out.append(name)
                break
            # named under `name`, not `key`: peft matches modules_to_save by suffix, so these still find their modules;
            # `sub` is "" for the module itself, and only modules owning parameters directly are listed
            leaves = [
                f"{name}.{sub}" for sub, child in module.named_modules()
                if sub and any(True for _ in child.parameters(recurse=False))
            ]
            out.extend(leaves)
            break  # the first match decides (each default name matches one module of a SAM)
    return list(dict.fromkeys(out))


__all__ = ["CONVOLUTIONAL_FITS", "NATIVE_BUILDERS", "TARGETS", "block_regex", "check_fits", "leaf_modules_to_save"]
