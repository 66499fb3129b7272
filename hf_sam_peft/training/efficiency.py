"""Deprecated location of the speed options: they are :mod:`hf_sam_peft.speed` now.

Every public name this module offered resolves to its successor with a ``DeprecationWarning`` that names it.
``last_blocks_overrides`` (a method change, not a speed option) has no successor: every method takes
``layers`` (``apply_method(model, "lora", layers=range(-k, 0))``), which it spelt out.
"""

from __future__ import annotations

from typing import Any

from hf_sam_peft.deprecation import moved_names, warn_moved

_MOVED = {
    **{name: f"hf_sam_peft.speed.{name}" for name in (
        "AUTOCAST_DTYPES", "PRESETS", "EfficiencyOptions", "EmbeddingCache", "argument_fields", "arguments_class",
        "autocast_context", "checkpoint_option", "drop_input_require_grads", "encoder_embeddings",
        "encoder_is_trainable", "maybe_checkpoint", "none_option", "option", "options_from_arguments",
        "optimizer_kwargs", "prepare_model", "resolve_autocast_dtype", "resolve_checkpoint_encoder",
        "resolve_mlp_recompute", "set_decoder_attention", "set_encoder_attention", "cpu_runtime",
    )},
    **{name: f"hf_sam_peft.speed.options.{name}" for name in (
        "ATTENTION_KINDS", "DECODER_ATTENTION_KINDS", "MLP_RECOMPUTE_KINDS")},
}
__getattr__ = moved_names(__name__, _MOVED)


def last_blocks_overrides(method: str, n_layers: int, k: int) -> dict[str, Any]:
    """Deprecated: ``apply_method(model, method, layers=list(range(-k, 0)))``. The ``apply_method`` overrides that
    put ``method``'s adapters in the last ``k`` of ``n_layers`` encoder blocks: ``{"layers": [n_layers - k, ...]}``."""
    # lazy: the deprecated path alone needs the method table
    from hf_sam_peft.methods import get_method
    from hf_sam_peft.tuners import FreezeEncoderConfig

    warn_moved(__name__, "last_blocks_overrides", f"apply_method(model, {method!r}, layers=list(range(-{k}, 0)))")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if not isinstance(k, int) or not 1 <= k <= n_layers:
        raise ValueError(f"k must be an int in [1, {n_layers}], got {k!r}")
    if get_method(method).build in (None, FreezeEncoderConfig):
        raise ValueError(f"method {method!r} has no per-block encoder adapters to restrict")
    return {"layers": list(range(n_layers - k, n_layers))}
