"""What every SAM tuner shares: the config defaults, SAM checks, and exact merge bookkeeping.

Each method still lives in its own folder (`config.py`, `layer.py`, `model.py`) like peft's tuners; this
module holds only the pieces that would otherwise be written ten times.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    check_adapters_to_merge,
    check_target_module_exists,
)
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from ..modeling.unetr import (
    ATTRIBUTE_NAME as UNETR_MODULE_NAME,  # where attach_unetr puts the AIS decoder
)

# The prompt encoder and mask decoder (and the UNETR decoder, when the model carries one: peft skips names a
# model does not have) always train and are saved with the adapter, as every method of the paper does. The prompt
# encoder is listed by its trainable children: its `shared_embedding` is the same module as SAM's
# `shared_image_embedding`, a fixed random Fourier basis (a buffer in the original SAM) that must stay frozen.
# (peft matches `modules_to_save` by name suffix and cannot wrap a ModuleList, hence the four point embeddings
# of SAM's prompt encoder: positive, negative and the two box corners. SAM 2 keeps the four in one
# nn.Embedding of the same name, so a list is translated to the model's layout by `modules_to_save_for`.)
# SAM 2's mask decoder includes `conv_s0`/`conv_s1` (the high-resolution skips, applied to the image features)
# and the object-score head: all of it trains. SAM 2's `no_memory_embedding` (a model-level parameter added to
# the image features: the video-memory stand-in for a single image) is no module, so it stays frozen with the
# image encoder in every method but Full FT.
POINT_EMBED = "prompt_encoder.point_embed"
SAM_MODULES_TO_SAVE: tuple[str, ...] = (
    *(f"{POINT_EMBED}.{i}" for i in range(4)),
    "prompt_encoder.not_a_point_embed",
    "prompt_encoder.mask_embed",
    "prompt_encoder.no_mask_embed",
    "mask_decoder",
    UNETR_MODULE_NAME,
)

# Block-level module paths of SAM image encoders: `vision_encoder.layers.<i>` in transformers' ViT (SamModel,
# SamHQModel), `vision_encoder.layers.<stage>.blocks.<j>` in LiteMedSAM's TinyViT (hf_sam_peft.modeling.tiny_vit),
# `vision_encoder.backbone.blocks.<i>` in SAM 2's Hiera (transformers' Sam2Model) and
# `vision_encoder.backbone.layers.<i>` in SAM 3's ViT (Sam3TrackerModel). EdgeTAM's RepViT has no such blocks.
_INDEX = r"\d+"


def encoder_blocks(layers: Optional[list[int]] = None) -> str:
    """The regex of an image-encoder block path (only blocks `layers`, when given: the `i` that `layers` names)."""
    index = _INDEX if layers is None else "(?:" + "|".join(str(int(i)) for i in layers) + ")"
    # `(?:\.blocks\.\d+)?`: a TinyViT stage index selects every block of that stage
    return rf"vision_encoder\.(?:layers\.{index}(?:\.blocks\.\d+)?|backbone\.(?:blocks|layers)\.{index})"


ENCODER_BLOCKS = encoder_blocks()

# Module names inside one encoder block, for all encoders (a name absent in one encoder matches nothing there).
BLOCK_NORMS: tuple[str, ...] = ("layer_norm1", "layer_norm2", "attn.norm", "mlp.norm")  # ViT, Hiera | TinyViT
BLOCK_LINEARS: tuple[str, ...] = (
    "attn.qkv", "attn.proj",
    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",  # SAM 3's ViT (and its fc1/fc2)
    "mlp.lin1", "mlp.lin2",  # ViT
    "mlp.fc1", "mlp.fc2",  # TinyViT
    "mlp.proj_in", "mlp.proj_out",  # Hiera
    # Hiera's first block of stages 2-4 (dim -> dim_out, pooled query) projects its residual with a block-level
    # Linear `proj`. SAM's Bias Tune and SSF cover every Linear and LayerNorm of a block, so it is included there
    # (micro-sam's BiasSurgery likewise trains every bias of a block); Attn Tune (attention only) and LN Tune
    # (norms only) leave it alone.
    "proj",
)


# `layers` (every encoder tuner): the index i of `vision_encoder.layers.<i>` (a ViT block; a TinyViT stage) or of
# `vision_encoder.backbone.blocks.<i>` (a Hiera block), i.e. peft's `layers_to_transform` with this
# `layers_pattern` (peft reads it as a regex and takes the first index after it). Our regex for the same index.
# (`layers` also matches SAM 3's `backbone.layers`.)
LAYERS_PATTERN = r"(?:layers|backbone\.blocks)"
# The trailing `\.` requires a module inside the block: the block path itself yields None (targets are its children)
_BLOCK_INDEX = re.compile(r"(?:^|.*?\.)vision_encoder\.(?:layers|backbone\.blocks|backbone\.layers)\.(\d+)\.")


def encoder_regex(*suffixes: str, layers: Optional[list[int]] = None) -> str:
    """A peft `target_modules` regex matching `<block>.<suffix>` inside SAM's image encoder blocks (only the
    blocks `layers`, resolved indices, when given: written into the regex, see `hf_sam_peft.tuners.native`)."""
    alternatives = "|".join(re.escape(s) for s in suffixes)
    return rf"^(.*\.)?{encoder_blocks(layers)}\.({alternatives})$"


# Image-encoder families (`encoder_family`): which blocks a tuner finds and which methods fit (tuners.native)
VIT, TINY_VIT, HIERA, SAM3_VIT, REPVIT = "vit", "tiny_vit", "hiera", "sam3_vit", "repvit"


def encoder_family(model: nn.Module) -> str:
    """The family of `model`'s image encoder: SAM's / SAM-HQ's ViT, LiteMedSAM's TinyViT, SAM 2's Hiera, SAM 3's
    ViT (split q/k/v projections, rotary positions) or EdgeTAM's convolutional RepViT."""
    encoder = find_image_encoder(model)
    # by model_type, not structure: EdgeTAM's backbone is transformers' timm wrapper, with neither `layers` nor
    # `blocks`, so the structural tests below would take it for SAM 3's ViT
    if getattr(getattr(model, "config", None), "model_type", None) == "edgetam":
        return REPVIT
    if hasattr(encoder, "layers"):
        return TINY_VIT if hasattr(encoder.layers[0], "blocks") else VIT
    return HIERA if hasattr(encoder.backbone, "blocks") else SAM3_VIT


def modules_to_save_for(model: Optional[nn.Module], names: Optional[list[str]]) -> Optional[list[str]]:
    """`names` in `model`'s prompt-encoder layout: SAM's four `point_embed.<i>` or SAM 2's one `point_embed`.

    peft matches `modules_to_save` by name suffix, so no single list fits both: `prompt_encoder.point_embed` is a
    ModuleList in SAM (which peft cannot wrap) and the embedding itself in SAM 2. Other names are kept as given.
    """
    point_embed = getattr(getattr(model, "prompt_encoder", None), "point_embed", None)
    if names is None or point_embed is None:
        return names
    per_index = re.compile(rf"^{re.escape(POINT_EMBED)}\.\d+$")
    if isinstance(point_embed, nn.ModuleList):  # SAM: one entry per embedding
        expand = lambda n: [f"{POINT_EMBED}.{i}" for i in range(len(point_embed))] if n == POINT_EMBED else [n]
        out = [m for n in names for m in expand(n)]
    else:  # SAM 2: the one nn.Embedding
        out = [POINT_EMBED if per_index.match(n) else n for n in names]
    return list(dict.fromkeys(out))


def default_modules_to_save(model: Optional[nn.Module] = None) -> list[str]:
    """The prompt encoder's trainable parts, the mask decoder and the UNETR decoder (in `model`'s layout; SAM's)."""
    return modules_to_save_for(model, list(SAM_MODULES_TO_SAVE))


def check_layers(layers: Any, num_layers: Optional[int] = None) -> Optional[list[int]]:
    """`layers` (an int or a list of ints; None: every block) as a sorted list of encoder layer indices.

    Without `num_layers` (a config built without a model) negative indices stay as given: they count from the
    end of the encoder (-1 = last) and are resolved against the model by `apply_method` or `get_peft_model`.
    """
    if layers is None:
        return None
    # bool is an int subclass: `layers=True` must be an error, not block 1
    items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if (
        not isinstance(items, (list, tuple))
        or not items
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in items)
    ):
        raise ValueError(f"layers must be an int or a non-empty list of ints (encoder layer indices), got {layers!r}")
    if num_layers is not None:
        bad = [i for i in items if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"layers {bad} out of range for an image encoder of {num_layers} layers "
                f"(0..{num_layers - 1}, or -{num_layers}..-1 from the end)"
            )
        items = [i % num_layers for i in items]
    # after resolving, so that -1 and num_layers - 1 count as the same block
    if len(set(items)) != len(items):
        raise ValueError(f"layers names a block twice: {layers!r}")
    return sorted(items)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """What `layers` indexes: `vision_encoder.layers` (ViT blocks; TinyViT stages), SAM 2's Hiera blocks or
    SAM 3's ViT blocks; a one-line error for EdgeTAM's RepViT, which has no transformer blocks."""
    encoder = find_image_encoder(model)
    layers = getattr(encoder, "layers", None)
    if layers is not None:
        return layers
    backbone = encoder.backbone
    for name in ("blocks", "layers"):
        if isinstance(getattr(backbone, name, None), nn.ModuleList):
            return getattr(backbone, name)
    raise ValueError(
        f"layers: {type(model).__name__}'s image encoder ({type(backbone).__name__}, convolutional) has no "
        "transformer blocks to index; leave layers unset"
    )


def num_encoder_layers(model: nn.Module) -> int:
    """How many encoder layers `layers` can name (ViT or Hiera blocks; TinyViT stages)."""
    return len(encoder_layers(model))


def encoder_layer_index(key: str) -> Optional[int]:
    """The `i` of `vision_encoder.layers.<i>.` (or `vision_encoder.backbone.blocks.<i>.`) in a module name.

    None outside the encoder's layers."""
    match = _BLOCK_INDEX.match(key)
    return int(match.group(1)) if match else None


@dataclass
class SamTunerConfig(PeftConfig):
    """Fields shared by all SAM tuner configs (a subclass sets `peft_type` and its own defaults).

    `layers`: adapt only the targets inside `vision_encoder.layers.<i>` for these i (ViT: block i; TinyViT:
    stage i, i.e. all its `blocks.<j>`; SAM 2: `vision_encoder.backbone.blocks.<i>`), an int or a list; negative
    counts from the end and is resolved against the model when the adapter is injected (the saved config then
    holds the resolved indices). None: all.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules of the image encoder to adapt (regex or list of names)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to leave untouched (regex or list of names)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default_factory=default_modules_to_save,
        metadata={
            "help": "Modules trained fully and saved with the adapter: SAM's prompt encoder and mask decoder "
            "(translated to the model's prompt-encoder layout when the adapter is injected)."
        },
    )
    # Adapters in some blocks only (the paper's suggestion: the last ones, so that backward stops at the first
    # adapted block), as micro-sam's `attention_layers_to_update` (computational-cell-analytics/micro-sam@6fd6e50,
    # micro_sam/models/peft_sam.py L164-201: every encoder parameter frozen, then only blocks in the list wrapped;
    # later versions add `start_layer` for "late LoRA"). Same meaning as peft's `layers_to_transform` with
    # `layers_pattern=LAYERS_PATTERN`, which peft ignores for a regex `target_modules` (ours), hence our own field,
    # applied in `SamTunerModel._check_target_module_exists`.
    layers: Optional[Union[int, list[int]]] = field(
        default=None,
        metadata={
            "help": "Encoder layers to adapt: the i of `vision_encoder.layers.<i>` (a ViT block, a TinyViT stage) "
            "or of `vision_encoder.backbone.blocks.<i>` (a SAM 2 Hiera block); an int or a list, negative counts "
            "from the end; None: all."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.layers)
        # as peft's own configs do: peft reads a str as one regex (full match), a set as module-name suffixes
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, (list, tuple)):
            raise TypeError(f"modules_to_save must be a list of module names, got {type(self.modules_to_save).__name__}")


def find_image_encoder(model: nn.Module) -> nn.Module:
    """The image encoder of a SAM (ViT, TinyViT), SAM-HQ (ViT), SAM 2 (Hiera), SAM 3 tracker (SAM 3's ViT) or
    EdgeTAM (RepViT) model; a one-line error for anything else."""
    encoder = getattr(model, "vision_encoder", None)
    backbone = getattr(encoder, "backbone", None)
    blocks = [getattr(backbone, name, None) for name in ("blocks", "layers")]
    edgetam = getattr(getattr(model, "config", None), "model_type", None) == "edgetam" and backbone is not None
    if encoder is None or not (
        hasattr(encoder, "layers") or any(isinstance(b, nn.ModuleList) for b in blocks) or edgetam
    ):
        raise ValueError(
            f"model must be a SAM model with an image encoder at `.vision_encoder` (e.g. transformers.SamModel, "
            f"Sam2Model, SamHQModel, Sam3TrackerModel or EdgeTamModel), got {type(model).__name__}"
        )
    return encoder


class SamTunerModel(BaseTuner):
    """Base of our tuners: checks the model is a SAM and creates/updates `tuner_layer_cls` layers."""

    target_module_mapping: dict[str, Any] = {}
    # Whether the adapter's math can be folded into the base weights (AdaptFormer's branch cannot).
    mergeable: bool = True

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> Any:
        """peft's matching, then `layers`: only modules inside the chosen encoder layers."""
        found = check_target_module_exists(peft_config, key)
        layers = getattr(peft_config, "layers", None)
        # returned as is (an `_ExcludedModule` is falsy): peft's inject_adapter tells excluded from unmatched by type
        if not found or isinstance(found, _ExcludedModule) or layers is None:
            return found
        # None (outside the encoder's blocks) is in no list: with `layers` set, nothing else is adapted
        return encoder_layer_index(key) in layers

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        find_image_encoder(model)
        # Freeze Encoder wraps no layer (and takes no `layers`): there is nothing to resolve or match
        if config.target_modules == DUMMY_TARGET_MODULES:
            return
        # negative indices resolved once against this model, so the saved config names the blocks it adapted
        config.layers = check_layers(config.layers, num_encoder_layers(model))
        # checked here, before peft injects anything, so the error can show how this model names its modules
        if not any(self._check_target_module_exists(config, name) for name, _ in model.named_modules()):
            qkv0 = re.compile(r"(layers|blocks)\.0\.attn\.qkv$")
            example = next((n for n, _ in model.named_modules() if qkv0.search(n)), "")
            raise ValueError(
                f"target_modules={config.target_modules!r}"
                + (f" in layers {config.layers}" if config.layers is not None else "")
                + f" matches no module of {type(model).__name__}"
                + (f" (image-encoder modules are named like {example!r})" if example else "")
            )

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if peft_config.target_modules is None:
            raise ValueError(f"{type(peft_config).__name__}.target_modules must name modules of the image encoder")
        # in place, before peft wraps `modules_to_save` (every injection path: new, added or loaded adapters), so
        # that SAM's default list also fits SAM 2 and the saved config names what was wrapped
        peft_config.modules_to_save = modules_to_save_for(self.model, peft_config.modules_to_save)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        kwargs = self._layer_kwargs(adapter_name, peft_config, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, **kwargs)
            return
        new_module = self.tuner_layer_cls(target, adapter_name, peft_config, **kwargs)
        if adapter_name not in self.active_adapters:
            # an added (not active) adapter starts frozen, as in peft's LoraModel._create_and_replace
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Our layers create their tensors on the base layer's device and dtype, so a plain swap is enough. (peft's
        # default also copies `.weight`, which SAM's prompt-encoder and mask-decoder modules do not have.)
        setattr(parent, child_name, new_module)

    def _layer_kwargs(self, adapter_name: str, config: PeftConfig, key: str = "") -> dict:
        """Extra arguments for the layer replacing module `key` (e.g. parameters shared across layers)."""
        return {}

    def _check_merge_allowed(self) -> None:
        if not self.mergeable:
            peft_type = next(iter(self.peft_config.values())).peft_type
            raise ValueError(f"{peft_type.value} adapters add a non-linear branch and cannot be merged into the base weights")
        super()._check_merge_allowed()


class SamTunerLayer(nn.Module, BaseTunerLayer):
    """A wrapped base layer with per-adapter state and exact merge/unmerge.

    Subclasses implement `update_layer`, `adapted_forward` and (if mergeable) `merged_values`, which returns
    new values for some of the base layer's parameters. Merging copies them in and keeps the originals, so
    unmerging restores the base exactly.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PeftConfig, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        # one entry per merged adapter, in merge order: unmerge pops them LIFO, so each restore is exact
        self._merge_backup: list[dict[str, torch.Tensor]] = []
        self.update_layer(adapter_name, config, **kwargs)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    # --- to implement -------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: PeftConfig, **kwargs: Any) -> None:
        raise NotImplementedError

    def adapted_forward(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def merged_values(self, adapter_name: str, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values for base-layer parameters (by name) that fold `adapter_name` in."""
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")

    # --- shared behaviour ---------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            # as peft's LoRA Linear.forward: a disabled adapter must not stay folded into the base weights
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if self.merged:
            return self.base_layer(*args, **kwargs)
        # an active adapter may not wrap this layer (other targets or `layers`): then the base runs alone
        active = [a for a in self.active_adapters if a in self._get_available_adapters()]
        if not active:
            return self.base_layer(*args, **kwargs)
        if len(active) > 1:
            raise ValueError(f"{type(self).__name__} runs one adapter at a time, got active adapters {active}")
        return self.adapted_forward(active[0], *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        params = dict(base.named_parameters())
        for name in adapter_names:
            if name not in self._get_available_adapters():
                continue
            # re-read per adapter: a second adapter folds into the weights the first one already changed
            current = {k: p.data for k, p in params.items()}
            new = self.merged_values(name, current)
            # checked before this adapter writes anything: a failed safe merge leaves it unmerged
            if safe_merge and not all(torch.isfinite(v).all() for v in new.values()):
                raise ValueError(f"merging adapter {name!r} produced non-finite weights")
            self._merge_backup.append({k: params[k].data.clone() for k in new})
            with torch.no_grad():
                for k, v in new.items():
                    params[k].data.copy_(v.to(params[k].dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        params = dict(self.get_base_layer().named_parameters())
        while self.merged_adapters:
            self.merged_adapters.pop()
            backup = self._merge_backup.pop()
            with torch.no_grad():
                for k, v in backup.items():
                    params[k].data.copy_(v)


def declare_untied_embeddings(model: nn.Module) -> None:
    """Say ``tie_word_embeddings=False`` on a model that ties none and cannot name its input embeddings.

    Why: peft looks for weights tied to the input embeddings before it injects any adapter
    (``peft.utils.other._get_module_names_tied_with_embedding``), calling ``model.get_input_embeddings()``, which
    ``EdgeTamModel`` does not implement (transformers raises NotImplementedError). peft skips that search when the
    config says tying is off; EdgeTAM ties nothing (``_tied_weights_keys`` is empty), so saying so is true and
    peft can wrap the model (``apply_method`` and ``load_adapter`` call this; plain peft on EdgeTAM needs it first).
    """
    if getattr(model, "_tied_weights_keys", None):
        return
    try:
        model.get_input_embeddings()
    except NotImplementedError:
        model.config.tie_word_embeddings = False
