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
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
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
    code = cli_main(["train", str(ROOT / "recipes" / "smoke_tiny.yaml"), "--output-dir", str(out), "--max-steps", "2",
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tmp_path):
    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(_free_port()), "-m", "hf_sam_peft.train", str(ROOT / "recipes" / "smoke_tiny.yaml"),
        "--output-dir", str(out), "--max-steps", "2", "--set", "n_sub_iterations=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert result.stdout.count("adapter saved to") == 1  # only the main process reports
