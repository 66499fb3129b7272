"""``SamInteractiveTrainer``: µSAM's interactive training objective in a ``transformers.Trainer``.

Build it from a dict of settings: ``SamInteractiveTrainer(model, InteractiveTrainingArguments(**settings),
train_dataset=..., eval_dataset=...)``; the collator defaults to :class:`SamInteractiveCollator` for the
model's input size. ``model`` is a ``SamModel``, a ``Sam2Model`` (SAM 2's image model) or a ``PeftModel``
wrapping one.

What it does (µSAM's ``SamTrainer`` in ``micro_sam/training/sam_trainer.py``, as the paper ran it):

- training step: :func:`~hf_sam_peft.training.interactive.interactive_loss` with the initial prompt
  alternating point / box by micro-step, ``n_sub_iterations`` rounds, mask input with ``mask_prob``;
- validation: one round per batch in each of µSAM's four prompt modes (point; box; random points; box +
  random points), every batch in all four, through the outputs training uses (the point mode's multimask
  output only with ``point_multimask``); ``eval_metric`` is the mean Dice loss over the four modes (µSAM's
  validation metric; lower is better), plus the UNETR decoder's loss / 3 when ``train_decoder`` (µSAM's
  joint metric); ``eval_dice_<mode>`` per mode. ``eval_loss`` is the full interactive loss (Dice + IoU MSE);
- the untouched model is a candidate: with ``evaluate_base`` (default) the first ``train()`` evaluates
  before any update and saves that state as ``checkpoint-0``, so the kept "best" checkpoint is never worse
  on validation than the base (``trainer.base_metric``, ``trainer.best_is_base``);
- never worse on any prompt mode (``never_worse_margin``, default 0.005): an evaluation after training steps
  is eligible as best only if its ``eval_dice_<mode>`` is at least the base's minus the margin for every
  validation mode the base was scored on; among the eligible ones (and the base) the best ``eval_metric``
  (the mean) wins, as before. A fine-tune that gains on one mode by losing another (box Dice 0.80 -> 0.56)
  is not kept. Rejected evaluations are listed in ``trainer.rejected_evaluations`` (the worst mode of
  each), and ``trainer.selection_summary()`` says in one line what was kept and why. The rule lives in the
  Trainer's best-metric decision (``_determine_best_metric``): it decides which evaluation counts as
  best (``state.best_metric``, ``state.best_global_step``, hence ``state.best_model_checkpoint``);
  transformers' own ``load_best_model_at_end`` then loads that checkpoint at the end and checkpoint
  rotation keeps it. With ``load_best_model_at_end=False`` the last state is kept whatever the rule
  says: the rule only reports (``best_is_base``, ``selection_summary()``). The rule needs the base's
  per-mode scores: without a base evaluation (``evaluate_base=False``, no eval dataset, no
  ``metric_for_best_model``) it is not applied and the mean alone decides; ``never_worse_margin=None``
  switches it off (transformers' behaviour, the mean alone);
- defaults: AdamW (weight decay 0.01), lr 1e-5, ``ReduceLROnPlateau(factor=0.9, patience=10)`` on
  ``eval_metric`` after every evaluation (per epoch by default) through transformers' own
  ``reduce_lr_on_plateau`` scheduler type, optional early stopping (``EarlyStoppingCallback``), the best and
  the latest checkpoint kept (``save_total_limit=1`` + ``load_best_model_at_end``), **no gradient clipping**
  (``max_grad_norm=0``: torch_em's ``DefaultTrainer`` never clips, and micro-sam's ``SamTrainer`` inherits
  that; transformers' own default would clip at 1.0);
- determinism: prompts come from a generator seeded by ``(args.seed, micro-step, process index)`` (see
  :func:`~hf_sam_peft.sam_forward.prompt_generator`), so a run resumed from a checkpoint replays
  the same prompts and ends with the same weights as an uninterrupted run (checked bit for bit on CPU);
- joint training (``train_decoder=True``, the model needs ``model.unetr_decoder`` from
  ``hf_sam_peft.modeling.unetr.attach_unetr``): per step the interactive loss is back-propagated and the
  optimizer steps, then the decoder's distance loss on the same images through the same (just updated)
  encoder is back-propagated and the Trainer's loop takes the second optimizer step (µSAM's
  ``JointSamTrainer``);
- checkpoints are safe to interrupt: ``checkpoint_complete.json`` (every file's size and SHA-256) is written
  last, older checkpoints are rotated away only after it, a failed save (full disk) removes its folder and
  raises :class:`CheckpointError` naming it; ``train(resume_from_checkpoint=True)`` takes the newest *intact*
  checkpoint (checksums match, weights and optimizer state finite; a one-line note for each damaged one
  skipped; see :mod:`hf_sam_peft.training.checkpoints`), and the recorded best checkpoint is looked up
  beside the checkpoint resumed from, so a copied or moved run folder resumes from its own files;
- a NaN / inf loss stops the run before the optimizer step with :class:`NonFiniteLossError` naming the step
  and the last good checkpoint (trainable weights that went non-finite are never saved either). Under DDP
  each process checks its own loss: a fault on one process only stops that one (the others then wait in
  the next collective until the launcher's timeout);
- a ``loss_curve.png`` (train and eval loss vs step) is written to ``output_dir`` at the end of training;
- efficiency (one argument per ``EfficiencyOptions`` field, ``autocast_dtype``, ``encoder_attention``, ...,
  generated from it, and ``speed_preset``: plain, default or low_memory; see ``hf_sam_peft.speed``)
  changes how a step runs, not what it computes; the model-side options are applied to ``model`` when the
  trainer is built.

Deliberate deviations from µSAM:

- prompts are seeded per step (not from the global RNGs), so runs are reproducible and resumable;
- with gradient accumulation, each micro-batch counts as a step for the point / box alternation;
- validation runs all four prompt modes on every batch, where µSAM picks one per batch by its index
  (``SamTrainer._get_prompt_and_multimasking_choices_for_val``): with a small validation set (one image in
  the demo) µSAM's cycle would score one mode only, so the best checkpoint would be picked by a mode that
  the training may not even use;
- the untouched base is a best-checkpoint candidate (µSAM starts its best metric at infinity): a
  fine-tune never ends worse than its start on the validation metric without saying so;
- a checkpoint worse than the base on any validation prompt mode by more than ``never_worse_margin`` Dice
  is never the best one (µSAM picks by the mean alone);
- joint training requires ``gradient_accumulation_steps == 1`` (two optimizer steps per batch do not
  compose with accumulated gradients);
- the training log adds ``dice_loss``, ``iou_mse`` (and ``ais_loss``) averaged since the last log, from
  the main process only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    EarlyStoppingCallback,
    SchedulerType,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from hf_sam_peft.modeling.unetr import ATTRIBUTE_NAME as DECODER_ATTRIBUTE
from hf_sam_peft.sam_forward.forward import encode_images, unwrap_sam
from hf_sam_peft.sam_forward.kinds import main_embedding
from hf_sam_peft.sam_forward.seeding import EVAL_STREAM, TRAIN_STREAM, prompt_generator
from hf_sam_peft.training.adalora import AdaLoraAllocation, adalora_model, adalora_regularizer
from hf_sam_peft.training.ais import ais_loss, distance_targets
from hf_sam_peft.training.checkpoints import (  # noqa: F401  (also imported from here by train.py, study/cell.py)
    CHECKPOINT_MARKER,
    CheckpointError,
    checkpoint_problem,
    latest_intact_checkpoint,
    list_checkpoints,
    mark_checkpoint_complete,
    resolve_resume_checkpoint,
)
from hf_sam_peft.training.collate import SamInteractiveCollator
from hf_sam_peft.speed import (
    EfficiencyOptions,
    EmbeddingCache,
    arguments_class,
    autocast_context,
    encoder_embeddings,
    options_from_arguments,
    prepare_model,
)
from hf_sam_peft.training.interactive import (
    in_single_forward,
    interactive_loss,
    training_prompt_mode,
    validation_prompt_modes,
)

LOSS_CURVE_NAME = "loss_curve.png"
logger = logging.getLogger(__name__)
VALIDATION_MODES = ("point", "box", "points", "box_points")


@dataclass(frozen=True)
class TrainerInternal:
    """A private or undocumented part of ``transformers.Trainer`` that :class:`SamInteractiveTrainer` relies on."""

    name: str  # attribute of transformers.Trainer, or "trainer_utils.<name>" for a module-level helper
    use: str  # "override", "call" (we call it), "attribute" (we set or read it), "constant"
    parameters: str  # the signature without annotations, as of ``checked`` (a constant: its repr)
    seen_in: str  # the Trainer method whose source calls / reads it (the override is dead code otherwise)
    why: str
    checked: tuple[str, ...] = ("5.25.0",)  # transformers versions whose source was read against this row


TRAINER_INTERNALS: tuple[TrainerInternal, ...] = (
    TrainerInternal(
        "_init_training_state", "override",
        "(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)",
        "_inner_training_loop",
        "the one hook that runs after a resumed TrainerState is loaded and before the first step: the recorded best "
        "checkpoint is relocated beside the resumed one and the never-worse record is rebuilt from log_history",
    ),
    TrainerInternal(
        "_load_optimizer_and_scheduler", "override", "(self, checkpoint)", "_prepare_for_training",
        "reset_optimizer_hyperparameters: a resume that changes the learning rate / weight decay / Adam settings "
        "puts them back over the values the loaded optimizer state brings",
    ),
    TrainerInternal(
        "_save_checkpoint", "override", "(self, model, trial)", "_maybe_log_save_evaluate",
        "checkpoint_complete.json written last, rotation only after it, a failed save removed (CheckpointError); "
        "also called by _evaluate_base to save the untouched model as checkpoint-0",
    ),
    TrainerInternal(
        "_determine_best_metric", "override", "(self, metrics, trial)", "_maybe_log_save_evaluate",
        "the never-worse rule decides which evaluation counts as best; also called by _evaluate_base for step 0",
    ),
    TrainerInternal(
        "_get_output_dir", "call", "(self, trial)", "_save_checkpoint",
        "the run folder as the Trainer names it (a hyperparameter-search trial gets a sub-folder)",
    ),
    TrainerInternal(
        "_prepare_inputs", "call", "(self, inputs)", "prediction_step",
        "moves a batch to the device in our training_step (joint path) and prediction_step, as the Trainer's own",
    ),
    TrainerInternal(
        "model_accepts_loss_kwargs", "attribute", "", "compute_loss",
        "set to False after Trainer.__init__: SamModel.forward takes **kwargs, which would make the Trainer pass "
        "num_items_in_batch (label pixels) and treat our per-batch mean loss as a sum",
    ),
    TrainerInternal(
        "trainer_utils.rotate_checkpoints", "call",
        "(output_dir, save_total_limit=None, best_model_checkpoint=None, use_mtime=False, checkpoint_prefix='checkpoint')",
        "_save_checkpoint",
        "our _save_checkpoint turns the Trainer's rotation off (save_total_limit=None) and rotates itself once the "
        "marker is written, with the same helper and arguments",
    ),
    TrainerInternal(
        "trainer_utils.PREFIX_CHECKPOINT_DIR", "constant", "'checkpoint'", "_save_checkpoint",
        "checkpoint folders are <prefix>-<step>: checkpoints.list_checkpoints and checkpoint-0 assume 'checkpoint'",
    ),
)
"""Every private (leading underscore) or undocumented ``transformers.Trainer`` method, attribute and helper this
module overrides, calls or sets, in one place; tests/training/test_trainer_overrides.py fails when one of them
disappears, changes its parameters or stops being used by the Trainer method named in ``seen_in``. The
documented API we override (``train``, ``compute_loss``, ``training_step``, ``prediction_step``,
``evaluation_loop``, ``log``, ``loss_is_scaled_for_ga``) is not listed."""


def mode_dice(metrics: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{mode: Dice}`` of the validation prompt modes scored in ``metrics`` (``<prefix>_dice_<mode>`` keys)."""
    return {m: float(metrics[f"{prefix}_dice_{m}"]) for m in VALIDATION_MODES if f"{prefix}_dice_{m}" in metrics}


def worst_mode(candidate: dict[str, float], base: dict[str, float]) -> tuple[str, float, float] | None:
    """``(mode, base Dice, candidate Dice)`` of the mode scored in both where ``candidate`` falls furthest below
    ``base`` (a NaN candidate counts as the worst); None when they share no mode."""
    shared = [m for m in VALIDATION_MODES if m in candidate and m in base]
    if not shared:
        return None
    nan = [m for m in shared if np.isnan(candidate[m])]
    mode = nan[0] if nan else max(shared, key=lambda m: base[m] - candidate[m])
    return mode, base[mode], candidate[mode]


SpeedArguments = arguments_class()
"""The speed fields of :class:`InteractiveTrainingArguments`: one per
:class:`~hf_sam_peft.speed.EfficiencyOptions` field (same name, default and help) plus
``speed_preset``, generated from the options' declarations (a new option needs no change here)."""


@dataclass
class InteractiveTrainingArguments(SpeedArguments, TrainingArguments):
    """``TrainingArguments`` with µSAM's interactive-training knobs and the paper's defaults.

    The speed options (how a step runs, never what it computes: ``hf_sam_peft.speed``,
    ``benchmarks/RESULTS.md``) come from :data:`SpeedArguments`; ``speed_preset`` (plain, default, low_memory)
    picks their base values and any speed option set to other than its default wins over the preset.
    """

    n_objects: int | None = field(default=25, metadata={"help": "Objects sampled per image (None: all)."})
    n_sub_iterations: int = field(default=8, metadata={"help": "Rounds per batch: initial prompt + corrections."})
    mask_prob: float = field(default=0.5, metadata={"help": "Per image and round: feed the previous logits."})
    box_jitter: float = field(default=0.025, metadata={"help": "Box sides pushed out by U(0, jitter) * side."})
    train_decoder: bool = field(default=False, metadata={"help": "Jointly train model.unetr_decoder (AIS)."})
    decoder_min_size: int = field(default=25, metadata={"help": "Objects below this size leave the AIS targets."})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "Evaluations without improvement."})
    plot_loss_curve: bool = field(default=True, metadata={"help": "Write loss_curve.png to output_dir at the end."})
    point_multimask: bool = field(
        default=True, metadata={"help": "Point steps train the multimask outputs (False: the single mask)."}
    )
    evaluate_base: bool = field(
        default=True,
        metadata={"help": "Evaluate before the first update and keep the untouched model as a best-checkpoint candidate."},
    )
    never_worse_margin: float | None = field(
        default=0.005,
        metadata={"help": "A checkpoint is eligible as best only if its Dice on every validation prompt mode is at "
                          "least the base's minus this margin (needs evaluate_base); None: the mean alone decides."},
    )
    # the paper's defaults
    max_grad_norm: float = 0.0  # torch_em / micro-sam never clip gradients (transformers' default: 1.0)
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 2
    lr_scheduler_type: str = "reduce_lr_on_plateau"
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"factor": 0.9, "patience": 10})
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    save_total_limit: int | None = 1
    load_best_model_at_end: bool = True
    metric_for_best_model: str | None = "metric"
    greater_is_better: bool | None = False
    remove_unused_columns: bool = False
    ddp_find_unused_parameters: bool | None = True  # prompt modes leave parts of the prompt encoder unused
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])

    def __post_init__(self) -> None:
        if self.n_objects is not None and (not isinstance(self.n_objects, int) or self.n_objects < 1):
            raise ValueError(f"n_objects must be a positive int or None, got {self.n_objects!r}")
        if not isinstance(self.n_sub_iterations, int) or self.n_sub_iterations < 1:
            raise ValueError(f"n_sub_iterations must be a positive int, got {self.n_sub_iterations!r}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob!r}")
        if self.box_jitter < 0:
            raise ValueError(f"box_jitter must be >= 0, got {self.box_jitter!r}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be a positive int or None, got {self.early_stopping_patience!r}")
        margin = self.never_worse_margin
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:  # NaN fails too
                raise ValueError(f"never_worse_margin must be a number >= 0 or None, got {margin!r}")
            self.never_worse_margin = float(margin)
        self.efficiency_options()  # validates the efficiency fields
        if self.train_decoder and self.gradient_accumulation_steps != 1:
            raise ValueError("train_decoder needs gradient_accumulation_steps == 1 (two optimizer steps per batch)")
        if isinstance(self.lr_scheduler_kwargs, dict) and SchedulerType(self.lr_scheduler_type) == SchedulerType.REDUCE_ON_PLATEAU:
            self.lr_scheduler_kwargs.setdefault("mode", "max" if self.greater_is_better else "min")
        super().__post_init__()


    def efficiency_options(self) -> EfficiencyOptions:
        """The step's :class:`~hf_sam_peft.speed.EfficiencyOptions` from these arguments
        (:func:`~hf_sam_peft.speed.options_from_arguments`)."""
        return options_from_arguments(self)


class LossCurveCallback(TrainerCallback):
    """Writes ``loss_curve.png`` (train and eval loss vs optimizer step) to ``output_dir`` when training ends."""

    def __init__(self, filename: str = LOSS_CURVE_NAME) -> None:
        self.filename = filename

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            plot_loss_curve(state.log_history, Path(args.output_dir) / self.filename)
        return control


def plot_loss_curve(log_history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Plot ``loss`` and ``eval_loss`` of a Trainer's ``log_history`` against the step; ``None`` if nothing to plot."""
    # lazy: matplotlib takes ~0.9 s to import and only a finished training draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {
        "train loss": [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e],
        "eval loss": [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e],
    }
    if not any(curves.values()):
        return None
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for (name, points), style in zip(curves.items(), ("-", "o-")):
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, style, label=name, markersize=4)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("interactive loss (Dice + IoU MSE)")
    axes.set_title("SAM interactive training")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


class BaseCandidateCallback(TrainerCallback):
    """Before the first update: evaluate the untouched model and make it the best checkpoint so far.

    transformers' Trainer (like µSAM's, whose best metric starts at infinity) only compares evaluations made
    after training steps, so a fine-tune that never beats its start still ends on its "best" worse state.
    Saved as ``checkpoint-0`` when checkpoints are saved, so ``load_best_model_at_end`` can return to it.
    """

    def __init__(self, trainer: "SamInteractiveTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # not on resume: the base was evaluated (and saved) by the first run
            self.trainer._evaluate_base()
        return control


class NonFiniteLossError(ValueError):
    """The training loss (or a trainable weight) became NaN or inf: the run stops, naming the step and the last
    good checkpoint (a ``ValueError``, so the command line prints it as one line)."""


def decoder_loss(model: nn.Module, batch: dict[str, torch.Tensor], min_size: int) -> torch.Tensor:
    """The UNETR decoder's distance loss on the batch (encoder run again, with gradients)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return in_single_forward(model, lambda inner: decoder_loss(inner, batch, min_size))
    sam = unwrap_sam(model)
    decoder = getattr(sam, DECODER_ATTRIBUTE)
    output = decoder(main_embedding(encode_images(model, batch["pixel_values"])))  # SAM 2: the stride-16 map
    preds, targets = [], []
    for b, ((h, w), reshaped) in enumerate(zip(batch["original_sizes"].tolist(), batch["reshaped_input_sizes"].tolist())):
        preds.append(decoder.postprocess(output[b : b + 1], reshaped, (h, w)))
        labels = batch["labels"][b, :h, :w].cpu().numpy()
        targets.append(torch.from_numpy(distance_targets(labels, min_size))[None].to(output.device))
    if len({tuple(p.shape) for p in preds}) == 1:  # one call: Dice sums pooled over the batch, as torch_em
        return ais_loss(torch.cat(preds), torch.cat(targets))
    return torch.stack([ais_loss(p, t) for p, t in zip(preds, targets)]).mean()


class SamInteractiveTrainer(Trainer):
    """A ``Trainer`` whose loss is µSAM's interactive objective (see the module docstring)."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean: the loop divides by the GA steps

    def __init__(
        self,
        model: nn.Module,
        args: InteractiveTrainingArguments | None = None,
        data_collator: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = InteractiveTrainingArguments()
        if not isinstance(args, InteractiveTrainingArguments):
            raise TypeError(f"args must be InteractiveTrainingArguments, got {type(args).__name__}")
        sam = unwrap_sam(model)
        if args.train_decoder and not hasattr(sam, DECODER_ATTRIBUTE):
            raise ValueError("train_decoder=True needs model.unetr_decoder (hf_sam_peft.modeling.unetr.attach_unetr)")
        self.efficiency = args.efficiency_options()
        # args.device, not the parameters' device: the "auto" choices follow where the step will run, and the
        # Trainer moves the model there only in super().__init__
        prepare_model(model, self.efficiency, args.device)
        self.embedding_cache = EmbeddingCache() if self.efficiency.cache_embeddings else None
        callbacks = list(callbacks or [])
        if args.plot_loss_curve:
            callbacks.append(LossCurveCallback())
        if args.early_stopping_patience is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
        if args.evaluate_base:
            callbacks.append(BaseCandidateCallback(self))
        if adalora_model(model) is not None:  # peft's AdaLoRA: its rank schedule runs beside the optimizer
            callbacks.append(AdaLoraAllocation())
        if data_collator is None:
            data_collator = SamInteractiveCollator.from_model(sam)
        super().__init__(model=model, args=args, data_collator=data_collator, callbacks=callbacks, **kwargs)
        # SamModel.forward takes **kwargs; without this the Trainer would count label pixels as "items".
        self.model_accepts_loss_kwargs = False
        self._micro_global_step: int | None = None
        self._micro_index = 0
        self._log_sums: dict[str, float] = defaultdict(float)
        self._log_count = 0
        self._eval_index = 0
        self._eval_sums: dict[str, float] = defaultdict(float)
        self.base_metric: float | None = None
        self._base_dice: dict[str, float] | None = None
        self.rejected_evaluations: list[dict[str, Any]] = []  # {step, mode, base, candidate}: the worst mode
        self._candidate_steps: list[int] = []  # evaluations after training steps that the rule looked at
        self._last_saved_checkpoint: str | None = None  # the newest complete checkpoint (named when a run stops)
        # set by a resume that applies a changed learning rate / weight decay / Adam setting (train.py's
        # --allow-changed-settings): the optimizer state loaded from the checkpoint would bring back the old ones
        self.reset_optimizer_hyperparameters = False

    # ---- the base as a candidate ----------------------------------------------------------------------

    def _evaluate_base(self) -> None:
        if self.eval_dataset is None or self.args.eval_strategy == "no" or not self.args.metric_for_best_model:
            return
        metrics = self.evaluate()
        self.base_metric = float(metrics[self._best_metric_key()])
        self._base_dice = mode_dice(metrics) or None
        self._determine_best_metric(metrics=metrics, trial=None)
        if self.args.save_strategy != "no":
            self._save_checkpoint(self.model_wrapped, trial=None)
            # the Trainer records a best checkpoint only for a truthy best_global_step: step 0 needs saying
            self.state.best_model_checkpoint = str(Path(self._get_output_dir(trial=None)) / "checkpoint-0")
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _best_metric_key(self) -> str:
        """``metric_for_best_model`` as it appears in the evaluation metrics (``eval_`` prefixed, as the Trainer)."""
        key = self.args.metric_for_best_model
        return key if key.startswith("eval_") else f"eval_{key}"

    @property
    def best_is_base(self) -> bool | None:
        """Whether no evaluation after training steps beat the untouched model (None: the base was not evaluated).

        Under the never-worse rule an evaluation that lost a validation mode never beats it: True also when a
        fine-tune was better in the mean but worse than the base on some mode by more than the margin."""
        base = self.base_metric
        if base is None and self.args.metric_for_best_model:
            key = self._best_metric_key()
            for entry in self.state.log_history:  # a resumed run reads the first run's step-0 evaluation
                if entry.get("step") == 0 and key in entry:
                    base = float(entry[key])
                    break
        if base is None or self.state.best_metric is None:
            return None
        return not (np.less if not self.args.greater_is_better else np.greater)(self.state.best_metric, base)

    # ---- never worse than the base on any validation prompt mode -------------------------------------

    @property
    def base_dice(self) -> dict[str, float] | None:
        """The untouched model's validation Dice per prompt mode, ``{mode: Dice}`` (None: the base was not
        evaluated); a resumed run reads them from the first run's step-0 evaluation in ``state.log_history``."""
        if self._base_dice is not None:
            return dict(self._base_dice)
        for entry in self.state.log_history:
            if entry.get("step") == 0:
                found = mode_dice(entry)
                if found:
                    return found
        return None

    def _never_worse_base(self) -> dict[str, float] | None:
        """The base's per-mode Dice when the never-worse rule applies (margin set, base evaluated), else None."""
        if self.args.never_worse_margin is None:
            return None
        return self.base_dice

    def _rejection(self, metrics: dict[str, Any], step: int) -> dict[str, Any] | None:
        """``{step, mode, base, candidate}`` (its worst mode) if the rule rejects this evaluation, else None."""
        base = self._never_worse_base()
        found = None if base is None else worst_mode(mode_dice(metrics), base)
        if found is None:
            return None
        mode, base_dice, candidate = found
        if candidate >= base_dice - self.args.never_worse_margin:
            return None
        return {"step": int(step), "mode": mode, "base": base_dice, "candidate": candidate}

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        """``Trainer._determine_best_metric`` with the never-worse rule in front (module docstring).

        Overrides a private Trainer method, checked against transformers 5.25.0:
        ``_determine_best_metric(self, metrics, trial) -> bool``, called by ``_maybe_log_save_evaluate`` right
        after each evaluation during training; it updates ``state.best_metric`` and ``state.best_global_step``
        (which ``_save_checkpoint`` turns into ``state.best_model_checkpoint``) and returns True for a new
        best (``save_strategy="best"`` saves on it). An evaluation after training steps that is worse than
        the base on some validation mode by more than ``never_worse_margin`` Dice is recorded in
        ``rejected_evaluations`` and returns False without touching the state; every other one (and the
        base's own, at step 0) goes to transformers' comparison of ``metric_for_best_model``. Not applied
        without the base's per-mode scores (``evaluate_base=False``, no eval dataset) or with
        ``never_worse_margin=None``.
        """
        if self.state.global_step > 0:
            self._candidate_steps.append(self.state.global_step)
            rejection = self._rejection(metrics, self.state.global_step)
            if rejection is not None:
                self.rejected_evaluations.append(rejection)
                if self.args.should_log:
                    logger.info(
                        f"step {rejection['step']} is not a best-checkpoint candidate: {rejection['mode']} Dice "
                        f"{rejection['base']:.3f} -> {rejection['candidate']:.3f} (base -> this evaluation)"
                    )
                return False
        return super()._determine_best_metric(metrics=metrics, trial=trial)

    def _recover_selection(self) -> None:
        """On resume: the rule's record of the evaluations in the resumed ``state.log_history``."""
        if not self.args.metric_for_best_model:
            return
        key = self._best_metric_key()
        for entry in self.state.log_history:
            step = entry.get("step", 0)
            if step > 0 and key in entry:
                self._candidate_steps.append(int(step))
                rejection = self._rejection(entry, step)
                if rejection is not None:
                    self.rejected_evaluations.append(rejection)

    def selection_summary(self) -> str | None:
        """One line: which evaluation counts as best and why (None: no validation ran), e.g.
        ``kept checkpoint-12: no validation mode worse than the base by more than 0.005 Dice`` or
        ``no checkpoint qualified: every fine-tuned checkpoint was worse than the base on at least one
        validation mode (step 10: box Dice 0.802 -> 0.564); the best checkpoint is the base``."""
        if self.state.best_metric is None or not self.args.metric_for_best_model:
            return None
        margin = self.args.never_worse_margin
        verb = "kept" if self.args.load_best_model_at_end else "best"
        if self.state.best_model_checkpoint:
            name = Path(self.state.best_model_checkpoint).name
        else:
            name = f"the step-{self.state.best_global_step} evaluation" if self.state.best_global_step else "the best evaluation"
        if self.best_is_base:
            rejected, evaluated = self.rejected_evaluations, len(self._candidate_steps)
            if rejected:
                worst = max(rejected, key=lambda r: (np.isnan(r["candidate"]), r["base"] - r["candidate"]))
                example = (f"step {worst['step']}: {worst['mode']} Dice {worst['base']:.3f} -> "
                           f"{worst['candidate']:.3f}")
                if len(rejected) >= evaluated:
                    lead = "every fine-tuned checkpoint was worse than the base on at least one validation mode"
                    example = example if len(rejected) == 1 else f"worst at {example}"
                else:
                    lead = (f"{len(rejected)} of {evaluated} fine-tuned checkpoints were worse than the base on a "
                            f"validation mode by more than {margin:g} Dice, the others did not improve on its mean")
                text = f"no checkpoint qualified: {lead} ({example}); the best checkpoint is the base"
            elif evaluated:
                text = ("no checkpoint qualified: no fine-tuned checkpoint improved on the base's mean validation "
                        "metric; the best checkpoint is the base")
            else:
                text = "no fine-tuned checkpoint was evaluated; the best checkpoint is the base"
            if margin is None:
                text += " (never-worse rule off)"
        elif margin is None:
            text = f"{verb} {name} by the mean validation metric alone (never-worse rule off)"
        elif self._never_worse_base() is None:
            text = (f"{verb} {name} by the mean validation metric alone (never-worse rule not applied: the base "
                    "was not evaluated)")
        else:
            text = f"{verb} {name}: no validation mode worse than the base by more than {margin:g} Dice"
        if not self.args.load_best_model_at_end:
            text += (f"; load_best_model_at_end=False: the last state (step {self.state.global_step}) was kept, "
                     "the rule only reports")
        return text

    # ---- checkpoints: atomic saves, damaged-checkpoint fallback, relocatable runs ---------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *intact* checkpoint (see
        :func:`checkpoint_problem`), a path must be intact; either gives a one-line ValueError otherwise."""
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self._get_output_dir(trial=trial))
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial):
        result = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        self._base_dice, self.rejected_evaluations, self._candidate_steps = None, [], []
        if resume_from_checkpoint is not None:
            self._last_saved_checkpoint = str(resume_from_checkpoint)
            self.state.best_model_checkpoint = self._relocated_best(resume_from_checkpoint)
            self._recover_selection()  # the base's per-mode scores come from log_history (base_dice)
        return result

    def _relocated_best(self, resumed: str) -> str | None:
        """The recorded best checkpoint, found beside the checkpoint actually resumed from.

        trainer_state.json records absolute paths: in a copied (or moved) run folder they name the original's
        checkpoints, whose weights would be loaded at the end and whose name would make the Trainer delete the
        copy's own checkpoints. Only the folder name (``checkpoint-N``) is kept.
        """
        try:
            recorded = json.loads((Path(resumed) / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return self.state.best_model_checkpoint
        best = recorded.get("best_model_checkpoint")
        if not best:
            return None
        local = Path(resumed).parent / Path(best).name
        run_dir = self._get_output_dir(trial=None)
        try:  # spelled as the Trainer spells its checkpoints, so its rotation recognises the best one
            if os.path.samefile(local.parent, run_dir):
                local = Path(os.path.join(run_dir, local.name))
        except OSError:
            pass
        problem = checkpoint_problem(local)
        if problem is not None:
            if self.args.should_save:
                logger.warning(f"note: the best checkpoint {local} cannot be used ({problem}); it is forgotten")
            return None
        return str(local)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """``Trainer._load_optimizer_and_scheduler``; with ``reset_optimizer_hyperparameters`` the arguments'
        learning rate, weight decay (groups that decay) and Adam betas / epsilon replace the loaded ones (the
        moments are kept)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.reset_optimizer_hyperparameters:
            return
        args = self.args
        for group in self.optimizer.param_groups:
            group["lr"] = args.learning_rate
            if "initial_lr" in group:
                group["initial_lr"] = args.learning_rate
            if group.get("weight_decay"):
                group["weight_decay"] = args.weight_decay
            if "betas" in group:
                group["betas"] = (args.adam_beta1, args.adam_beta2)
            if "eps" in group:
                group["eps"] = args.adam_epsilon
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's wrapper
        n = len(self.optimizer.param_groups)
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [args.learning_rate] * n
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [args.learning_rate] * n

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer._save_checkpoint`` made safe to interrupt: a checkpoint counts only once its marker
        (written last) is there, older checkpoints are rotated away only after that, and a failed save (full
        disk) removes its half-written folder and raises :class:`CheckpointError` naming it."""
        self._check_finite_weights(model)
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():  # a damaged leftover of the same step: start clean
            (folder / CHECKPOINT_MARKER).unlink(missing_ok=True)
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotation waits for the marker
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                mark_checkpoint_complete(folder)
            self._last_saved_checkpoint = str(folder)
        except OSError as exc:
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            reason = exc.strerror or str(exc) or type(exc).__name__
            error = CheckpointError(f"could not save checkpoint {folder}: {reason}")
            error.errno = exc.errno
            raise error from exc
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    # ---- training -------------------------------------------------------------------------------------

    def _prompt_step(self) -> int:
        """Index of the current micro-batch: global step * accumulation steps + position in the accumulation."""
        # with gradient accumulation the global step repeats over its micro-batches: the position within the
        # accumulation keeps their prompt draws distinct
        if self._micro_global_step != self.state.global_step:
            self._micro_global_step, self._micro_index = self.state.global_step, 0
        else:
            self._micro_index += 1
        return self.state.global_step * self.args.gradient_accumulation_steps + self._micro_index

    def _interactive(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        step = self._prompt_step()
        # keyed by seed, step and rank instead of drawn from a running RNG: a resumed run replays the same prompts
        # and the DDP ranks draw different ones
        generator = prompt_generator(self.args.seed, TRAIN_STREAM, step, self.args.process_index, self.args.device)
        loss, parts = interactive_loss(
            model, inputs, training_prompt_mode(step, self.args.point_multimask),
            n_objects=self.args.n_objects, n_rounds=self.args.n_sub_iterations, mask_prob=self.args.mask_prob,
            box_jitter=self.args.box_jitter, generator=generator, options=self.efficiency,
            embedding_cache=self.embedding_cache,
        )
        if model.training:  # AdaLoRA's orthogonality term, which its forward adds only to a model-computed loss
            regularizer = adalora_regularizer(model)
            if regularizer is not None:
                loss = loss + regularizer
                parts = {**parts, "orth_reg": regularizer.detach()}
        return loss, parts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, parts = self._interactive(model, inputs)
        self._check_finite_loss(loss, "loss")
        self._record(parts)
        return (loss, parts) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.train_decoder:
            return super().training_step(model, inputs, num_items_in_batch)
        # Joint update, step 1 of 2: interactive loss -> backward -> optimizer step (step 2 is the loop's).
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss, parts = self._interactive(model, inputs)
        self._check_finite_loss(loss, "loss")
        self.accelerator.backward(loss)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        with self.compute_loss_context_manager():
            ais = decoder_loss(model, inputs, self.args.decoder_min_size)
        self._check_finite_loss(ais, "UNETR decoder loss")
        self.accelerator.backward(ais)
        self._record({**parts, "ais_loss": ais.detach()})
        return (loss.detach() + ais.detach()).detach()

    def _last_good_checkpoint(self) -> str:
        """How the stop message names the checkpoint a resume would continue from."""
        if self._last_saved_checkpoint is not None:
            return f"the last good checkpoint is {self._last_saved_checkpoint}"
        return "no checkpoint was saved yet"

    def _check_finite_loss(self, loss: torch.Tensor, what: str) -> None:
        """Stop the run before a NaN / inf loss reaches the weights (raised before the optimizer step, so the
        model and every saved checkpoint stay as they were)."""
        value = float(loss.detach())
        if not np.isfinite(value):
            raise NonFiniteLossError(
                f"training stopped at step {self.state.global_step + 1}: the {what} is {value} (not finite); nothing "
                f"was saved from this step, {self._last_good_checkpoint()} (resume from it, e.g. with a lower "
                "learning rate)"
            )

    def _check_finite_weights(self, model: nn.Module) -> None:
        """Refuse to save trainable weights that went NaN / inf (a finite loss with overflowing gradients)."""
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and not bool(torch.isfinite(parameter.detach()).all()):
                raise NonFiniteLossError(
                    f"training stopped at step {self.state.global_step}: the trainable weight {name} holds NaN or "
                    f"inf values; no checkpoint was saved for this step, {self._last_good_checkpoint()}"
                )

    def _record(self, parts: dict[str, torch.Tensor]) -> None:
        for key in ("dice_loss", "iou_mse", "ais_loss", "orth_reg"):
            if key in parts:
                self._log_sums[key] += float(parts[key])
        self._log_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._log_count:
            for key, total in self._log_sums.items():
                logs[key] = round(total / self._log_count, 6)
            self._log_sums.clear()
            self._log_count = 0
        super().log(logs, start_time)

    # ---- evaluation -----------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """One validation round in each of the four prompt modes; returns ``(loss, None, None)``.

        The point mode goes through the outputs training uses (single mask unless ``point_multimask``); the
        returned loss is the mean over the modes.
        """
        inputs = self._prepare_inputs(inputs)
        generator = prompt_generator(self.args.seed, EVAL_STREAM, self._eval_index, self.args.process_index, self.args.device)
        self._eval_index += 1
        # sums weighted by images: the epoch's mean does not depend on how the last batch is cut
        weight = float(inputs["pixel_values"].shape[0])
        losses = []
        with torch.no_grad():
            with autocast_context(self.efficiency, inputs["pixel_values"].device):  # as interactive_loss encodes
                embeddings = encoder_embeddings(model, inputs["pixel_values"], self.efficiency, self.embedding_cache)
            for name, mode in validation_prompt_modes(generator, self.args.point_multimask).items():
                # one decoder call per mode and no corrections, as µSAM validates (_interactive_val_iteration in
                # micro_sam/training/sam_trainer.py)
                loss, parts = interactive_loss(  # the four modes share one encoder pass
                    model, inputs, mode, n_objects=self.args.n_objects, n_rounds=1, mask_prob=0.0,
                    box_jitter=self.args.box_jitter, generator=generator, options=self.efficiency,
                    embedding_cache=self.embedding_cache, embeddings=embeddings,
                )
                losses.append(loss)
                for key in ("dice_loss", "iou_mse"):
                    self._eval_sums[key] += float(parts[key]) * weight / len(VALIDATION_MODES)
                self._eval_sums[f"dice_loss_{name}"] += float(parts["dice_loss"]) * weight
            if self.args.train_decoder:
                self._eval_sums["ais_loss"] += float(decoder_loss(model, inputs, self.args.decoder_min_size)) * weight
        self._eval_sums["n_images"] += weight
        return torch.stack(losses).mean().detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._eval_index = 0
        self._eval_sums = defaultdict(float)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        keys = sorted(self._eval_sums)
        totals = torch.tensor([self._eval_sums[k] for k in keys], dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        sums = dict(zip(keys, totals.tolist()))
        n_images = sums.pop("n_images", 0.0)
        if n_images:
            means = {key: value / n_images for key, value in sums.items()}
            metric = means["dice_loss"] + means.get("ais_loss", 0.0) / 3.0
            per_mode = {
                f"dice_{name}": 1.0 - means.pop(f"dice_loss_{name}") for name in VALIDATION_MODES
                if f"dice_loss_{name}" in means
            }
            for key, value in {**means, **per_mode, "dice": 1.0 - means["dice_loss"], "metric": metric}.items():
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output
