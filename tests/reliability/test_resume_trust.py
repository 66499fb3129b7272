"""`--resume` trusts nothing it has not checked (issue 31, item 4): checksums, finite weights and optimizer state,
the run's saved settings; a non-finite loss stops the run and keeps the last good checkpoint.

Every fault is real: bytes flipped in a saved checkpoint, NaN written into its safetensors / optimizer state,
a changed flag on the command line of `hf-sam-peft train --resume`, a learning rate that makes the loss NaN.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_sam_peft.cli import main as cli_main
from tests.conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "hf_sam_peft" / "recipes" / "smoke_tiny.yaml")
FAST = ["--set", "n_sub_iterations=2"]


def train_cli(capsys, out: Path, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["train", SMOKE, "--output-dir", str(out), *FAST, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if "hf-sam-peft train: error" in line]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    """A real 2-step run of the tiny recipe (its checkpoint-2 complete), copied by each test."""
    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    out = tmp_path_factory.mktemp("resume_trust") / "run"
    assert cli_main(["train", SMOKE, "--output-dir", str(out), *FAST, "--max-steps", "2"]) == 0
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    return out


@pytest.fixture
def run(two_step_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(two_step_run, copy)
    return copy


def test_a_checkpoint_changed_after_its_save_is_refused(run, capsys):
    """Same size, other bytes (a flipped bit in the weights): sizes alone never noticed."""
    path = run / "checkpoint-2" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor, not the header: the file still parses
    path.write_bytes(bytes(data))
    before = snapshot(run)
    code, _, err = train_cli(capsys, run, "--max-steps", "4", "--resume", str(run / "checkpoint-2"))
    errors = error_lines(err)
    assert code == 2 and len(errors) == 1, err
    assert f"cannot resume from {run / 'checkpoint-2'}: adapter_model.safetensors changed after the save" in errors[0]
    assert snapshot(run) == before  # nothing the user had was touched


def _nan_into_adapter(checkpoint: Path) -> str:
    from safetensors.torch import load_file, save_file

    path = checkpoint / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


def _nan_into_optimizer(checkpoint: Path) -> str:
    path = checkpoint / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    index = sorted(state["state"])[0]
    state["state"][index]["exp_avg"].fill_(float("nan"))
    torch.save(state, path)
    return f"state.{index}.exp_avg"


@pytest.mark.parametrize("poison", [_nan_into_adapter, _nan_into_optimizer], ids=["weights", "optimizer"])
def test_a_complete_checkpoint_holding_nan_is_refused(run, capsys, poison):
    """NaN saved as part of the checkpoint (its marker written after, checksums match): still refused."""
    from hf_sam_peft.training.trainer import checkpoint_problem, mark_checkpoint_complete

    checkpoint = run / "checkpoint-2"
    where = poison(checkpoint)
    mark_checkpoint_complete(checkpoint)  # as a save of those values would have written it
    problem = checkpoint_problem(checkpoint)
    assert problem is not None and "NaN or inf" in problem and where in problem and "\n" not in problem
    before = snapshot(run)
    code, _, err = train_cli(capsys, run, "--max-steps", "4", "--resume", str(checkpoint))
    errors = error_lines(err)
    assert code == 2 and len(errors) == 1, err
    assert f"cannot resume from {checkpoint}: " in errors[0] and "holds NaN or inf values" in errors[0]
    assert snapshot(run) == before


def test_changed_settings_on_resume_are_refused_or_applied_with_the_flag(run, capsys):
    before = snapshot(run)
    code, _, err = train_cli(capsys, run, "--max-steps", "4", "--resume",
                             "--set", "learning_rate=1e-4", "--set", "n_objects=2")
    errors = error_lines(err)
    assert code == 2 and len(errors) == 1, err
    assert "settings differ from the run's saved configuration" in errors[0]
    assert "learning_rate 0.001 -> 0.0001" in errors[0] and "n_objects 4 -> 2" in errors[0]
    assert "--allow-changed-settings" in errors[0]
    assert snapshot(run) == before

    # the model itself never changes on resume, flag or not
    code, _, err = train_cli(capsys, run, "--max-steps", "4", "--resume", "--method", "fact", "--allow-changed-settings")
    errors = error_lines(err)
    assert code == 2 and len(errors) == 1 and "method" in errors[0] and "another --output-dir" in errors[0], err
    assert snapshot(run) == before

    # a longer run is what resume is for: not a changed setting
    code, printed, err = train_cli(capsys, run, "--max-steps", "4", "--resume", "--set", "learning_rate=1e-4",
                                   "--allow-changed-settings")
    assert code == 0, err
    assert "steps: 4" in printed and "learning_rate 0.001 -> 0.0001" in err
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    rates = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    assert rates[2] == pytest.approx(1e-3) and rates[4] == pytest.approx(1e-4)  # applied, not the optimizer's old one
    saved = json.loads((run / "run_config.json").read_text())["settings"]
    assert saved["training.learning_rate"] == pytest.approx(1e-4)  # the next resume compares with the new value


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """A learning rate of 1e30 sends the weights to inf after one step: the next loss is NaN."""
    from hf_sam_peft.training.trainer import checkpoint_problem, list_checkpoints

    shared_dataset("dsb2018_stage1test_fluo_nuclei")
    out = tmp_path / "run"
    code, _, err = train_cli(capsys, out, "--set", "learning_rate=1e30", "--max-steps", "4")
    errors = error_lines(err)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "training stopped at step 2: the loss is nan (not finite)" in errors[0]
    assert f"the last good checkpoint is {out / 'checkpoint-0'}" in errors[0]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0"]
    assert checkpoint_problem(out / "checkpoint-0") is None  # the untouched base, intact and finite
    assert not (out / "adapter").exists()  # no adapter of a diverged run
