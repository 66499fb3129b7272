"""SAM 2 through every user-facing path: `train` from a recipe, `evaluate`, `segment`, the study grid and the
app's logic, all on the random tiny SAM 2 (`tiny_sam2`) and the small real nuclei set beside the checkout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from hf_sam_peft import cli
from tests.conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[2]
DATASET = "dsb2018_stage1test_fluo_nuclei"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`hf-sam-peft train` on tiny_sam2 with FacT and the UNETR decoder: a saved adapter with provenance."""
    shared_dataset(DATASET)
    out = tmp_path_factory.mktemp("sam2") / "run"
    code = cli.main(["train", str(ROOT / "hf_sam_peft" / "recipes" / "smoke_tiny.yaml"), "--base-model", "tiny_sam2", "--method",
                     "fact", "--set", "method_options.r=4", "--ais", "--max-steps", "2", "--set",
                     "n_sub_iterations=2", "--output-dir", str(out)])
    assert code == 0
    return out


def test_train_saves_a_sam2_adapter_that_loads_back(trained):
    from transformers import Sam2Model

    import hf_sam_peft

    provenance = json.loads((trained / "adapter" / "hf_sam_peft.json").read_text())
    assert provenance["base_model"] == "tiny_sam2" and provenance["base_model_type"] == "sam2"
    assert (trained / "adapter" / "unetr").is_dir()
    model = hf_sam_peft.from_pretrained(trained / "adapter")  # fetches the base the adapter names
    assert isinstance(model.get_base_model(), Sam2Model)
    assert model.peft_config["default"].r == 4


def test_evaluate_and_segment_take_a_sam2_base(trained, tmp_path, capsys):
    data = shared_dataset(DATASET)
    out = tmp_path / "scores.csv"
    assert cli.main(["evaluate", "--base", "tiny_sam2", "--adapter", str(trained / "adapter"), "--data", str(data),
                     "--split", "val", "--max-images", "1", "--n-corrections", "1", "--out", str(out),
                     "--no-progress"]) == 0
    (row,) = list(csv.DictReader(out.open()))
    for column in ("point", "box", "ip", "ib", "ais"):
        assert 0.0 <= float(row[column]) <= 1.0, column

    image = sorted((data / "val" / "images").iterdir())[0]
    label = sorted((data / "val" / "labels").iterdir())[0]
    seg = tmp_path / "seg"
    assert cli.main(["segment", "--base", "tiny_sam2", "--adapter", str(trained / "adapter"), str(image),
                     "--boxes-from", str(label), "--out", str(seg)]) == 0
    truth = tifffile.imread(label)
    for kind in ("ais", "boxes"):
        result = tifffile.imread(seg / f"{image.stem}_{kind}.tif")
        assert result.shape == truth.shape[:2] and np.issubdtype(result.dtype, np.integer)
    assert tifffile.imread(seg / f"{image.stem}_boxes.tif").max() > 0


def test_app_logic_with_a_sam2_base(trained, tmp_path):
    from PIL import Image

    from hf_sam_peft.app import AppLogic, ModelBank, Session
    from hf_sam_peft.evaluation.predictor import load_base

    data = shared_dataset(DATASET)
    bank = ModelBank(load_base("tiny_sam2"), [str(trained / "adapter")])
    logic = AppLogic(bank, out_dir=tmp_path / "out")
    session = Session()
    image = np.asarray(Image.open(sorted((data / "val" / "images").iterdir())[0]).convert("RGB"))
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    logic.load(session, path)
    logic.click(session, 20, 20, "positive point")
    assert session.labels is not None and session.labels.shape == image.shape[:2]
    adapter = bank.names[1]
    logic.set_model(session, adapter)  # same prompt, the adapter's answer
    assert session.labels.shape == image.shape[:2]
    logic.segment_all(session)  # the adapter's UNETR decoder on SAM 2's embedding
    assert session.result_kind == "ais" and session.labels.shape == image.shape[:2]


def test_study_grid_runs_on_a_sam2_base(tmp_path):
    shared_dataset(DATASET)
    from hf_sam_peft.study import run_study, study_from_dict

    spec = yaml.safe_load((ROOT / "hf_sam_peft" / "recipes" / "studies" / "smoke_tiny.yaml").read_text())
    spec.update(name="smoke_sam2", base_model="tiny_sam2", methods=["ssf"])
    torch.manual_seed(0)
    result = run_study(study_from_dict(spec), tmp_path / "study", isolate=False, progress=False)
    assert not result.failed and sorted(cell.split("__")[1] for cell in result.ran) == ["base", "ssf"]
    rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
    assert {r["method"] for r in rows} == {"base", "ssf"}
    assert all(0.0 <= float(r[mode]) <= 1.0 for r in rows for mode in ("point", "box", "ip", "ib"))
