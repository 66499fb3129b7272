"""SAM's encoder MLP with its wide hidden activations recomputed in backward instead of kept (same result).

Each ViT block's MLP widens 768 channels to 3,072: ``lin2(act(lin1(x)))``. Autograd keeps the GELU's input
``h = lin1(x)`` and, where ``lin2``'s weight trains, its input ``a = act(h)``: 48 MiB each per ViT-B block in
float32 (4,096 tokens x 3,072), the largest activations a block keeps (ViT-B LoRA: 0.56 of the encoder's
1.68 GiB). Both are cheap functions of tensors that are kept anyway or are 4x narrower:

- ``a`` is recomputed from ``h`` (one elementwise GELU, ~50 ms per ViT-B block on 2 CPU cores);
- ``h`` is recomputed from the block input ``x`` (one ``lin1`` matmul, ~0.1 s; ``x``, 12 MiB, is kept by
  autograd anyway where ``lin1``'s weight trains).

:class:`SamRecomputedMLPBlock` does this with ``torch.autograd.graph.saved_tensors_hooks``: what autograd would
save for ``h`` and ``a`` is replaced by a recipe, and unpacking the recipe in backward reruns ``lin1`` / ``act``
in the forward's autocast state. Gradients are autograd's own (same ops, same inputs: bit-identical values);
only memory and time change. It applies where ``lin1`` is a plain ``nn.Linear`` (an adapter wrapping it, e.g.
with dropout, would not rerun identically) and grad mode is on; otherwise the block runs transformers' forward.
Not combined with encoder checkpointing (``checkpoint_encoder``), which recomputes the whole block already.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import SamMLPBlock


class _Recipes:
    """The pack / unpack hooks of one MLP call: ``h`` and ``a`` are saved as recipes (see the module docstring)."""

    def __init__(self, block: SamMLPBlock, x: torch.Tensor, recompute_hidden: bool) -> None:
        self.lin1, self.act, self.recompute_hidden = block.lin1, block.act, recompute_hidden
        self.x: torch.Tensor | None = x
        # autograd's own version check does not see `x` through a recipe: this one replaces it
        self.x_version = x._version
        device = x.device.type
        # backward runs outside the forward's autocast: the recomputation re-enters it, so h comes out in the same dtype
        self.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.hidden: torch.Tensor | None = None  # the forward's h and a, to recognise them (dropped after it)
        self.activation: torch.Tensor | None = None
        self.hidden_is_recipe = False
        self.kept_hidden: torch.Tensor | None = None  # h where autograd keeps it itself (recompute_hidden off)
        self.stash: torch.Tensor | None = None  # h rebuilt for a, until the GELU's backward (next) takes it

    def pack(self, tensor: torch.Tensor) -> Any:
        # the GELU saves h; lin2 saves a only where its weight trains; everything else (x, weights) is saved as usual
        if self.hidden is not None and _view_of(tensor, self.hidden):
            if self.recompute_hidden:
                self.hidden_is_recipe = True
                return ("hidden", self, _layout(tensor, self.hidden))
            self.kept_hidden = self.hidden
        elif self.activation is not None and _view_of(tensor, self.activation):
            return ("activation", self, _layout(tensor, self.activation))
        return tensor

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        kind, recipes, (size, stride, offset) = packed
        # as_strided: autograd may have saved a reshaped view (a matmul's 2-d input), which must come back as that view
        return recipes.rebuild(kind).as_strided(size, stride, offset)

    def finish_forward(self) -> None:
        """Drop the forward's references: only what a recipe needs stays (``x``, unless ``h`` is kept)."""
        self.hidden = self.activation = None
        if self.kept_hidden is not None:
            # h is kept, so a is rebuilt from it and x is not needed here (autograd still holds its own reference)
            self.x = None

    def rebuild(self, kind: str) -> torch.Tensor:
        if kind == "hidden":
            # taken once: the stash is cleared so the rebuilt h is freed right after the GELU's backward
            hidden, self.stash = (self.stash, None) if self.stash is not None else (self._hidden(), None)
            return hidden
        hidden = self.kept_hidden if self.kept_hidden is not None else self._hidden()
        if self.hidden_is_recipe:
            self.stash = hidden  # lin2's backward runs before the GELU's, which needs the same h
        with self._forward_state():
            return self.act(hidden)

    def _hidden(self) -> torch.Tensor:
        if self.x is None or self.x._version != self.x_version:
            raise RuntimeError("the MLP input kept for recomputation was modified in place after the forward")
        with self._forward_state():
            # F.linear on lin1's own parameters, outside any hook: the same op and inputs as the forward's call
            return F.linear(self.x, self.lin1.weight, self.lin1.bias)

    def _forward_state(self) -> torch.autocast:
        device, enabled, dtype = self.autocast
        return torch.autocast(device, dtype=dtype, enabled=enabled)


def _view_of(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` shows exactly ``base``'s (contiguous) data: ``base`` itself or a reshape of it, as a
    matmul saves its 3-d input (autograd may also hand the hook another Python object for the same tensor)."""
    return view is base or (
        # same storage, offset and element count, both contiguous: the same data in the same order
        view.dtype == base.dtype and view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        and view.storage_offset() == base.storage_offset() and view.numel() == base.numel()
        and view.is_contiguous() and base.is_contiguous()
    )


def _layout(view: torch.Tensor, base: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``view``'s size, stride and offset relative to ``base``, to rebuild it on the recomputed tensor."""
    return tuple(view.shape), view.stride(), view.storage_offset() - base.storage_offset()


class SamRecomputedMLPBlock(SamMLPBlock):
    """``SamMLPBlock`` whose hidden activations are recomputed in backward; see the module docstring.

    Switch an existing module with ``module.__class__ = SamRecomputedMLPBlock`` (:func:`set_mlp_recompute`).
    ``recompute_hidden`` (class attribute, overridable per module): also rebuild ``h`` from the block input
    (one more ``lin1`` matmul per block in backward); off: only ``a`` is rebuilt, from the kept ``h``.
    """

    recompute_hidden: bool = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # no grad: nothing is saved; an adapter around lin1 (not a plain Linear) might not rerun identically
        if not torch.is_grad_enabled() or type(self.lin1) is not nn.Linear:
            return super().forward(hidden_states)
        recipes = _Recipes(self, hidden_states, self.recompute_hidden)
        with torch.autograd.graph.saved_tensors_hooks(recipes.pack, recipes.unpack):
            hidden = self.lin1(hidden_states)
            # set after lin1 ran: its own saved tensors (x, the weight) are packed as usual
            recipes.hidden = hidden
            activation = self.act(hidden)
            recipes.activation = activation
            out = self.lin2(activation)
        recipes.finish_forward()
        return out


def set_mlp_recompute(encoder: nn.Module, enabled: bool, recompute_hidden: bool = True) -> int:
    """Switch every ``SamMLPBlock`` under ``encoder`` to :class:`SamRecomputedMLPBlock` (``enabled``) or back;
    returns how many modules changed class. Exact either way (same parameters, same state dict)."""
    changed = 0
    for module in encoder.modules():
        if enabled and type(module) is SamMLPBlock:
            module.__class__ = SamRecomputedMLPBlock
            changed += 1
        elif not enabled and type(module) is SamRecomputedMLPBlock:
            module.__class__ = SamMLPBlock
            changed += 1
        # also on modules switched earlier, so one call sets recompute_hidden for the whole encoder
        if isinstance(module, SamRecomputedMLPBlock):
            module.recompute_hidden = recompute_hidden
    return changed


__all__ = ["SamRecomputedMLPBlock", "set_mlp_recompute"]
