"""The interactive training forward of one batch (µSAM's iterative prompting) and its loss.

Per batch (``SamTrainer._compute_iterative_loss`` in ``micro_sam/training/sam_trainer.py``): the image encoder runs once and its graph is
kept, so every round's loss reaches the encoder. Objects are sampled per image (cut to the smallest count
of the batch); the first round gets the initial prompt (training alternates one positive point with
multimask output and a jittered box with a single mask), then each further round adds one positive and one
negative correction point from the errors of the best mask (highest predicted IoU), keeps the box, and with
probability ``mask_prob`` per image and round feeds the previous best low-res logits as mask input.

SAM's forward itself (SAM and SAM 2 alike: preprocessing, :class:`~hf_sam_peft.sam_forward.Frames` /
:class:`~hf_sam_peft.sam_forward.Prompts`, ``encode_images`` / ``decode``, ``unwrap_sam``, the seeded
``prompt_generator``) lives in :mod:`hf_sam_peft.sam_forward`, shared with evaluation; it is re-exported
here for the import paths that named it in this module before.

Deliberate deviations (mechanics, not science):

- Objects are flattened into the batch axis of the mask decoder (:func:`hf_sam_peft.sam_forward.decode`).
- Images without any object are left out of the loss (µSAM's loader never yields them); a batch with no
  object at all gives a zero loss.
- Under DDP the whole batch (encoder + all rounds) runs inside one forward call of the DDP wrapper
  (:func:`in_single_forward`), since DDP allows one forward per backward.
- Randomness comes from one explicit ``torch.Generator`` (see :func:`prompt_generator`) instead of the
  global NumPy / Python RNGs, so a resumed run replays the same prompts.

The rounds run in one loop, :func:`interactive_rounds`, beside micro-sam's ``_compute_iterative_loss``. How each
round is executed — graph kept until backward (the reference), recomputed in backward, or differentiated at
once — is the step's speed choice (:mod:`hf_sam_peft.speed.rounds`, from the ``EfficiencyOptions``): the losses
are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import nn

from hf_sam_peft.deprecation import moved_names, warn_moved
from hf_sam_peft.prompts import (
    boxes_from_masks,
    correction_points,
    sample_objects,
    sample_point_prompts,
)
# SAM's shared forward, re-exported: callers import decode / encode_images / unwrap_sam from this module too
from hf_sam_peft.sam_forward.forward import decode, encode_images, unwrap_sam  # noqa: F401
from hf_sam_peft.sam_forward.frames import Frames, Prompts
from hf_sam_peft.sam_forward.kinds import ImageEmbeddings, frame_of, main_embedding, map_embeddings
from hf_sam_peft.sam_forward.preprocess import postprocess_masks, transform_boxes, transform_coords  # noqa: F401
from hf_sam_peft.sam_forward.seeding import EVAL_STREAM, TRAIN_STREAM, prompt_generator  # noqa: F401
from hf_sam_peft.speed.encoder import EmbeddingCache, encoder_embeddings
from hf_sam_peft.speed.options import EfficiencyOptions
from hf_sam_peft.speed.resolve import autocast_context
from hf_sam_peft.speed.rounds import BackwardPerRound, CheckpointedRounds, KeptGraphs, RoundExecution, round_execution
from hf_sam_peft.training.losses import batch_round_loss

T = TypeVar("T")

@dataclass(frozen=True)
class PromptMode:
    """The initial prompt of a batch: ``n_pos``/``n_neg`` random points and/or the (jittered) box."""

    n_pos: int = 0
    n_neg: int = 0
    box: bool = False
    multimask: bool = False

    def __post_init__(self) -> None:
        if self.n_pos < 0 or self.n_neg < 0 or (self.n_pos + self.n_neg == 0 and not self.box):
            raise ValueError(f"a prompt mode needs points and/or a box, got {self}")


POINT_MODE = PromptMode(n_pos=1, multimask=True)
BOX_MODE = PromptMode(box=True)


def training_prompt_mode(step: int, point_multimask: bool = True) -> PromptMode:
    """µSAM's alternation: even steps one positive point (multimask), odd steps the box (single mask).

    ``point_multimask=False`` sends the point steps through the single-mask output: for bases trained on
    boxes only (LiteMedSAM), whose multimask outputs have no point skill to start from.
    """
    if step % 2:
        return BOX_MODE
    return POINT_MODE if point_multimask else replace(POINT_MODE, multimask=False)


def validation_prompt_modes(generator: torch.Generator | None = None, point_multimask: bool = True) -> dict[str, PromptMode]:
    """µSAM's four validation modes: point; box; 1-4 pos + 0-4 neg points; box + such points.

    µSAM picks one mode per validation batch by its index (``micro_sam/training/sam_trainer.py``,
    ``_get_prompt_and_multimasking_choices_for_val``); the trainer runs all four on every batch. Random point
    counts exclude the plain single positive point (the point mode covers it), as µSAM does. The point
    mode answers through the output training uses (``point_multimask``, see :func:`training_prompt_mode`).
    """
    modes = {"point": training_prompt_mode(0, point_multimask), "box": BOX_MODE}
    for name, box in (("points", False), ("box_points", True)):
        n_pos = int(torch.randint(1, 5, (1,), generator=generator, device=_device_of(generator)))
        low = 1 if (not box and n_pos == 1) else 0
        n_neg = int(torch.randint(low, 5, (1,), generator=generator, device=_device_of(generator)))
        modes[name] = PromptMode(n_pos=n_pos, n_neg=n_neg, box=box)
    return modes


def _device_of(generator: torch.Generator | None) -> torch.device | str:
    return generator.device if generator is not None else "cpu"


@dataclass
class RoundOutput:
    """One round: mask logits per image at input resolution ``(N, K, H_b, W_b)``, IoU predictions ``(B, N, K)``,
    the low-res logits ``(B, N, K, h', w')`` and, where the round computed its loss, ``dice`` and ``mse``."""

    index: int
    masks: list[torch.Tensor]
    iou_predictions: torch.Tensor
    low_res_masks: torch.Tensor
    prompts: Prompts
    dice: torch.Tensor | None = None
    mse: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor | None:
        """The round's loss, ``dice + mse`` (µSAM's mask loss plus IoU regression), or None."""
        return None if self.dice is None else self.dice + self.mse

    def detach(self) -> RoundOutput:
        """The same round without graph (prompts never carry one)."""
        def cut(t):
            return None if t is None else t.detach()

        return replace(self, masks=[m.detach() for m in self.masks], iou_predictions=self.iou_predictions.detach(),
                       low_res_masks=self.low_res_masks.detach(), dice=cut(self.dice), mse=cut(self.mse))

    def best_masks(self) -> list[torch.Tensor]:
        """Per image, the logits ``(N, H, W)`` of the mask with the highest predicted IoU."""
        best = self.iou_predictions.argmax(-1)
        return [m[torch.arange(m.shape[0], device=m.device), best[b]] for b, m in enumerate(self.masks)]


def in_single_forward(model: nn.Module, fn: Callable[[nn.Module], T]) -> T:
    """``fn(model)``; under DDP, ``fn(model.module)`` run *inside one* forward call of the DDP wrapper.

    The interactive loss calls the model once per round (and the encoder directly); DDP allows only one
    forward per backward and must see the loss to find this step's unused parameters (box embeddings in
    point mode, the mask embedding without mask input). So the wrapped module's ``forward`` is replaced,
    for one DDP call, by ``fn``; inside, the module's own ``forward`` is back in place.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return fn(model)
    inner = model.module

    def forward(*args, **kwargs):
        del inner.forward  # nested calls of the module use its real forward again
        return fn(inner)

    inner.forward = forward
    try:
        return model()
    finally:
        inner.__dict__.pop("forward", None)


def initial_prompts(
    targets: Sequence[torch.Tensor],
    frames: Frames,
    mode: PromptMode,
    box_jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> Prompts:
    """Sample ``mode``'s prompts for the objects ``targets[b]`` ``(N, H_b, W_b)`` and map them into the model frame."""
    prompts = Prompts()
    if mode.n_pos + mode.n_neg:
        pairs = [sample_point_prompts(t, mode.n_pos, mode.n_neg, generator) for t in targets]
        points = torch.stack([frames.coords(b, p) for b, (p, _) in enumerate(pairs)])
        prompts = prompts.add_points(points, torch.stack([lab for _, lab in pairs]))
    if mode.box:
        boxes = [boxes_from_masks(t, box_jitter, generator) for t in targets]
        prompts = replace(prompts, boxes=torch.stack([frames.boxes(b, x) for b, x in enumerate(boxes)]))
    return prompts



def _round(
    model: nn.Module,
    index: int,
    prompts: Prompts,
    multimask: bool,
    mask_inputs: torch.Tensor | None,
    use_mask: torch.Tensor | None,
    frames: Frames,
    targets: Sequence[torch.Tensor] | None,
    embeddings: ImageEmbeddings,
) -> RoundOutput:
    """One round: the decoder's masks from ``embeddings`` and the round's prompts, upscaled per image to its
    input size, and (``targets`` given) the round's loss, as ``SamTrainer._compute_loss`` computes it."""
    low, iou = decode(model, embeddings, prompts, multimask, mask_inputs, use_mask)
    low, iou = low.float(), iou.float()  # no-op in float32; under autocast the masks are upscaled in float32
    masks = [frames.upscale(b, low[b]) for b in range(low.shape[0])]
    output = RoundOutput(index, masks, iou, low, prompts)
    if targets is not None:
        output.dice, output.mse = batch_round_loss(masks, iou, targets)
    return output


def interactive_rounds(
    model: nn.Module,
    embeddings: ImageEmbeddings,
    targets: Sequence[torch.Tensor],
    frames: Frames,
    prompts: Prompts,
    *,
    n_rounds: int,
    multimask_first: bool,
    mask_prob: float = 0.0,
    generator: torch.Generator | None = None,
    loss: bool = False,
    execution: RoundExecution | None = None,
) -> Iterator[RoundOutput]:
    """Yield each round's predictions; between rounds add one positive + one negative correction point per object.

    The loop of ``SamTrainer._compute_iterative_loss`` (``micro_sam/training/sam_trainer.py``). Multimask output
    only in round 0 (and only if ``multimask_first``). Corrections come from the binarised best mask (logits > 0)
    at input resolution; with probability ``mask_prob`` per image and round the best low-res logits (detached)
    are the next round's mask input. They are drawn after the consumer has taken the round's output (the order
    ``generator`` is drawn from is fixed); none after the last round (µSAM draws them and drops them).

    ``loss``: each output carries its round's ``dice`` and ``mse`` (:func:`batch_round_loss`). ``execution``
    (:mod:`hf_sam_peft.speed.rounds`, built for these ``embeddings``): how each round runs — graph kept (the
    default), recomputed in backward, or differentiated at once; the losses are the same.
    """
    _check_rounds(n_rounds, mask_prob)
    if execution is None:
        execution = KeptGraphs(model, embeddings, n_rounds)
    elif execution.embeddings is not embeddings:
        raise ValueError("execution must be built for the embeddings passed to interactive_rounds")
    mask_inputs = use_mask = None
    for index in range(n_rounds):
        # a partial binds this round's inputs by value: a checkpointed round is recomputed in backward, after
        # the loop has moved prompts and mask inputs on to later rounds
        round_fn = functools.partial(
            _round, model, index, prompts, multimask_first and index == 0, mask_inputs, use_mask, frames,
            targets if loss else None,
        )
        output = execution.run(round_fn)
        yield output
        if index < n_rounds - 1:
            prompts, mask_inputs, use_mask = next_round_inputs(
                output.low_res_masks, output.iou_predictions, output.masks, targets, frames, prompts, mask_prob, generator
            )


def _check_rounds(n_rounds: int, mask_prob: float) -> None:
    if n_rounds < 1:
        raise ValueError(f"n_rounds must be >= 1, got {n_rounds}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")



@torch.no_grad()
def next_round_inputs(
    low: torch.Tensor,
    iou: torch.Tensor,
    masks: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    frames: Frames,
    prompts: Prompts,
    mask_prob: float,
    generator: torch.Generator | None,
) -> tuple[Prompts, torch.Tensor, torch.Tensor]:
    """The next round's prompts (+1 positive, +1 negative correction point per object) and mask inputs.

    Corrections come from the best mask (highest predicted IoU) at input resolution, binarised at 0: picked
    from ``masks``, this round's logits already upscaled per image ``(N, K, H, W)`` (for the loss).
    """
    best = iou.argmax(-1)
    gather = best[..., None, None, None].expand(-1, -1, 1, *low.shape[-2:])
    best_low = low.gather(2, gather)
    points, labels = [], []
    for b in range(low.shape[0]):
        full = masks[b]
        best_full = full.gather(1, best[b][:, None, None, None].expand(-1, 1, *full.shape[-2:]))[:, 0]
        p, lab = correction_points(best_full > 0, targets[b], generator)
        points.append(frames.coords(b, p))
        labels.append(lab)
    prompts = prompts.add_points(torch.stack(points), torch.stack(labels))
    mask_inputs = best_low.detach()
    if mask_prob in (0.0, 1.0):
        use_mask = torch.full((low.shape[0],), mask_prob == 1.0, device=low.device)
    else:
        use_mask = torch.rand(low.shape[0], generator=generator, device=_device_of(generator)) < mask_prob
    return prompts, mask_inputs, use_mask



def batch_objects(
    batch: dict[str, torch.Tensor], n_objects: int | None, generator: torch.Generator | None = None, frame: str = "pad"
) -> tuple[torch.Tensor, list[torch.Tensor], Frames]:
    """Images of the batch that hold objects, their sampled object masks ``(N, H_b, W_b)`` and their frames
    (``frame``: how the collator placed the images, :func:`hf_sam_peft.sam_forward.kinds.frame_of` the model)."""
    for key in ("pixel_values", "labels", "original_sizes", "reshaped_input_sizes"):
        if key not in batch:
            raise ValueError(f"batch must hold {key!r} (use SamInteractiveCollator), got keys {sorted(batch)}")
    sizes = batch["original_sizes"]
    labels = [batch["labels"][b, : int(h), : int(w)] for b, (h, w) in enumerate(sizes.tolist())]
    keep = torch.tensor([bool((lab != 0).any()) for lab in labels], dtype=torch.bool)
    frames = Frames(sizes, batch["reshaped_input_sizes"], int(batch["pixel_values"].shape[-1]), frame)
    kept = torch.nonzero(keep).flatten()
    if kept.numel() == 0:
        return kept, [], frames.select(kept)
    targets = sample_objects([labels[i] for i in kept.tolist()], n_objects, generator)
    return kept, targets, frames.select(kept)


def interactive_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    mode: PromptMode,
    *,
    n_objects: int | None = 25,
    n_rounds: int = 8,
    mask_prob: float = 0.5,
    box_jitter: float = 0.025,
    generator: torch.Generator | None = None,
    options: EfficiencyOptions | None = None,
    embedding_cache: EmbeddingCache | None = None,
    embeddings: ImageEmbeddings | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """µSAM's interactive loss of one batch, averaged over rounds, and its parts (detached).

    ``embeddings`` (``encode_images``'s: ``(B, C, h, w)``, or SAM 2's three maps): the batch's image embeddings
    when the caller already has them (validation scores several prompt modes on one encoder pass); by
    default the encoder runs here.

    Parts: ``dice_loss`` and ``iou_mse`` (mean over rounds), ``round_dice_loss`` ``(n_rounds,)``,
    ``n_objects`` (objects per image used). DDP-wrapped models are handled by :func:`in_single_forward`.
    ``options`` (:class:`~hf_sam_peft.speed.EfficiencyOptions`; None: the plain path) choose how the
    step runs (autocast, no-grad frozen encoder, checkpointed rounds), not what it computes. Model-side options
    (attention kernel, encoder checkpointing) are applied once by :func:`hf_sam_peft.speed.prepare_model`.
    """
    _check_rounds(n_rounds, mask_prob)  # before any work, also for a batch without objects
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return in_single_forward(model, lambda inner: interactive_loss(
            inner, batch, mode, n_objects=n_objects, n_rounds=n_rounds, mask_prob=mask_prob,
            box_jitter=box_jitter, generator=generator, options=options, embedding_cache=embedding_cache,
            embeddings=embeddings,
        ))
    with autocast_context(options, batch["pixel_values"].device):
        return _interactive_loss(
            model, batch, mode, n_objects, n_rounds, mask_prob, box_jitter, generator, options, embedding_cache, embeddings
        )


def _interactive_loss(model, batch, mode, n_objects, n_rounds, mask_prob, box_jitter, generator, options, embedding_cache, embeddings):
    # the steps of SamTrainer._interactive_train_iteration and _compute_iterative_loss (micro_sam/training/sam_trainer.py):
    # objects sampled and cut to the batch's smallest count, the encoder once, the first prompt, the rounds
    kept, targets, frames = batch_objects(batch, n_objects, generator, frame_of(model))
    kept = kept.to(batch["pixel_values"].device)
    if embeddings is None:
        embeddings = encoder_embeddings(model, batch["pixel_values"][kept], options, embedding_cache)
    else:
        embeddings = map_embeddings(lambda t: t[kept.to(t.device)], embeddings)
    if not targets or targets[0].shape[0] == 0:
        # zero, but connected to the embeddings' graph: backward() runs as for any batch (DDP, the Trainer)
        zero = main_embedding(embeddings).sum() * 0.0
        empty = torch.zeros((), device=zero.device)
        return zero, {"dice_loss": empty, "iou_mse": empty, "round_dice_loss": empty.repeat(n_rounds), "n_objects": empty}
    prompts = initial_prompts(targets, frames, mode, box_jitter, generator)
    with round_execution(model, embeddings, options, n_rounds) as execution:
        rounds = list(interactive_rounds(
            model, embeddings, targets, frames, prompts, n_rounds=n_rounds, multimask_first=mode.multimask,
            mask_prob=mask_prob, generator=generator, loss=True, execution=execution,
        ))
        dice = torch.stack([r.dice for r in rounds])
        mse = torch.stack([r.mse for r in rounds])
        # µSAM sums the rounds' losses and divides by their number (loss / num_subiter)
        loss = execution.finish((dice + mse).mean())
    parts = {
        "dice_loss": dice.mean().detach(),
        "iou_mse": mse.mean().detach(),
        "round_dice_loss": dice.detach(),
        "n_objects": torch.tensor(float(targets[0].shape[0]), device=loss.device),
    }
    return loss, parts


def checkpointed_round_losses(
    model: nn.Module, embeddings: ImageEmbeddings, targets: Sequence[torch.Tensor], frames: Frames, prompts: Prompts,
    *, n_rounds: int, **kwargs: Any,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Deprecated: ``interactive_rounds(..., loss=True, execution=CheckpointedRounds(...))``; per-round ``(dice, mse)``."""
    warn_moved(__name__, "checkpointed_round_losses",
               "interactive_rounds(..., loss=True, execution=hf_sam_peft.speed.CheckpointedRounds(...))")
    execution = CheckpointedRounds(model, embeddings, n_rounds)
    rounds = list(interactive_rounds(model, embeddings, targets, frames, prompts, n_rounds=n_rounds, loss=True,
                                     execution=execution, **kwargs))
    return [r.dice for r in rounds], [r.mse for r in rounds]


def backward_round_losses(
    model: nn.Module, embeddings: ImageEmbeddings, targets: Sequence[torch.Tensor], frames: Frames, prompts: Prompts,
    *, n_rounds: int, shared: Any = None, **kwargs: Any,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Deprecated: ``interactive_rounds(..., loss=True, execution=BackwardPerRound(...))``; per-round ``(dice, mse)``
    (detached) and the surrogate (``BackwardPerRound.surrogate``)."""
    warn_moved(__name__, "backward_round_losses",
               "interactive_rounds(..., loss=True, execution=hf_sam_peft.speed.BackwardPerRound(...))")
    execution = BackwardPerRound(model, embeddings, n_rounds, shared=shared)  # interactive_rounds checks the rest
    rounds = list(interactive_rounds(model, embeddings, targets, frames, prompts, n_rounds=n_rounds, loss=True,
                                     execution=execution, **kwargs))
    return [r.dice for r in rounds], [r.mse for r in rounds], execution.surrogate()


# names that moved to hf_sam_peft.speed.rounds: importable from here with a DeprecationWarning
__getattr__ = moved_names(__name__, {
    "accumulate_gradients": "hf_sam_peft.speed.rounds.accumulate_gradients",
    "RoundFn": "hf_sam_peft.speed.rounds.RoundFn",
})
