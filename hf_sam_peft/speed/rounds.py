"""How the prompt rounds of the interactive objective are executed: three ways that compute the same losses.

The loop over rounds is written once, :func:`hf_sam_peft.training.interactive.interactive_rounds`. It hands each
round to a :class:`RoundExecution` as one function of the image embeddings (``round_fn(embeddings)``: the
round's decoder call, upscaling and loss, returning the round's output) and draws the next round's corrections
from what ``run`` returns. The executions differ only in what stays alive until the training loop's backward:

- :class:`KeptGraphs`: ``round_fn`` is called and every round's graph is kept until ``loss.backward()`` — the
  reference's way (``SamTrainer._compute_iterative_loss``, ``micro_sam/training/sam_trainer.py``).
- :class:`CheckpointedRounds`: the round is recomputed in backward instead of kept (activation checkpointing):
  the 8 rounds' decoder graphs and full-size masks otherwise stay alive at once.
- :class:`BackwardPerRound`: the round's share of the loss is differentiated as soon as the round is done and
  its graph freed; :meth:`~RoundExecution.finish` adds a surrogate term carrying the summed gradients, so the
  encoder's backward runs once, in ``loss.backward()``. One round's graph is alive at a time; nothing is
  recomputed.

:func:`round_execution` picks one from the :class:`~hf_sam_peft.speed.options.EfficiencyOptions`
(``backward_per_round``, ``checkpoint_rounds``) and opens the decoder's shared position shifts
(``fuse_decoder_projections``) around the rounds where the execution can use them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from hf_sam_peft.modeling.mask_decoder import SharedPositions, shared_position_shifts
from hf_sam_peft.sam_forward.forward import unwrap_sam
from hf_sam_peft.sam_forward.kinds import ImageEmbeddings, embedding_levels, from_levels, main_embedding
from hf_sam_peft.speed.encoder import maybe_checkpoint
from hf_sam_peft.speed.options import EfficiencyOptions


class RoundResult(Protocol):
    """What a round function returns: the round's loss (``dice + mse``, a 0-d tensor; None when the round
    computes no loss) and a copy of itself without graph."""

    @property
    def loss(self) -> torch.Tensor | None: ...

    def detach(self) -> RoundResult: ...


# one round of the objective as a function of the image embeddings (the execution supplies them)
RoundFn = Callable[[ImageEmbeddings], RoundResult]


class RoundExecution:
    """How each round runs (:meth:`run`) and what the rounds' mean loss becomes at the end (:meth:`finish`).

    ``embeddings``: the batch's image embeddings every round decodes from (``encode_images``'s); ``n_rounds``:
    how many rounds the loss averages over; ``shared``: the decoder's position shifts made once for all rounds
    (:func:`~hf_sam_peft.modeling.mask_decoder.shared_position_shifts`), or None.
    """

    def __init__(self, model: nn.Module, embeddings: ImageEmbeddings, n_rounds: int,
                 shared: SharedPositions | None = None) -> None:
        if not isinstance(n_rounds, int) or n_rounds < 1:
            raise ValueError(f"n_rounds must be a positive int, got {n_rounds!r}")
        self.model = model
        self.embeddings = embeddings
        self.n_rounds = n_rounds
        self.shared = shared

    def run(self, round_fn: RoundFn) -> RoundResult:
        """The round's result; what the next round's corrections are drawn from."""
        raise NotImplementedError

    def finish(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss from the rounds' mean ``loss`` (what the training loop calls ``backward`` on)."""
        return loss


class KeptGraphs(RoundExecution):
    """Each round's graph stays alive until the loss's backward (the reference's execution)."""

    def run(self, round_fn: RoundFn) -> RoundResult:
        return round_fn(self.embeddings)


class CheckpointedRounds(RoundExecution):
    """Each round's decoder call, upscaling and loss are recomputed in backward instead of kept.

    The embeddings enter the checkpointed function as tensor arguments (their levels), so backward's
    recomputation reaches the encoder's graph through them. ``round_fn`` must bind its round's inputs by value
    (a ``functools.partial``, not a closure over loop variables): the recomputation runs after the loop has
    moved on to later rounds. No shared position shifts: their graph would be recomputed after it was used.
    """

    def __init__(self, model: nn.Module, embeddings: ImageEmbeddings, n_rounds: int,
                 shared: SharedPositions | None = None) -> None:
        if shared is not None:
            raise ValueError("CheckpointedRounds cannot use shared position shifts (shared must be None)")
        super().__init__(model, embeddings, n_rounds)

    def run(self, round_fn: RoundFn) -> RoundResult:
        embeddings = self.embeddings
        return maybe_checkpoint(True, lambda *levels: round_fn(from_levels(levels, embeddings)),
                                *embedding_levels(embeddings))


class BackwardPerRound(RoundExecution):
    """Each round's share of the loss, ``loss / n_rounds``, is differentiated at once and its graph freed.

    The gradients go into the trainable parameters outside the image encoder and into the embeddings (and the
    shared position shifts, when given with ``detach=True``), which the rounds see as detached leaves. The
    summed gradients ``g`` ride on a surrogate ``Σ (p · g_p) + Σ (embeddings · g_emb)`` that :meth:`finish`
    adds with value zero, so ``loss.backward()`` (inside whatever scaling the training loop applies) fills
    ``p.grad`` and runs the encoder's backward once. Gradients equal :class:`KeptGraphs`' up to float summation
    order. Not under fp16 autocast: that needs the loop's loss scaling before any backward, or the round
    gradients underflow (:func:`execution_kind` falls back to ``checkpoint_rounds``' choice).
    """

    def __init__(self, model: nn.Module, embeddings: ImageEmbeddings, n_rounds: int,
                 shared: SharedPositions | None = None) -> None:
        super().__init__(model, embeddings, n_rounds, shared)
        encoder_params = {id(p) for p in unwrap_sam(model).vision_encoder.parameters()}
        # SAM 2's conv_s0 / conv_s1 and no_memory_embedding act before the leaves (encode_images): their
        # gradient (None here) reaches them through the surrogate's embedding term, as the encoder's does
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_params]
        levels = embedding_levels(embeddings)
        leaves = [level.detach().requires_grad_(level.requires_grad) for level in levels]
        self._leaf_embeddings = from_levels(leaves, embeddings)
        self._device_type = leaves[0].device.type
        # the tensors differentiated per round, and beside each the graph tensor its summed gradient is sent into
        self._wrt = params + [leaf for leaf in leaves if leaf.requires_grad]
        self._sources = params + [level for level in levels if level.requires_grad]
        if shared is not None:
            for graph, detached in zip(shared.graph.tensors(), shared.leaves()):
                if detached.requires_grad:
                    self._wrt.append(detached)
                    self._sources.append(graph)
        self._sums: list[torch.Tensor | None] = [None] * len(self._wrt)

    def run(self, round_fn: RoundFn) -> RoundResult:
        result = round_fn(self._leaf_embeddings)
        if result.loss is None:
            raise ValueError("BackwardPerRound needs rounds that compute their loss (interactive_rounds(..., loss=True))")
        share = result.loss / self.n_rounds
        if share.requires_grad:
            # backward outside autocast, as loss.backward() runs it
            with torch.autocast(self._device_type, enabled=False):
                grads = torch.autograd.grad(share, self._wrt, allow_unused=True)
            self._sums = accumulate_gradients(self._sums, grads)
        return result.detach()  # this round's graph is freed here: nothing refers to it any more

    def surrogate(self) -> torch.Tensor:
        """``Σ x · g_x`` over the graph tensors with a summed round gradient (``g`` constant): its gradient is
        the rounds' gradients; a zero with a graph into the embeddings when no round had one."""
        terms = [(x * g.to(x.dtype)).sum() for x, g in zip(self._sources, self._sums) if g is not None]
        return torch.stack(terms).sum() if terms else main_embedding(self.embeddings).sum() * 0.0

    def finish(self, loss: torch.Tensor) -> torch.Tensor:
        surrogate = self.surrogate()
        # value: the loss; gradient: the rounds' (already differentiated) gradients
        return loss + (surrogate - surrogate.detach())


def accumulate_gradients(
    sums: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """``sums + grads`` item by item, None counting as zero, out of place (``grads`` may alias autograd's buffers).

    The additions go in one multi-tensor call: on a GPU one kernel per dtype instead of one per tensor (~950
    per training step of 8 rounds, ``benchmarks/host_syncs.py``); the same elementwise sums everywhere.
    """
    if len(sums) != len(grads):
        raise ValueError(f"sums and grads must be as long, got {len(sums)} and {len(grads)}")
    out = list(sums)
    both = []
    for i, (total, grad) in enumerate(zip(sums, grads)):
        if grad is not None and total is None:
            out[i] = grad
        elif grad is not None:
            both.append(i)
    if both:
        for i, total in zip(both, torch._foreach_add([sums[i] for i in both], [grads[i] for i in both])):
            out[i] = total
    return out


def fp16_autocast() -> bool:
    """Whether fp16 autocast is on (CPU or CUDA): round-wise backward would need the loop's loss scaling."""
    return any(
        torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16
        for kind in ("cpu", "cuda")
    )


def execution_kind(options: EfficiencyOptions | None) -> type[RoundExecution]:
    """The execution ``options`` ask for in the current grad / autocast mode (no graph: :class:`KeptGraphs`)."""
    if options is None or not torch.is_grad_enabled():
        return KeptGraphs
    if options.backward_per_round and not fp16_autocast():
        return BackwardPerRound
    return CheckpointedRounds if options.checkpoint_rounds else KeptGraphs


@contextlib.contextmanager
def round_execution(
    model: nn.Module, embeddings: ImageEmbeddings, options: EfficiencyOptions | None, n_rounds: int
) -> Iterator[RoundExecution]:
    """Within the block, the :class:`RoundExecution` for this step (:func:`execution_kind`).

    With ``fuse_decoder_projections`` the decoder's position shifts are made once, on entry, for every round
    (detached leaves for :class:`BackwardPerRound`); enter the block where autocast and grad mode are as for the
    rounds. Call :meth:`~RoundExecution.finish` inside the block.
    """
    kind = execution_kind(options)
    share = options is not None and options.fuse_decoder_projections and kind is not CheckpointedRounds
    if not share:
        yield kind(model, embeddings, n_rounds)
        return
    with shared_position_shifts(unwrap_sam(model), detach=kind is BackwardPerRound) as shared:
        yield kind(model, embeddings, n_rounds, shared=shared)


__all__ = [
    "BackwardPerRound", "CheckpointedRounds", "KeptGraphs", "RoundExecution", "RoundFn", "RoundResult",
    "accumulate_gradients", "execution_kind", "fp16_autocast", "round_execution",
]
