"""``SamInteractiveTrainer``: µSAM's interactive training objective in a ``transformers.Trainer``.

Build it from a dict of settings: ``SamInteractiveTrainer(model, InteractiveTrainingArguments(**settings),
train_dataset=..., eval_dataset=...)``; the collator defaults to :class:`SamInteractiveCollator` for the
model's input size. ``model`` is a ``SamModel`` or a ``PeftModel`` wrapping one.

What it does (DESIGN §3):

- training step: :func:`~hf_sam_peft.training.interactive.interactive_loss` with the initial prompt
  alternating point / box by micro-step, ``n_sub_iterations`` rounds, mask input with ``mask_prob``;
- validation: one round per batch, cycling µSAM's four prompt modes (point; box; random points; box +
  random points); ``eval_metric`` is the mean Dice loss (µSAM's validation metric; lower is better), plus
  the UNETR decoder's loss / 3 when ``train_decoder`` (µSAM's joint metric). ``eval_loss`` is the full
  interactive loss (Dice + IoU MSE) of that round;
- defaults: AdamW (weight decay 0.01), lr 1e-5, ``ReduceLROnPlateau(factor=0.9, patience=10)`` on
  ``eval_metric`` after every evaluation (per epoch by default) through transformers' own
  ``reduce_lr_on_plateau`` scheduler type, optional early stopping (``EarlyStoppingCallback``), the best and
  the latest checkpoint kept (``save_total_limit=1`` + ``load_best_model_at_end``);
- determinism: prompts come from a generator seeded by ``(args.seed, micro-step, process index)`` (see
  :func:`~hf_sam_peft.training.interactive.prompt_generator`), so a run resumed from a checkpoint replays
  the same prompts and ends with the same weights as an uninterrupted run (checked bit for bit on CPU);
- joint training (``train_decoder=True``, the model needs ``model.unetr_decoder`` from
  ``hf_sam_peft.modeling.unetr.attach_unetr``): per step the interactive loss is back-propagated and the
  optimizer steps, then the decoder's distance loss on the same images through the same (just updated)
  encoder is back-propagated and the Trainer's loop takes the second optimizer step (µSAM's
  ``JointSamTrainer``);
- a ``loss_curve.png`` (train and eval loss vs step) is written to ``output_dir`` at the end of training;
- efficiency (``autocast_dtype``, ``encoder_attention``, ``decoder_attention``, ``fuse_decoder_projections``,
  ``contiguous_layout``, ``checkpoint_encoder``, ``backward_per_round``, ``checkpoint_rounds``,
  ``frozen_encoder_no_grad``, ``cache_embeddings``, ``retain_freed_memory``, ``flush_denormals``; see
  ``hf_sam_peft.training.efficiency``) changes how a step runs, not what it computes; the model-side options
  are applied to ``model`` when the trainer is built.

Deliberate deviations from µSAM:

- prompts are seeded per step (not from the global RNGs), so runs are reproducible and resumable;
- with gradient accumulation, each micro-batch counts as a step for the point / box alternation;
- joint training requires ``gradient_accumulation_steps == 1`` (two optimizer steps per batch do not
  compose with accumulated gradients);
- the training log adds ``dice_loss``, ``iou_mse`` (and ``ais_loss``) averaged since the last log, from
  the main process only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    EarlyStoppingCallback,
    SchedulerType,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_sam_peft.modeling.unetr import ATTRIBUTE_NAME as DECODER_ATTRIBUTE
from hf_sam_peft.training.collate import SamInteractiveCollator
from hf_sam_peft.training.efficiency import (
    EfficiencyOptions,
    EmbeddingCache,
    prepare_model,
)
from hf_sam_peft.training.interactive import (
    EVAL_STREAM,
    TRAIN_STREAM,
    encode_images,
    in_single_forward,
    interactive_loss,
    prompt_generator,
    training_prompt_mode,
    unwrap_sam,
    validation_prompt_mode,
)

LOSS_CURVE_NAME = "loss_curve.png"


@dataclass
class InteractiveTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with µSAM's interactive-training knobs and the paper's defaults."""

    n_objects: int | None = field(default=25, metadata={"help": "Objects sampled per image (None: all)."})
    n_sub_iterations: int = field(default=8, metadata={"help": "Rounds per batch: initial prompt + corrections."})
    mask_prob: float = field(default=0.5, metadata={"help": "Per image and round: feed the previous logits."})
    box_jitter: float = field(default=0.025, metadata={"help": "Box sides pushed out by U(0, jitter) * side."})
    train_decoder: bool = field(default=False, metadata={"help": "Jointly train model.unetr_decoder (AIS)."})
    decoder_min_size: int = field(default=25, metadata={"help": "Objects below this size leave the AIS targets."})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "Evaluations without improvement."})
    plot_loss_curve: bool = field(default=True, metadata={"help": "Write loss_curve.png to output_dir at the end."})
    # how a step runs, never what it computes (hf_sam_peft.training.efficiency; benchmarks/RESULTS.md)
    autocast_dtype: str | None = field(
        default="auto", metadata={"help": "bf16/fp16 autocast of the forward; 'auto': bf16 where native; None: off."}
    )
    encoder_attention: str | None = field(
        default="fused", metadata={"help": "Encoder attention: fused (rel-pos bias inside one SDPA call), eager or sdpa."}
    )
    decoder_attention: str | None = field(
        default="auto", metadata={"help": "Mask decoder attention: auto (eager on CPU, else the model's), eager or sdpa."}
    )
    fuse_decoder_projections: bool = field(
        default=True, metadata={"help": "Mask decoder: project the image tokens once per layer (exact, fewer passes)."}
    )
    contiguous_layout: bool = field(
        default=True, metadata={"help": "Keep patch-embedding and decoder conv outputs contiguous (no slow mixed layouts)."}
    )
    retain_freed_memory: bool = field(
        default=True, metadata={"help": "CPU: let glibc keep freed memory for the next step (no page faults; process-wide)."}
    )
    flush_denormals: bool = field(
        default=True, metadata={"help": "CPU: flush denormal floats (< 1.2e-38) to zero on torch's threads (process-wide)."}
    )
    checkpoint_encoder: bool = field(
        default=False, metadata={"help": "Recompute trainable encoder blocks in backward (less memory, ~20% slower)."}
    )
    backward_per_round: bool = field(
        default=True, metadata={"help": "Differentiate each round's loss at once and free its graph (no recompute)."}
    )
    checkpoint_rounds: bool = field(default=True, metadata={"help": "Without backward_per_round: recompute rounds in backward."})
    frozen_encoder_no_grad: bool = field(default=True, metadata={"help": "Run a frozen encoder without a graph."})
    cache_embeddings: bool = field(default=False, metadata={"help": "Frozen encoder: reuse embeddings of equal images."})
    point_multimask: bool = field(
        default=True, metadata={"help": "Point steps train the multimask outputs (False: the single mask)."}
    )
    # the paper's defaults
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
        self.efficiency_options()  # validates the efficiency fields
        if self.train_decoder and self.gradient_accumulation_steps != 1:
            raise ValueError("train_decoder needs gradient_accumulation_steps == 1 (two optimizer steps per batch)")
        if isinstance(self.lr_scheduler_kwargs, dict) and SchedulerType(self.lr_scheduler_type) == SchedulerType.REDUCE_ON_PLATEAU:
            self.lr_scheduler_kwargs.setdefault("mode", "max" if self.greater_is_better else "min")
        super().__post_init__()


    def efficiency_options(self) -> EfficiencyOptions:
        """The step's :class:`~hf_sam_peft.training.efficiency.EfficiencyOptions` from these arguments."""
        return EfficiencyOptions(
            autocast_dtype=self.autocast_dtype, encoder_attention=self.encoder_attention,
            decoder_attention=self.decoder_attention, checkpoint_encoder=self.checkpoint_encoder,
            backward_per_round=self.backward_per_round, checkpoint_rounds=self.checkpoint_rounds,
            frozen_encoder_no_grad=self.frozen_encoder_no_grad, cache_embeddings=self.cache_embeddings,
            fuse_decoder_projections=self.fuse_decoder_projections,
            contiguous_layout=self.contiguous_layout, retain_freed_memory=self.retain_freed_memory,
            flush_denormals=self.flush_denormals,
        )


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


def decoder_loss(model: nn.Module, batch: dict[str, torch.Tensor], min_size: int) -> torch.Tensor:
    """The UNETR decoder's distance loss on the batch (encoder run again, with gradients)."""
    from hf_sam_peft.training.ais import ais_loss, distance_targets

    if isinstance(model, nn.parallel.DistributedDataParallel):
        return in_single_forward(model, lambda inner: decoder_loss(inner, batch, min_size))
    sam = unwrap_sam(model)
    decoder = getattr(sam, DECODER_ATTRIBUTE)
    output = decoder(encode_images(model, batch["pixel_values"]))
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
        prepare_model(model, self.efficiency, args.device)
        self.embedding_cache = EmbeddingCache() if self.efficiency.cache_embeddings else None
        callbacks = list(callbacks or [])
        if args.plot_loss_curve:
            callbacks.append(LossCurveCallback())
        if args.early_stopping_patience is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
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

    # ---- training -------------------------------------------------------------------------------------

    def _prompt_step(self) -> int:
        """Index of the current micro-batch: global step * accumulation steps + position in the accumulation."""
        if self._micro_global_step != self.state.global_step:
            self._micro_global_step, self._micro_index = self.state.global_step, 0
        else:
            self._micro_index += 1
        return self.state.global_step * self.args.gradient_accumulation_steps + self._micro_index

    def _interactive(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        step = self._prompt_step()
        generator = prompt_generator(self.args.seed, TRAIN_STREAM, step, self.args.process_index, self.args.device)
        return interactive_loss(
            model, inputs, training_prompt_mode(step, self.args.point_multimask),
            n_objects=self.args.n_objects, n_rounds=self.args.n_sub_iterations, mask_prob=self.args.mask_prob,
            box_jitter=self.args.box_jitter, generator=generator, options=self.efficiency,
            embedding_cache=self.embedding_cache,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, parts = self._interactive(model, inputs)
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
        self.accelerator.backward(loss)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        with self.compute_loss_context_manager():
            ais = decoder_loss(model, inputs, self.args.decoder_min_size)
        self.accelerator.backward(ais)
        self._record({**parts, "ais_loss": ais.detach()})
        return (loss.detach() + ais.detach()).detach()

    def _record(self, parts: dict[str, torch.Tensor]) -> None:
        for key in ("dice_loss", "iou_mse", "ais_loss"):
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
        """One validation round with the batch's prompt mode; returns ``(loss, None, None)``."""
        inputs = self._prepare_inputs(inputs)
        generator = prompt_generator(self.args.seed, EVAL_STREAM, self._eval_index, self.args.process_index, self.args.device)
        mode = validation_prompt_mode(self._eval_index, generator)
        self._eval_index += 1
        with torch.no_grad():
            loss, parts = interactive_loss(
                model, inputs, mode, n_objects=self.args.n_objects, n_rounds=1, mask_prob=0.0,
                box_jitter=self.args.box_jitter, generator=generator, options=self.efficiency,
                embedding_cache=self.embedding_cache,
            )
            if self.args.train_decoder:
                parts["ais_loss"] = decoder_loss(model, inputs, self.args.decoder_min_size)
        weight = float(inputs["pixel_values"].shape[0])
        for key in ("dice_loss", "iou_mse", "ais_loss"):
            if key in parts:
                self._eval_sums[key] += float(parts[key]) * weight
        self._eval_sums["n_images"] += weight
        return loss.detach(), None, None

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
            for key, value in {**means, "dice": 1.0 - means["dice_loss"], "metric": metric}.items():
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output
