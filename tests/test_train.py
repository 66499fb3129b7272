"""The training entry point: recipes, overrides, a real (tiny) run, and DDP through `accelerate launch`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sam_peft.cli import main as cli_main
from hf_sam_peft.train import load_recipe
from tests.conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "hf_sam_peft" / "recipes").glob("*.yaml"))
PAPER = ["covid_if", "hpa", "gonuclear", "orgasegment", "platynereis_cilia", "mitolab", "livecell",
         "amd_sd", "jsrt", "mice_tumseg", "papila", "motum", "psfhs"]


def test_every_paper_dataset_has_a_recipe():
    names = {p.stem for p in RECIPES}
    assert set(PAPER) <= names and "single_image" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_are_valid(path):
    from hf_sam_peft.data import load_dataset_recipe
    from hf_sam_peft.methods import get_method
    from hf_sam_peft.training.trainer import InteractiveTrainingArguments

    recipe = load_recipe(path)
    get_method(recipe.method)
    load_dataset_recipe(recipe.dataset)
    args = InteractiveTrainingArguments(output_dir="unused", **recipe.training)
    if recipe.name in PAPER:
        assert (args.per_device_train_batch_size, args.n_objects, args.learning_rate) == (2, 25, 1e-5)
    if recipe.name == "single_image":
        assert args.n_objects == 5 and recipe.data["max_images"] == 1


def test_bad_recipe_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: livecell\nlearning_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\]"):
        load_recipe(path)


def test_train_command_runs_a_recipe_and_saves_a_loadable_adapter(tmp_path, capsys):
    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    out = tmp_path / "run"
    code = cli_main(["train", str(ROOT / "hf_sam_peft" / "recipes" / "smoke_tiny.yaml"), "--output-dir", str(out), "--max-steps", "2",
                     "--set", "n_sub_iterations=2", "--method", "fact", "--set", "method_options.r=4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "adapter saved to" in printed and "fact on tiny" in printed
    assert (out / "loss_curve.png").stat().st_size > 1000
    from transformers import SamModel

    import hf_sam_peft
    from hf_sam_peft.modeling.sam import tiny_sam_config

    torch.manual_seed(0)  # the recipe's seed: the same random tiny base
    model = hf_sam_peft.load_adapter(SamModel(tiny_sam_config()), str(out / "adapter")).eval()
    assert model.peft_config["default"].r == 4
    with torch.no_grad():
        masks = model(pixel_values=torch.randn(1, 3, 256, 256), input_points=torch.tensor([[[[64.0, 64.0]]]])).pred_masks
    assert torch.isfinite(masks).all()


def test_a_run_that_never_beats_the_base_says_so(tmp_path, capsys):
    """Nothing beats the base (learning rate 0: evaluations tie it on any CPU): the summary says plainly that
    the base was kept, the adapter holds it."""
    import json

    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    out = tmp_path / "run"
    code = cli_main(["train", str(ROOT / "hf_sam_peft" / "recipes" / "smoke_tiny.yaml"), "--output-dir", str(out), "--max-steps", "2",
                     "--set", "n_sub_iterations=1", "--set", "learning_rate=0.0", "--set", "point_multimask=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "FINE-TUNING DID NOT BEAT THE BASE" in printed
    summary = json.loads((out / "adapter" / "training_summary.json").read_text())
    assert summary["best_is_base"] is True and summary["best_checkpoint"].endswith("checkpoint-0")
    provenance = json.loads((out / "adapter" / "hf_sam_peft.json").read_text())
    assert provenance["point_multimask"] is False
    assert provenance["extra"]["resize_inputs"] is False  # patches: evaluate / segment serve it so unless told


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tmp_path):
    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(_free_port()), "-m", "hf_sam_peft.train", str(ROOT / "hf_sam_peft" / "recipes" / "smoke_tiny.yaml"),
        "--output-dir", str(out), "--max-steps", "2", "--set", "n_sub_iterations=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert result.stdout.count("adapter saved to") == 1  # only the main process reports


# ---- nothing lost, same seed same adapter (issue 15) ----------------------------------------------------

SMOKE = str(ROOT / "hf_sam_peft" / "recipes" / "smoke_tiny.yaml")
FAST = ["--set", "n_sub_iterations=2"]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main(["train", SMOKE, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method", ["lora", "qlora", "adaptformer", "fact"])
def test_the_seed_fixes_the_initial_adapter(method):
    from hf_sam_peft.train import build_model

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    recipe = load_recipe(SMOKE)
    recipe.method = method
    recipe.method_options = {} if method in ("adaptformer",) else {"r": 4}
    torch.manual_seed(123)  # whatever the global RNG did before, the recipe's seed decides
    first = {k: v.detach().clone() for k, v in build_model(recipe, ais=False).state_dict().items()}
    torch.manual_seed(456)
    second = build_model(recipe, ais=False).state_dict()
    assert_bit_identical(first, second)


@pytest.mark.parametrize("method", ["lora", "fact"])
def test_two_runs_with_the_same_seed_give_the_same_adapter(tmp_path, capsys, method):
    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    for name in ("a", "b"):
        code, _, err = run_cli(capsys, "--output-dir", str(tmp_path / name), "--method", method, "--max-steps", "2", *FAST)
        assert code == 0, err
    assert_bit_identical(adapter_tensors(tmp_path / "a" / "adapter"), adapter_tensors(tmp_path / "b" / "adapter"))


def test_an_earlier_run_is_never_replaced_by_accident(tmp_path, capsys):
    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    out = tmp_path / "run"
    assert run_cli(capsys, "--output-dir", str(out), "--max-steps", "2", *FAST)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "--output-dir", str(out), "--max-steps", "2", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"output folder {out} already holds a run (checkpoint-2, adapter)" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    code, printed, err = run_cli(capsys, "--output-dir", str(out), "--max-steps", "2", "--overwrite", *FAST)
    assert code == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns != before["adapter_model.safetensors"]


def test_resume_of_a_copied_run_uses_the_copy(tmp_path, capsys):
    import json
    import shutil

    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    original, copy = tmp_path / "original", tmp_path / "copy"
    assert run_cli(capsys, "--output-dir", str(original), *FAST)[0] == 0
    shutil.copytree(original, copy)
    state = json.loads(next(copy.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["best_model_checkpoint"].startswith(str(original))  # absolute paths of the original
    untouched = {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()}
    copied = sorted(p.name for p in copy.glob("checkpoint-*"))

    code, printed, err = run_cli(capsys, "--output-dir", str(copy), "--resume", *FAST)
    assert code == 0, err
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == copied  # the copy's only checkpoint survives
    assert f"best checkpoint: {copy}" in printed
    loss = float(printed.split("final mean training loss: ")[1].split()[0])
    summary = json.loads((original / "adapter" / "training_summary.json").read_text())
    assert loss == pytest.approx(summary["train_loss"], rel=1e-3) and loss > 0  # not 0.0000
    assert {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()} == untouched
    assert_bit_identical(adapter_tensors(original / "adapter"), adapter_tensors(copy / "adapter"))


def test_resume_after_a_crash_gives_the_uninterrupted_adapter(tmp_path, capsys, monkeypatch):
    """A run that dies right after its step-2 checkpoint, resumed, ends bit for bit where an uninterrupted one does."""
    from hf_sam_peft.training.trainer import SamInteractiveTrainer

    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    assert run_cli(capsys, "--output-dir", str(tmp_path / "full"), *FAST)[0] == 0

    class Crash(Exception):
        pass

    save = SamInteractiveTrainer._save_checkpoint

    def save_then_crash(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 2:
            raise Crash

    monkeypatch.setattr(SamInteractiveTrainer, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        cli_main(["train", SMOKE, "--output-dir", str(tmp_path / "part"), *FAST])
    monkeypatch.undo()
    assert not (tmp_path / "part" / "adapter").exists()
    code, printed, err = run_cli(capsys, "--output-dir", str(tmp_path / "part"), "--resume", *FAST)
    assert code == 0, err
    assert "steps: 4" in printed
    assert_bit_identical(adapter_tensors(tmp_path / "full" / "adapter"), adapter_tensors(tmp_path / "part" / "adapter"))


def test_sigkill_after_the_first_checkpoint_then_resume(tmp_path):
    """A real `kill -9` of `python -m hf_sam_peft.train` once a checkpoint is complete; --resume finishes the run
    with the adapter of an uninterrupted run (both in subprocesses with one thread: bit for bit on CPU)."""
    import signal
    import time

    from hf_sam_peft.training.trainer import CHECKPOINT_MARKER

    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    base = [sys.executable, "-m", "hf_sam_peft.train", SMOKE, *FAST]
    killed = subprocess.Popen(base + ["--output-dir", str(tmp_path / "part")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full = subprocess.Popen(base + ["--output-dir", str(tmp_path / "full")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "part" / "checkpoint-2" / CHECKPOINT_MARKER
    deadline = time.monotonic() + 240
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert marker.exists(), "the run ended before its first checkpoint"
    _, err = full.communicate(timeout=240)
    assert full.returncode == 0, err[-2000:]
    if (tmp_path / "part" / "adapter").exists():
        pytest.skip("the run finished before the kill landed")
    resumed = subprocess.run(base + ["--output-dir", str(tmp_path / "part"), "--resume"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "steps: 4" in resumed.stdout
    assert_bit_identical(adapter_tensors(tmp_path / "full" / "adapter"), adapter_tensors(tmp_path / "part" / "adapter"))


def test_full_disk_while_saving_is_one_line_and_resume_skips_the_damage(tmp_path, capsys, monkeypatch):
    import errno

    from transformers import Trainer

    from hf_sam_peft.training.trainer import CHECKPOINT_MARKER

    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    out = tmp_path / "run"
    write_rng = Trainer._save_rng_state

    def full_disk_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            (Path(output_dir) / "rng_state.pth").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_disk_at_step_4)
    code, _, err = run_cli(capsys, "--output-dir", str(out), *FAST)
    errors = [line for line in err.replace("\r", "\n").splitlines() if "hf-sam-peft" in line]  # tqdm bars: stderr too
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"could not save checkpoint {out / 'checkpoint-4'}: No space left on device" in err
    assert not (out / "checkpoint-4").exists()  # no half-written checkpoint left behind
    assert (out / "checkpoint-2" / CHECKPOINT_MARKER).is_file()
    monkeypatch.undo()
    code, printed, err = run_cli(capsys, "--output-dir", str(out), "--resume", *FAST)
    assert code == 0, err
    assert "steps: 4" in printed and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_medical_recipe_trains_on_resized_whole_images_and_patches_on_request(tmp_path, capsys):
    import argparse

    from hf_sam_peft.train import add_arguments, apply_overrides, build_datasets

    shared_dataset("hc18_fetal_head_ultrasound")
    recipe_path = tmp_path / "hc18.yaml"
    recipe_path.write_text(
        (ROOT / "hf_sam_peft" / "recipes" / "smoke_tiny.yaml").read_text().replace(
            "dataset: dsb2018_stage1test_fluo_nuclei", "dataset: hc18_fetal_head_ultrasound"
        )
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flags, whole in (([], True), (["--patches"], False), (["--resize"], True)):
        recipe = apply_overrides(load_recipe(recipe_path), parser.parse_args([str(recipe_path), *flags]))
        train, val, _ = build_datasets(recipe)
        sample = train[0]
        assert sample["image"].shape == (512, 512, 3)
        assert ("_y" not in sample["id"]) == whole, flags  # a whole resized image has no patch position
    out = tmp_path / "run"
    assert cli_main(["train", str(recipe_path), "--output-dir", str(out), "--max-steps", "2", "--set", "n_sub_iterations=1"]) == 0
    printed = capsys.readouterr().out
    assert "adapter saved to" in printed and "selection:" in printed


# ------------------------------------------------------------------------------------------ issue 32: one data pipeline

def _row_digest(row) -> str:
    """sha256 (16 hex) of a served row: every column's dtype, shape and bytes; ``source`` by file name."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for key in sorted(row):
        value = Path(str(row[key])).name if key == "source" else row[key]
        if isinstance(value, str):
            digest.update(f"{key}={value};".encode())
        else:
            array = np.ascontiguousarray(np.asarray(value))
            digest.update(f"{key}:{array.dtype}:{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# Recorded with the pipeline as it was before DataOptions (loose keyword arguments), by this very code: the first
# four training samples of epoch 0, the first two of epoch 1, the first three validation rows, and the sizes.
FIRST_BATCHES = {
    ("usiigaci_phase_contrast_cells", ()): dict(
        n_train=16, n_val=8, ids=["set01_y434_x326", "set01_y454_x230", "set05_y113_x319", "set05_y370_x392"],
        epoch0=["3620c1d2129cc162", "53ebd3e833164312", "41f3f1572cecae5a", "8a5be0ecbc8cb421"],
        epoch1=["301b4f8992313130", "61c15989eedc83c1"],
        val=["c958b71dd9e23d14", "2064020ef03ff396", "8507eb51b5fa38a1"],
        val_ids=["set40_y0_x0", "set40_y0_x512", "set40_y510_x0"],
    ),
    ("hc18_fetal_head_ultrasound", ()): dict(
        n_train=7, n_val=3, ids=["000_HC", "050_HC", "120_HC", "200_HC"],
        epoch0=["f9750c34b6b508d6", "1f435e950b7df3b5", "8f3c3505e701aa81", "bef3a73c4425b145"],
        epoch1=["f9750c34b6b508d6", "1f435e950b7df3b5"],
        val=["f4ee3f87385b07d9", "c1e9ba4ee244b237", "2904a04b11a09e9b"], val_ids=["600_HC", "700_HC", "800_HC"],
    ),
    ("usiigaci_phase_contrast_cells", ("--set", "data.val_split=null")): dict(
        n_train=14, n_val=4, ids=["set01_y434_x326", "set01_y454_x230", "set05_y113_x319", "set05_y370_x392"],
        epoch0=["3620c1d2129cc162", "53ebd3e833164312", "41f3f1572cecae5a", "8a5be0ecbc8cb421"],
        epoch1=["301b4f8992313130", "61c15989eedc83c1"],
        val=["b2382699a96f9430", "ed44d480262997cd", "4d856748778d073b"],
        val_ids=["set10_y0_x0", "set10_y0_x512", "set10_y510_x0"],
    ),
    ("hc18_fetal_head_ultrasound", ("--set", "data.val_split=null")): dict(
        n_train=6, n_val=1, ids=["000_HC", "050_HC", "200_HC", "300_HC"],
        epoch0=["f9750c34b6b508d6", "1f435e950b7df3b5", "bef3a73c4425b145", "e28424ce83ec2599"],
        epoch1=["f9750c34b6b508d6", "1f435e950b7df3b5"], val=["8f3c3505e701aa81"], val_ids=["120_HC"],
    ),
}


@pytest.mark.parametrize("name, flags", list(FIRST_BATCHES), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_train_data_serves_the_same_first_batches_as_before_the_options_object(name, flags):
    """`train --data DIR` (folder_tiles on Usiigaci, folder_resize on HC18; val/ or a held-out tenth): the same seed
    gives the same samples as the loose-keyword pipeline did. A changed digest means a changed training run
    (or a changed resize in scikit-image / numpy, for HC18's resized images)."""
    import argparse

    from hf_sam_peft.train import add_arguments, apply_overrides, build_datasets, recipe_from_args

    root = shared_dataset(name)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", str(root), *flags])
    recipe, _ = recipe_from_args(args)
    train, val, _ = build_datasets(apply_overrides(recipe, args))
    expected = FIRST_BATCHES[(name, flags)]
    assert (len(train), len(val)) == (expected["n_train"], expected["n_val"])
    assert [train[i]["id"] for i in range(4)] == expected["ids"]
    assert [_row_digest(train[i]) for i in range(4)] == expected["epoch0"]
    train.set_epoch(1)
    assert [_row_digest(train[i]) for i in range(2)] == expected["epoch1"]
    shown = range(len(expected["val"]))
    assert [str(val[i]["id"]) for i in shown] == expected["val_ids"]
    assert [_row_digest(val[i]) for i in shown] == expected["val"]


def test_recipe_data_keys_are_data_options_and_reach_them():
    from hf_sam_peft.data import DataOptions, load_dataset_recipe
    from hf_sam_peft.train import Recipe, data_keys, data_options

    # one list: every option with a YAML spelling is a recipe key (resize_inputs, label_mode, min_objects too)
    assert set(data_keys()) == set(DataOptions.names()) - {"label_transform"}
    spec = load_dataset_recipe("folder_tiles")
    recipe = Recipe(name="x", dataset="folder_tiles", seed=7,
                    data={"val_fraction": 0.25, "patch_shape": [64, 64], "augment": "none"})
    options = data_options(recipe, spec)
    assert (options.seed, options.val_fraction, options.patch_shape, options.augment) == (7, 0.25, (64, 64), "none")
    assert (options.min_num_instances, options.sampler_min_size, options.min_size) == (3, 25, 25)  # the recipe's
    for data, message in (({"no_such": 1}, "unknown data option 'no_such'"), ({"seed": 3}, "data.seed"),
                          ({"val_fraction": 1.5}, "val_fraction: expected a float in")):
        with pytest.raises(ValueError, match=message) as info:
            data_options(Recipe(name="x", dataset="folder_tiles", data=data), spec)
        assert "\n" not in str(info.value)


def test_a_training_recipe_may_set_every_data_option(tmp_path):
    """resize_inputs / label_mode in a training recipe's data: section load (they were refused before there was
    one list of data keys), and an unknown key is one line listing the allowed ones."""
    from hf_sam_peft.train import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndataset: folder_resize\nbase_model: tiny\nmethod: lora\n"
                    "data: {resize_inputs: true, label_mode: semantic, min_objects: 1}\n")
    assert load_recipe(path).data["resize_inputs"] is True
    path.write_text("name: r\ndataset: folder_resize\nbase_model: tiny\nmethod: lora\ndata: {resize: true}\n")
    with pytest.raises(ValueError, match=r"unknown data keys \['resize'\] \(allowed: .*'resize_inputs'"):
        load_recipe(path)
