"""Collation, the interactive loss and ``SamInteractiveTrainer`` on tiny SAMs and real dsb2018 nuclei (SAM's shared
forward: tests/sam_forward)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import SamModel

from hf_sam_peft.modeling.sam import tiny_sam_config
from hf_sam_peft.training.collate import SamInteractiveCollator
from hf_sam_peft.training.interactive import (
    BOX_MODE,
    POINT_MODE,
    interactive_loss,
    prompt_generator,
    training_prompt_mode,
    validation_prompt_modes,
)
from hf_sam_peft.training.trainer import InteractiveTrainingArguments, SamInteractiveTrainer
from tests.conftest import shared_dataset

DSB = "dsb2018_stage1test_fluo_nuclei"


@pytest.fixture(scope="module")
def dsb(tmp_path_factory):
    """Real nuclei as 128x128 patches with at least 4 objects: 14 training rows, 3 validation rows."""
    from hf_sam_peft.data import build_dataset

    root = shared_dataset(DSB)
    cache = tmp_path_factory.mktemp("hf_cache")
    options = dict(patch_shape=(128, 128), min_objects=4, cache_dir=cache)
    return {
        "train": build_dataset(root, "train", n_patches_per_image=2, **options),
        "val": build_dataset(root, "val", n_patches_per_image=1, **options),
    }


def tiny_sam_with(method: str = "lora", **overrides):
    """A seeded tiny SAM prepared with one of the paper's methods."""
    from hf_sam_peft import apply_method

    torch.manual_seed(0)
    if method == "lora":
        overrides.setdefault("r", 4)
    return apply_method(SamModel(tiny_sam_config()), method, **overrides)


def tiny_lora_sam():
    return tiny_sam_with("lora")


def training_args(output_dir, **overrides) -> InteractiveTrainingArguments:
    settings = dict(
        output_dir=str(output_dir), n_objects=4, learning_rate=1e-3, seed=0, logging_steps=1, use_cpu=True,
        disable_tqdm=True, report_to="none", eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        lr_scheduler_type="constant", lr_scheduler_kwargs={},
    )
    settings.update(overrides)
    return InteractiveTrainingArguments(**settings)


class RecordingTrainer(SamInteractiveTrainer):
    """Records each micro-batch's prompt step and loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps, self.losses = [], []

    def _prompt_step(self):
        step = super()._prompt_step()
        self.steps.append(step)
        return step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(float(loss.detach()))
        return loss


def trained_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


# ---- collation ------------------------------------------------------------------------------------------


def test_collator_pads_labels_and_keeps_sizes():
    rows = [
        {"image": np.full((30, 40, 3), 7, np.uint8), "labels": np.ones((30, 40), np.int32)},
        {"image": np.linspace(0, 5, 50 * 20, dtype=np.float32).reshape(50, 20), "labels": np.full((50, 20), 2, np.int32)},
    ]
    batch = SamInteractiveCollator(64)(rows)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["original_sizes"].tolist() == [[30, 40], [50, 20]]
    assert batch["reshaped_input_sizes"].tolist() == [[48, 64], [64, 26]]
    assert batch["labels"].shape == (2, 50, 40) and batch["labels"].dtype == torch.long
    assert batch["labels"][0, :30, :40].eq(1).all() and batch["labels"][0, 30:].eq(0).all()
    assert batch["pixel_values"][1, :, :, 26:].eq(0).all()  # padding after normalisation is zero
    grey = batch["pixel_values"][1, :, :64, :26]
    assert grey.amax().item() > 2.0 and grey.amin().item() < -1.5  # float image min-max scaled to [0, 255]
    with pytest.raises(ValueError, match="labels must have"):
        SamInteractiveCollator(64)([{"image": rows[0]["image"], "labels": np.ones((3, 3), np.int32)}])
    with pytest.raises(TypeError, match="SamModel"):
        SamInteractiveCollator.from_model(torch.nn.Linear(2, 2))


# ---- interactive forward ---------------------------------------------------------------------------------


def test_interactive_loss_rounds_and_gradients(dsb):
    collate = SamInteractiveCollator(256)
    batch = collate([dsb["train"][i] for i in range(2)])
    model = SamModel(tiny_sam_config())
    seen = []
    original_forward = model.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["input_points"], kwargs["input_boxes"], kwargs["input_masks"] is not None))
        return original_forward(*args, **kwargs)

    model.forward = spy
    loss, parts = interactive_loss(model, batch, POINT_MODE, n_objects=3, n_rounds=4, mask_prob=1.0,
                                   generator=prompt_generator(0, 0, 0))
    loss.backward()
    assert [p.shape[-2] for p, _, _ in seen] == [1, 3, 5, 7]  # 1 point, then +1 positive +1 negative per round
    assert [b is None for _, b, _ in seen] == [True] * 4 and [m for *_, m in seen] == [False, True, True, True]
    assert parts["round_dice_loss"].shape == (4,) and parts["n_objects"].item() == 3
    assert loss.item() == pytest.approx((parts["dice_loss"] + parts["iou_mse"]).item(), rel=1e-5)
    assert model.vision_encoder.layers[0].attn.qkv.weight.grad.abs().sum() > 0  # the encoder graph is kept
    seen.clear()
    interactive_loss(model, batch, BOX_MODE, n_objects=3, n_rounds=2, mask_prob=0.0, generator=prompt_generator(0, 0, 1))
    assert seen[0][0] is None and seen[0][1].shape[-1] == 4 and seen[1][0].shape[-2] == 2 and seen[1][1] is not None
    again = interactive_loss(model, batch, POINT_MODE, n_objects=3, n_rounds=4, mask_prob=1.0,
                             generator=prompt_generator(0, 0, 0))[0]
    assert torch.equal(again, loss)


def test_prompt_modes():
    assert [training_prompt_mode(s) for s in range(4)] == [POINT_MODE, BOX_MODE, POINT_MODE, BOX_MODE]
    assert POINT_MODE.multimask and not BOX_MODE.multimask
    gen = torch.Generator().manual_seed(0)
    draws = [validation_prompt_modes(gen) for _ in range(100)]
    assert all(list(d) == ["point", "box", "points", "box_points"] for d in draws)
    assert all(d["point"] == POINT_MODE and d["box"] == BOX_MODE for d in draws)
    points_only, box_points = [d["points"] for d in draws], [d["box_points"] for d in draws]
    assert all(not m.box and not m.multimask and (m.n_pos > 1 or m.n_neg >= 1) for m in points_only)
    assert all(m.box and not m.multimask for m in box_points)
    assert {m.n_pos for m in points_only + box_points} == {1, 2, 3, 4} and {m.n_neg for m in box_points} == {0, 1, 2, 3, 4}
    # the point mode answers through the output that training uses
    single = validation_prompt_modes(gen, point_multimask=False)["point"]
    assert single.n_pos == 1 and not single.multimask and not single.box


# ---- the Trainer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_training_loss_goes_down_and_the_adapter_reloads(dsb, tmp_path, method):
    from hf_sam_peft import load_adapter
    from hf_sam_peft.speed import prepare_model

    args = training_args(tmp_path, learning_rate=1e-2, max_steps=30)
    model = tiny_sam_with(method)
    trainer = SamInteractiveTrainer(model, args, train_dataset=dsb["train"])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 30 and all("dice_loss" in e for e in trainer.state.log_history if "loss" in e)
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1, losses
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    reloaded = load_adapter(SamModel(tiny_sam_config()), str(tmp_path / "adapter")).eval()
    # the trainer switched the trained model's attention kernels: compare like with like
    prepare_model(reloaded, trainer.efficiency)
    model.eval()
    batch = SamInteractiveCollator.from_model(model)([dsb["val"][0]])
    prompt = {"input_boxes": torch.tensor([[[20.0, 20.0, 90.0, 90.0]]]), "multimask_output": False}
    with torch.no_grad():
        expected = model(pixel_values=batch["pixel_values"], **prompt).pred_masks
        got = reloaded(pixel_values=batch["pixel_values"], **prompt).pred_masks
    assert torch.equal(expected, got)


def test_resume_reproduces_uninterrupted_run_bit_for_bit(dsb, tmp_path):
    def run(folder, max_steps, resume=None):
        args = training_args(
            tmp_path / folder, max_steps=max_steps, n_objects=3, n_sub_iterations=3, eval_strategy="steps",
            eval_steps=2, save_strategy="steps", save_steps=2, lr_scheduler_type="reduce_lr_on_plateau",
            lr_scheduler_kwargs={"factor": 0.5, "patience": 0},
        )
        trainer = RecordingTrainer(tiny_lora_sam(), args, train_dataset=dsb["train"], eval_dataset=dsb["val"])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full", 6)
    run("part", 4)
    resumed = run("part", 6, resume=str(tmp_path / "part" / "checkpoint-4"))
    assert resumed.steps == [4, 5] and full.steps == list(range(6))  # only the last two steps were re-run
    assert resumed.losses == full.losses[4:]
    a, b = trained_state(full.model), trained_state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]


def test_gradient_accumulation(dsb, tmp_path):
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                         n_sub_iterations=2)
    model = tiny_lora_sam()
    before = trained_state(model)
    trainer = RecordingTrainer(model, args, train_dataset=dsb["train"])
    trainer.train()
    assert trainer.steps == [0, 1, 2, 3]  # every micro-batch has its own prompts: point, box, point, box
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    expected = [np.mean(trainer.losses[:2]), np.mean(trainer.losses[2:])]  # mean over micro-batches, not sum
    assert logged == pytest.approx(expected, rel=1e-5)
    after = trained_state(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_evaluation_checkpoints_and_scheduler(dsb, tmp_path):
    args = training_args(
        tmp_path, n_sub_iterations=2, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=1, load_best_model_at_end=True, lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs={"factor": 0.9, "patience": 10}, early_stopping_patience=5,
    )
    trainer = SamInteractiveTrainer(tiny_lora_sam(), args, train_dataset=dsb["train"].select(range(4)),
                                    eval_dataset=dsb["val"])
    trainer.train()
    scheduler = trainer.lr_scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (scheduler.factor, scheduler.patience, scheduler.mode) == (0.9, 10, "min")
    evals = [e for e in trainer.state.log_history if "eval_metric" in e]
    assert [e["step"] for e in evals] == [0, 2, 4, 6]  # the untouched model is evaluated first
    assert trainer.base_metric == evals[0]["eval_metric"]
    for e in evals:
        assert e["eval_metric"] == e["eval_dice_loss"] and e["eval_dice"] == pytest.approx(1 - e["eval_dice_loss"])
        # every evaluation scores all four prompt modes, whatever the size of the validation set
        modes = [e[f"eval_dice_{m}"] for m in ("point", "box", "points", "box_points")]
        assert e["eval_dice"] == pytest.approx(np.mean(modes))
    best = min(evals, key=lambda e: e["eval_metric"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    assert trainer.best_is_base == (best["step"] == 0)
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best['step']}", "checkpoint-6"})  # best and latest
    assert (tmp_path / "loss_curve.png").is_file()
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_metric"] == second["eval_metric"]  # validation prompts are seeded, not drawn anew
    assert any(type(cb).__name__ == "EarlyStoppingCallback" for cb in trainer.callback_handler.callbacks)


def test_a_fine_tune_that_never_beats_the_base_ends_on_the_base(dsb, tmp_path):
    """No evaluation after training steps beats step 0 (learning rate 0: every evaluation ties the base, on any
    CPU; a destructive rate only got within 1e-7 of the base and flipped with AVX2 kernels): the base is kept."""
    args = training_args(
        tmp_path, n_sub_iterations=2, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2, save_total_limit=1, load_best_model_at_end=True, learning_rate=0.0,
    )
    model = tiny_sam_with("lora")
    before = trained_state(model)
    trainer = SamInteractiveTrainer(model, args, train_dataset=dsb["train"], eval_dataset=dsb["val"])
    trainer.train()
    evals = [e["eval_metric"] for e in trainer.state.log_history if "eval_metric" in e]
    assert len(evals) == 3 and min(evals[1:]) >= evals[0], evals
    assert trainer.best_is_base and trainer.state.best_model_checkpoint.endswith("checkpoint-0")
    after = trained_state(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.evaluate()["eval_metric"] == pytest.approx(evals[0])


def test_no_gradient_clipping_by_default(tmp_path):
    assert training_args(tmp_path).max_grad_norm == 0.0  # torch_em never clips
    assert training_args(tmp_path, max_grad_norm=1.0).max_grad_norm == 1.0


def test_joint_training_with_unetr_decoder(dsb, tmp_path):
    from hf_sam_peft.modeling.unetr import attach_unetr

    torch.manual_seed(0)
    model = SamModel(tiny_sam_config())
    attach_unetr(model, features=(64, 32, 16, 8))
    before = trained_state(model)
    args = training_args(tmp_path, max_steps=2, n_sub_iterations=2, train_decoder=True)
    trainer = SamInteractiveTrainer(model, args, train_dataset=dsb["train"], eval_dataset=dsb["val"])
    trainer.train()
    after = trained_state(trainer.model)
    for prefix in ("unetr_decoder.", "mask_decoder.", "vision_encoder."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert all("ais_loss" in e for e in trainer.state.log_history if "loss" in e)
    metrics = trainer.evaluate()
    assert metrics["eval_metric"] == pytest.approx(metrics["eval_dice_loss"] + metrics["eval_ais_loss"] / 3)


def test_argument_validation(tmp_path, tiny_sam):
    with pytest.raises(ValueError, match="n_sub_iterations"):
        training_args(tmp_path, n_sub_iterations=0)
    with pytest.raises(ValueError, match="mask_prob"):
        training_args(tmp_path, mask_prob=1.5)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        training_args(tmp_path, train_decoder=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="unetr_decoder"):
        SamInteractiveTrainer(tiny_sam, training_args(tmp_path, train_decoder=True))
    with pytest.raises(TypeError, match="InteractiveTrainingArguments"):
        from transformers import TrainingArguments

        SamInteractiveTrainer(tiny_sam, TrainingArguments(output_dir=str(tmp_path)))
    defaults = InteractiveTrainingArguments(output_dir=str(tmp_path))
    assert (defaults.learning_rate, defaults.weight_decay, defaults.n_objects, defaults.n_sub_iterations) == (1e-5, 0.01, 25, 8)
    assert defaults.lr_scheduler_kwargs == {"factor": 0.9, "patience": 10, "mode": "min"}
    assert not defaults.remove_unused_columns and defaults.label_names == ["labels"]


def test_interactive_loss_under_ddp(dsb, tmp_path):
    """One DDP forward per backward, with this step's unused parameters found (single-process gloo group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_lora_sam(), find_unused_parameters=True)
        batch = SamInteractiveCollator(256)([dsb["train"][i] for i in range(2)])
        for step in range(3):  # point, box, point: different parameters unused each step
            loss, _ = interactive_loss(ddp, batch, training_prompt_mode(step), n_objects=2, n_rounds=2,
                                       mask_prob=0.5, generator=prompt_generator(0, 0, step))
            loss.backward()
            ddp.zero_grad()
        assert "forward" not in ddp.module.__dict__  # the module's own forward is back
    finally:
        dist.destroy_process_group()


# ---- atomic checkpoints, damaged-checkpoint fallback (issue 15) -----------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CHECKPOINT_DAMAGE = {
    "truncated_adapter": lambda c: _truncate(c / "adapter_model.safetensors"),
    "truncated_optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "truncated_state": lambda c: _truncate(c / "trainer_state.json"),
    "missing_rng_state": lambda c: (c / "rng_state.pth").unlink(),
    "unfinished_save": lambda c: (c / "checkpoint_complete.json").unlink(),
}


@pytest.fixture(scope="module")
def two_checkpoints(dsb, tmp_path_factory):
    """A 4-step run with intact checkpoint-2 and checkpoint-4 (none deleted)."""
    from hf_sam_peft.training.trainer import checkpoint_problem

    out = tmp_path_factory.mktemp("two_checkpoints")
    args = training_args(out, max_steps=4, n_sub_iterations=2, save_strategy="steps", save_steps=2, save_total_limit=None)
    SamInteractiveTrainer(tiny_lora_sam(), args, train_dataset=dsb["train"]).train()
    assert [checkpoint_problem(out / f"checkpoint-{n}") for n in (2, 4)] == [None, None]
    return out


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(dsb, two_checkpoints, tmp_path, caplog, damage):
    import shutil

    from hf_sam_peft.training.trainer import checkpoint_problem

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    CHECKPOINT_DAMAGE[damage](out / "checkpoint-4")
    problem = checkpoint_problem(out / "checkpoint-4")
    assert problem is not None and "\n" not in problem
    args = training_args(out, max_steps=4, n_sub_iterations=2, save_strategy="steps", save_steps=2, save_total_limit=None)
    trainer = RecordingTrainer(tiny_lora_sam(), args, train_dataset=dsb["train"])
    with caplog.at_level("WARNING", logger="hf_sam_peft.training.trainer"):
        trainer.train(resume_from_checkpoint=True)
    notes = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(notes) == 1 and "checkpoint-4" in notes[0] and f"resuming from {out / 'checkpoint-2'}" in notes[0]
    assert "\n" not in notes[0]
    assert trainer.steps == [2, 3] and trainer.state.global_step == 4
    assert checkpoint_problem(out / "checkpoint-4") is None  # saved again, whole


def test_damaged_checkpoints_are_one_line_errors_never_tracebacks(dsb, two_checkpoints, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _truncate(out / "checkpoint-4" / "adapter_model.safetensors")
    args = training_args(out, max_steps=4, n_sub_iterations=2, save_strategy="steps", save_steps=2)
    trainer = SamInteractiveTrainer(tiny_lora_sam(), args, train_dataset=dsb["train"])
    with pytest.raises(ValueError) as info:  # an explicit checkpoint is not swapped for another
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    message = str(info.value)
    assert message.startswith(f"cannot resume from {out / 'checkpoint-4'}: adapter_model.safetensors is truncated")
    assert "weights_only" not in message and "\n" not in message
    (out / "checkpoint-2" / "checkpoint_complete.json").unlink()
    with pytest.raises(ValueError, match=r"no intact checkpoint to resume from in .*checkpoint-4: .*checkpoint-2: its save did not finish"):
        trainer.train(resume_from_checkpoint=True)


def test_a_resume_reads_and_hashes_its_checkpoint_once(dsb, two_checkpoints, tmp_path, monkeypatch):
    """hf_sam_peft.train checks the checkpoint before loading data and model, then SamInteractiveTrainer.train
    checks it again: the second check finds the files unchanged and does not read them; a change since (even
    one of the same size with its mtime put back) is read again and caught."""
    import os
    import shutil
    import time

    from hf_sam_peft.training import checkpoints

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    verified = []
    full_check = checkpoints._verify_checkpoint
    monkeypatch.setattr(checkpoints, "_verify_checkpoint", lambda folder: verified.append(folder.name) or full_check(folder))
    # a fresh copy is younger than SETTLED_SECONDS: read in full every time (a same-tick change would not show)
    assert [checkpoints.checkpoint_problem(out / "checkpoint-2") for _ in range(2)] == [None, None]
    assert verified == ["checkpoint-2", "checkpoint-2"]
    verified.clear()
    monkeypatch.setattr(checkpoints, "SETTLED_SECONDS", 0.0)
    time.sleep(0.05)  # the copy's stamps a clock tick behind every later write of this test

    resume = checkpoints.resolve_resume_checkpoint(True, out)  # what hf_sam_peft.train does first
    args = training_args(out, max_steps=4, n_sub_iterations=2, save_strategy="steps", save_steps=2, save_total_limit=None)
    trainer = SamInteractiveTrainer(tiny_lora_sam(), args, train_dataset=dsb["train"])
    trainer.train(resume_from_checkpoint=resume)
    assert resume == str(out / "checkpoint-4")
    assert verified == ["checkpoint-4"]

    state = out / "checkpoint-4" / "trainer_state.json"
    stamps = state.stat()
    data = bytearray(state.read_bytes())
    data[data.index(b"4")] = ord("5")  # same size, different content
    state.write_bytes(bytes(data))
    os.utime(state, ns=(stamps.st_atime_ns, stamps.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(ValueError, match=r"trainer_state.json changed after the save"):
        trainer.train(resume_from_checkpoint=resume)
    assert verified == ["checkpoint-4", "checkpoint-4"]


def test_a_failed_save_leaves_no_checkpoint_that_looks_valid(dsb, tmp_path, monkeypatch):
    import errno

    from transformers import Trainer

    from hf_sam_peft.training.trainer import CheckpointError, latest_intact_checkpoint

    write_optimizer = Trainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_optimizer(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_disk)
    args = training_args(tmp_path, max_steps=4, n_sub_iterations=2, save_strategy="steps", save_steps=2, save_total_limit=1)
    with pytest.raises(CheckpointError, match=r"could not save checkpoint .*checkpoint-4: No space left on device") as info:
        SamInteractiveTrainer(tiny_lora_sam(), args, train_dataset=dsb["train"]).train()
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert not (tmp_path / "checkpoint-4").exists()
    assert latest_intact_checkpoint(tmp_path) == (tmp_path / "checkpoint-2", [])  # rotation waited for the marker


def test_a_copied_run_resumes_from_its_own_best_checkpoint(dsb, tmp_path):
    import shutil
    from pathlib import Path

    def args_for(folder, max_steps):
        return training_args(
            folder, max_steps=max_steps, n_sub_iterations=2, eval_strategy="steps", eval_steps=2,
            save_strategy="steps", save_steps=2, save_total_limit=1, load_best_model_at_end=True,
        )

    original, copy = tmp_path / "original", tmp_path / "copy"
    SamInteractiveTrainer(tiny_lora_sam(), args_for(original, 4), train_dataset=dsb["train"],
                          eval_dataset=dsb["val"]).train()
    shutil.copytree(original, copy)
    untouched = {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()}
    trainer = SamInteractiveTrainer(tiny_lora_sam(), args_for(copy, 6), train_dataset=dsb["train"],
                                    eval_dataset=dsb["val"])
    trainer.train(resume_from_checkpoint=True)
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == copy and best.is_dir()
    assert {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()} == untouched


# ---- never worse than the base on any validation prompt mode ---------------------------------------------

MODES = ("point", "box", "points", "box_points")


def scores(metric: float, **dice: float) -> dict[str, float]:
    """Crafted evaluation metrics: the mean Dice loss (``eval_metric``) and per-mode Dice."""
    return {"eval_metric": metric, **{f"eval_dice_{m}": v for m, v in dice.items()}}


BASE_SCORES = scores(0.40, point=0.60, box=0.802, points=0.55, box_points=0.65)


def deciding_trainer(tmp_path, with_base: bool = True, **overrides) -> SamInteractiveTrainer:
    """A trainer (no training) whose base evaluation at step 0 is ``BASE_SCORES``, as ``_evaluate_base`` leaves
    it: logged at step 0 and passed through the best-metric decision."""
    settings = dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True)
    args = training_args(tmp_path, **{**settings, **overrides})
    trainer = SamInteractiveTrainer(tiny_lora_sam(), args, eval_dataset=[{}])
    if with_base:
        trainer.state.log_history.append({**BASE_SCORES, "step": 0})
        assert trainer._determine_best_metric(BASE_SCORES, None) is True
        trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-0")
    return trainer


def decide(trainer, step: int, metrics: dict[str, float]) -> bool:
    trainer.state.global_step = step
    new_best = trainer._determine_best_metric(metrics, None)
    if new_best:  # as _save_checkpoint records it
        trainer.state.best_model_checkpoint = str(Path(trainer.args.output_dir) / f"checkpoint-{step}")
    return new_best


def test_never_worse_rule_keeps_the_base_over_a_better_mean_that_loses_a_mode(tmp_path):
    trainer = deciding_trainer(tmp_path)
    # better mean (0.30 < 0.40), but box Dice 0.802 -> 0.564: rejected
    assert decide(trainer, 10, scores(0.30, point=0.75, box=0.564, points=0.70, box_points=0.80)) is False
    assert trainer.state.best_metric == 0.40 and trainer.state.best_global_step == 0
    assert trainer.best_is_base is True and trainer.state.best_model_checkpoint.endswith("checkpoint-0")
    assert trainer.rejected_evaluations == [{"step": 10, "mode": "box", "base": 0.802, "candidate": 0.564}]
    assert trainer.selection_summary() == (
        "no checkpoint qualified: every fine-tuned checkpoint was worse than the base on at least one validation "
        "mode (step 10: box Dice 0.802 -> 0.564); the best checkpoint is the base"
    )
    # just beyond the margin (0.005) on one mode is enough; the worst mode is the one recorded
    assert decide(trainer, 12, scores(0.20, point=0.594, box=0.90, points=0.90, box_points=0.64)) is False
    assert trainer.rejected_evaluations[-1] == {"step": 12, "mode": "box_points", "base": 0.65, "candidate": 0.64}
    assert decide(trainer, 14, scores(0.20, point=0.5949, box=0.90, points=0.90, box_points=0.90)) is False
    assert trainer.best_is_base is True
    summary = trainer.selection_summary()
    assert summary.startswith("no checkpoint qualified: every fine-tuned checkpoint was worse than the base")
    assert "(worst at step 10: box Dice 0.802 -> 0.564)" in summary and len(trainer.rejected_evaluations) == 3


def test_never_worse_rule_takes_the_best_mean_within_the_margin(tmp_path):
    trainer = deciding_trainer(tmp_path)
    assert decide(trainer, 10, scores(0.30, point=0.75, box=0.564, points=0.70, box_points=0.80)) is False
    within = scores(0.35, **{m: BASE_SCORES[f"eval_dice_{m}"] - 0.004 for m in MODES})  # every mode within 0.005
    assert decide(trainer, 12, within) is True
    assert decide(trainer, 14, scores(0.38, point=0.61, box=0.81, points=0.56, box_points=0.66)) is False  # worse mean
    assert decide(trainer, 16, scores(0.10, point=0.99, box=0.70, points=0.99, box_points=0.99)) is False  # loses box
    assert trainer.state.best_metric == 0.35 and trainer.state.best_global_step == 12
    assert trainer.best_is_base is False and trainer.state.best_model_checkpoint.endswith("checkpoint-12")
    assert [r["step"] for r in trainer.rejected_evaluations] == [10, 16]
    assert trainer.selection_summary() == "kept checkpoint-12: no validation mode worse than the base by more than 0.005 Dice"
    # a wider margin admits step 16 (box 0.802 -> 0.70)
    wide = deciding_trainer(tmp_path / "wide", never_worse_margin=0.2)
    assert decide(wide, 16, scores(0.10, point=0.99, box=0.70, points=0.99, box_points=0.99)) is True
    assert wide.selection_summary() == "kept checkpoint-16: no validation mode worse than the base by more than 0.2 Dice"
    assert wide.rejected_evaluations == []
    reporting = deciding_trainer(tmp_path / "report", load_best_model_at_end=False)
    decide(reporting, 10, scores(0.30, point=0.75, box=0.564, points=0.70, box_points=0.80))
    assert reporting.best_is_base is True
    assert reporting.selection_summary().endswith(
        "; load_best_model_at_end=False: the last state (step 10) was kept, the rule only reports")


@pytest.mark.parametrize("how", ["margin_none", "no_base"])
def test_without_the_rule_the_decision_is_transformers_own(tmp_path, how):
    """``never_worse_margin=None``, or no base evaluation: each decision and the state match ``Trainer``'s own."""
    from transformers import Trainer

    overrides = {"never_worse_margin": None} if how == "margin_none" else {}
    ours = deciding_trainer(tmp_path / "ours", with_base=how == "margin_none", **overrides)
    plain = deciding_trainer(tmp_path / "plain", with_base=how == "margin_none", **overrides)
    sequence = [
        (10, scores(0.30, point=0.75, box=0.564, points=0.70, box_points=0.80)),
        (12, scores(0.35, point=0.60, box=0.80, points=0.55, box_points=0.65)),
        (14, scores(0.20, point=0.10, box=0.99, points=0.99, box_points=0.99)),
        (16, scores(0.25, point=0.99, box=0.99, points=0.99, box_points=0.99)),
    ]
    for step, metrics in sequence:
        plain.state.global_step = step
        expected = Trainer._determine_best_metric(plain, metrics, None)
        assert decide(ours, step, metrics) is expected
        assert (ours.state.best_metric, ours.state.best_global_step) == (plain.state.best_metric, plain.state.best_global_step)
    assert ours.state.best_global_step == 14 and ours.rejected_evaluations == []
    assert ours.best_is_base is (False if how == "margin_none" else None)
    reason = "never-worse rule off" if how == "margin_none" else "never-worse rule not applied: the base was not evaluated"
    assert ours.selection_summary() == f"kept checkpoint-14 by the mean validation metric alone ({reason})"


def test_never_worse_margin_validation(tmp_path):
    assert training_args(tmp_path).never_worse_margin == 0.005
    assert training_args(tmp_path, never_worse_margin=None).never_worse_margin is None
    assert training_args(tmp_path, never_worse_margin=0).never_worse_margin == 0.0
    for bad in (-0.01, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="never_worse_margin"):
            training_args(tmp_path, never_worse_margin=bad)


class ForgedScores(SamInteractiveTrainer):
    """Real training, crafted validation scores after training steps: each is better than the base in the mean
    (by 0.01 per step: the last is best by the mean) and moved from the base's Dice by ``offsets`` per mode, so
    the choice does not hang on a CPU's last bits."""

    def __init__(self, *args, offsets: dict[str, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.offsets = offsets

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        step = self.state.global_step
        base = next((e for e in self.state.log_history if e.get("step") == 0 and "eval_metric" in e), None)
        if step > 0 and base is not None:
            output.metrics["eval_metric"] = base["eval_metric"] - 0.01 * step
            for mode in MODES:
                output.metrics[f"eval_dice_{mode}"] = base[f"eval_dice_{mode}"] + self.offsets.get(mode, 0.0)
        return output


def forged_run(dsb, output_dir, max_steps=4, resume=None, offsets=None, **overrides):
    settings = dict(
        n_sub_iterations=2, max_steps=max_steps, eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2, save_total_limit=1, load_best_model_at_end=True, learning_rate=0.1,
    )
    args = training_args(output_dir, **{**settings, **overrides})
    model = tiny_lora_sam()
    before = trained_state(model)
    trainer = ForgedScores(model, args, train_dataset=dsb["train"], eval_dataset=dsb["val"],
                           offsets={"box": -0.05} if offsets is None else offsets)
    trainer.train(resume_from_checkpoint=resume)
    after = trained_state(trainer.model)
    return trainer, all(torch.equal(before[k], after[k]) for k in before)


def test_a_real_run_that_loses_a_mode_ends_on_the_base(dsb, tmp_path):
    """A huge learning rate moves the weights; every evaluation after training is better in the mean but loses
    0.05 box Dice: transformers' load_best_model_at_end brings back checkpoint-0, rotation kept it."""
    trainer, equal_to_base = forged_run(dsb, tmp_path / "rule")
    assert trainer.best_is_base is True and equal_to_base
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-0")
    # rotation kept checkpoint-0 through the saves at steps 2 and 4; the end of train() drops the non-best latest
    assert sorted(p.name for p in (tmp_path / "rule").glob("checkpoint-*")) == ["checkpoint-0"]
    assert [(r["step"], r["mode"]) for r in trainer.rejected_evaluations] == [(2, "box"), (4, "box")]
    assert trainer.selection_summary().startswith("no checkpoint qualified: every fine-tuned checkpoint was worse")
    # the same run without the rule keeps the last (best-mean) fine-tune: the weights are not the base's
    plain, plain_equal = forged_run(dsb, tmp_path / "plain", never_worse_margin=None)
    assert plain.best_is_base is False and not plain_equal
    assert plain.state.best_model_checkpoint.endswith("checkpoint-4")
    # within the margin on every mode, the best mean is kept
    within, within_equal = forged_run(dsb, tmp_path / "within", offsets={m: -0.004 for m in MODES})
    assert within.best_is_base is False and not within_equal and within.rejected_evaluations == []
    assert within.selection_summary() == "kept checkpoint-4: no validation mode worse than the base by more than 0.005 Dice"


def test_resume_keeps_the_base_per_mode_scores(dsb, tmp_path):
    """A resumed run (a new trainer) judges its evaluations against the first run's base, read from the step-0
    entry of log_history, and recovers the earlier rejections."""
    first, _ = forged_run(dsb, tmp_path, max_steps=4, save_total_limit=None)  # checkpoint-4 stays to resume from
    base = first.base_dice
    assert set(base) == set(MODES) and base == {m: first.state.log_history[0][f"eval_dice_{m}"] for m in MODES}
    resumed, equal_to_base = forged_run(dsb, tmp_path, max_steps=6, resume=True, save_total_limit=None)
    assert resumed._initial_global_step == 4
    assert resumed.base_metric is None and resumed.base_dice == base  # not evaluated again: recovered
    assert [r["step"] for r in resumed.rejected_evaluations] == [2, 4, 6]
    assert resumed.rejected_evaluations[-1] == {"step": 6, "mode": "box", "base": base["box"],
                                                "candidate": pytest.approx(base["box"] - 0.05)}
    assert resumed.best_is_base is True and equal_to_base
    assert resumed.state.best_model_checkpoint.endswith("checkpoint-0")


def test_the_train_summary_prints_the_selection(tmp_path):
    from hf_sam_peft.train import format_summary

    summary = {
        "recipe": "r", "method": "lora", "base_model": "tiny", "ais": False, "trainable_parameters": 10, "steps": 4,
        "train_loss": 0.5, "best_checkpoint": "out/checkpoint-0", "best_metric": 0.4, "base_metric": 0.4,
        "best_is_base": True, "adapter": "out/adapter", "loss_curve": "out/loss_curve.png",
        "selection": "no checkpoint qualified: every fine-tuned checkpoint was worse than the base on at least one "
                     "validation mode (step 2: box Dice 0.802 -> 0.564); the best checkpoint is the base",
    }
    printed = format_summary(summary)
    assert f"  selection: {summary['selection']}" in printed.splitlines()
    assert "FINE-TUNING DID NOT BEAT THE BASE (best_is_base)" in printed and "not a fine-tune" in printed
    kept = format_summary({**summary, "best_is_base": False, "best_checkpoint": "out/checkpoint-4",
                           "selection": "kept checkpoint-4: no validation mode worse than the base by more than 0.005 Dice"})
    assert "  selection: kept checkpoint-4" in kept and "DID NOT BEAT" not in kept
