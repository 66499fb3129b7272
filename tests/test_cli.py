"""The `hf-sam-peft` command: a bad input is one line `hf-sam-peft <command>: error: ...` and exit status 2.

Every case here fails before any data or model is loaded, so the whole file runs in seconds. The table of
bad inputs and their messages is tests/BAD_INPUTS.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hf_sam_peft.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "hf_sam_peft" / "recipes" / "smoke_tiny.yaml")


def one_error_line(capsys, argv) -> str:
    """Run the CLI in-process; assert status 2 and a single `hf-sam-peft <command>: error:` line; return it."""
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"hf-sam-peft {argv[0]}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_malformed_recipe_yaml_names_the_file_and_position(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: livecell\ntraining: {learning_rate: 1e-4\n")
    line = one_error_line(capsys, ["train", str(bad)])
    assert str(bad) in line and "malformed YAML at line 4, column 1" in line


def test_recipe_that_is_not_a_mapping(tmp_path, capsys):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    assert str(bad) in one_error_line(capsys, ["train", str(bad)])


def test_missing_recipe(tmp_path, capsys):
    line = one_error_line(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert "nope.yaml does not exist" in line


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("learning_rate=abc", "training argument learning_rate='abc': expected a number"),
        ("max_steps=abc", "training argument max_steps='abc': expected an integer"),
        ("max_steps=2.5", "training argument max_steps=2.5: expected an integer"),
        ("n_sub_iterations=abc", "training argument n_sub_iterations='abc': expected an integer"),
        ("use_cpu=maybe", "training argument use_cpu='maybe': expected true/false"),
        ("max_steps=0", "max_steps=0: expected a positive number of steps"),
        ("no_such_argument=1", "unknown training argument 'no_such_argument'"),
    ],
)
def test_bad_training_setting_names_the_key(tmp_path, capsys, setting, expected):
    line = one_error_line(capsys, ["train", SMOKE, "--output-dir", str(tmp_path / "run"), "--set", setting])
    assert expected in line


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_non_positive_max_steps(tmp_path, capsys, steps):
    line = one_error_line(capsys, ["train", SMOKE, "--output-dir", str(tmp_path / "run"), "--max-steps", steps])
    assert f"--max-steps must be a positive number of optimizer steps, got {steps}" in line


@pytest.mark.parametrize("argv", [["--device", "cuda"], ["--set", "use_cpu=false"]])
def test_gpu_without_cuda(tmp_path, capsys, argv):
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    line = one_error_line(capsys, ["train", SMOKE, "--output-dir", str(tmp_path / "run"), *argv])
    assert "a GPU was asked for" in line and "--device cpu" in line


def test_output_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("")
    line = one_error_line(capsys, ["train", SMOKE, "--output-dir", str(target)])
    assert f"output folder {target} is a file" in line
    line = one_error_line(capsys, ["train", SMOKE, "--output-dir", str(target / "sub")])
    assert f"output folder {target / 'sub'} is not writable" in line


def test_unwritable_output_folder(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        folder = Path("/proc/hf_sam_peft_not_writable")  # even root cannot create folders in /proc
        if not Path("/proc").is_dir():
            pytest.skip("no /proc and running as root: no unwritable folder to try")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    line = one_error_line(capsys, ["train", SMOKE, "--output-dir", str(folder / "run")])
    assert f"output folder {folder / 'run'} is not writable" in line


def test_negative_dropout_names_the_method(tmp_path, capsys):
    line = one_error_line(
        capsys, ["train", SMOKE, "--output-dir", str(tmp_path / "run"), "--set", "method_options.lora_dropout=-0.1"]
    )
    assert "method 'lora': lora_dropout must be a number in [0, 1), got -0.1" in line
    line = one_error_line(
        capsys, ["train", SMOKE, "--output-dir", str(tmp_path / "run"), "--method", "fact", "--set",
                 "method_options.dropout=-0.5"]
    )
    assert "method 'fact': dropout must be a number in [0, 1), got -0.5" in line


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    line = one_error_line(capsys, ["train", SMOKE, "--output-dir", str(tmp_path), "--resume", "--overwrite"])
    assert "--resume and --overwrite exclude each other" in line


def test_resume_without_a_checkpoint(tmp_path, capsys):
    line = one_error_line(capsys, ["train", SMOKE, "--output-dir", str(tmp_path), "--resume"])
    assert f"no checkpoint to resume from in {tmp_path}" in line


def test_push_offline_is_one_line(tmp_path, capsys, monkeypatch):
    import torch
    from transformers import SamModel

    from hf_sam_peft import apply_method
    from hf_sam_peft.hub import save_adapter
    from hf_sam_peft.modeling.sam import tiny_sam_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    adapter = save_adapter(apply_method(SamModel(tiny_sam_config()), "lora", r=2), tmp_path / "adapter",
                           base_model_id="tiny", method="lora")
    line = one_error_line(capsys, ["push", str(adapter), "org/name"])
    assert "HF_HUB_OFFLINE=1" in line and str(adapter) in line


def test_push_missing_folder(tmp_path, capsys):
    line = one_error_line(capsys, ["push", str(tmp_path / "none"), "org/name"])
    assert str(tmp_path / "none") in line


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [livecell\n")
    result = subprocess.run(
        [sys.executable, "-m", "hf_sam_peft.cli", "train", str(bad)], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("hf-sam-peft")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(bad) in lines[0] and "malformed YAML" in lines[0]
