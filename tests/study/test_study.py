"""The study command: the grid, validation, a real tiny study, resuming, the tables and plots."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from hf_sam_peft.study import efficiency_points, expand_cells, load_study, markdown_report, run_study, study_from_dict
from hf_sam_peft.study.cell import RESULT_NAME
from tests.conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "hf_sam_peft" / "recipes" / "studies" / "smoke_tiny.yaml"
NUCLEI = "dsb2018_stage1test_fluo_nuclei"


def smoke_dict() -> dict:
    return yaml.safe_load(SMOKE.read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "hf_sam_peft" / "recipes" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_study_files_are_valid(path):
    spec = load_study(path)
    assert spec.cells()


def test_grid_base_methods_seeds_and_ablation_product():
    raw = {**smoke_dict(), "seeds": [0, 1], "ablations": {"lora": {"r": [2, 8], "training.learning_rate": [1e-4, 1e-3]}}}
    spec = study_from_dict(raw)
    ids = [c.cell_id for c in spec.cells()]
    assert ids[0] == f"{NUCLEI}__base__s0"  # the base once per dataset, before the fine-tunes
    assert len(ids) == len(set(ids)) == 1 + 2 * (2 + 4)
    ablated = [c for c in expand_cells(spec) if c.ablation and c.seed == 1]
    assert [c.ablation_label for c in ablated] == [
        "r=2,training.learning_rate=0.0001", "r=2,training.learning_rate=0.001",
        "r=8,training.learning_rate=0.0001", "r=8,training.learning_rate=0.001",
    ]
    options, training, data = spec.cell_options(ablated[1])
    assert options == {"r": 2} and training["learning_rate"] == 1e-3 and training["max_steps"] == 2
    options, training, _ = spec.cell_options(next(c for c in spec.cells() if c.method == "lora" and not c.ablation))
    assert options == {"r": 4} and training["learning_rate"] == 1e-3  # the study's own values


def test_all_methods():
    spec = study_from_dict({**smoke_dict(), "methods": "all", "method_options": {}})
    from hf_sam_peft.methods import METHOD_NAMES

    assert spec.methods == list(METHOD_NAMES)


def test_every_method_name_is_accepted_with_options():
    from hf_sam_peft.methods import ALL_METHOD_NAMES, PEFT_METHOD_NAMES

    spec = study_from_dict({**smoke_dict(), "methods": list(ALL_METHOD_NAMES), "method_options": {"dora": {"r": 2}}})
    assert spec.methods == list(ALL_METHOD_NAMES) and set(PEFT_METHOD_NAMES) <= set(spec.methods)
    cell = next(c for c in spec.cells() if c.method == "dora")
    assert spec.cell_options(cell)[0] == {"r": 2}


def test_several_base_models_are_a_grid_axis_named_in_the_cell_ids():
    from hf_sam_peft.study.runner import cell_settings
    from hf_sam_peft.study.spec import count_cells

    spec = study_from_dict({**smoke_dict(), "base_model": ["tiny", "org/sam-x"], "methods": ["lora", "dora"]})
    ids = [c.cell_id for c in spec.cells()]
    assert ids == [f"{NUCLEI}__{model}__{method}__s0" for model in ("tiny", "org_sam-x")
                   for method in ("base", "lora", "dora")]
    assert count_cells(spec) == len(ids) == 6
    assert [cell_settings(spec, c)["base_model"] for c in spec.cells()] == ["tiny"] * 3 + ["org/sam-x"] * 3
    one = study_from_dict({**smoke_dict(), "base_model": ["tiny"]})  # one model: the ids of a plain base_model
    assert [c.cell_id for c in one.cells()] == [c.cell_id for c in study_from_dict(smoke_dict()).cells()]


def test_command_line_methods_and_models_replace_the_files(capsys, tmp_path):
    from hf_sam_peft.cli import main

    spec = load_study(SMOKE, methods=["dora", "vera", "lora"], models=["tiny", "tiny_sam_hq"])
    assert spec.methods == ["dora", "vera", "lora"] and spec.base_models == ["tiny", "tiny_sam_hq"]
    assert spec.overrides == {"methods": ["dora", "vera", "lora"], "base_model": ["tiny", "tiny_sam_hq"]}
    out = tmp_path / "out"
    command = ["study", str(SMOKE), "--methods", "dora,lora", "--models", "tiny", "--output-dir", str(out), "--list"]
    assert main(command) == 0
    assert capsys.readouterr().out.split() == [
        "todo", f"{NUCLEI}__base__s0", "todo", f"{NUCLEI}__dora__s0", "todo", f"{NUCLEI}__lora__s0"]
    assert main(["study", str(SMOKE), "--methods", "lora,dorra", "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hf-sam-peft study: error: study file ")
    assert "with methods from the command line: unknown methods ['dorra'] (known: full_ft," in err and "dora" in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown keys ['colour']"),
        ({"methods": ["lora", "dorra"]}, "unknown methods ['dorra'] (known: full_ft, freeze_encoder,"),
        ({"base_model": ["tiny", "tiny"]}, "base_model lists a model twice"),
        ({"base_model": []}, "base_model must be a base model name"),
        ({"methods": []}, "methods must be 'all' or a non-empty list"),
        ({"datasets": [NUCLEI, NUCLEI]}, "lists a dataset twice"),
        ({"datasets": ["no_such_set"]}, "dataset 'no_such_set'"),
        ({"datasets": ["drosophila_vnc_sstem_mito_3d"]}, "is 3D"),
        ({"seeds": [0, -1]}, "seeds must be"),
        ({"ablations": {"fact": {"r": [4]}}}, "ablations name method 'fact'"),
        ({"ablations": {"lora": {"r": []}}}, "ablations.lora.r must be a non-empty list"),
        ({"ablations": {"lora": {"r": [0]}}}, "cell dsb2018_stage1test_fluo_nuclei__lora__r=0__s0"),
        ({"ablations": {"lora": {"training.learning_rate": ["fast"]}}}, "learning_rate='fast'"),
        ({"ablations": {"lora": {"data.colour": [1]}}}, "unknown data keys ['colour']"),
        ({"method_options": {"lora": {"rank": 4}}}, "unknown option(s) ['rank']"),
        ({"evaluation": {"patch": [256]}}, "evaluation.patch must be"),
        ({"evaluation": {"n_corrections": -1}}, "evaluation.n_corrections must be"),
        ({"evaluation": {"splits": "val"}}, "unknown evaluation keys ['splits']"),
        ({"name": "a b"}, "name must be"),
    ],
)
def test_bad_study_files_fail_in_one_line_before_any_work(change, message):
    with pytest.raises(ValueError) as info:
        study_from_dict({**smoke_dict(), **change}, where="study.yaml")
    text = str(info.value)
    assert "\n" not in text and text.startswith("study.yaml: ") and message in text


def test_load_study_names_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=r"study file .*s\.yaml: malformed YAML"):
        load_study(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The shipped smoke study, run once in this process (cells in-process: fast)."""
    shared_dataset(NUCLEI)
    folder = tmp_path_factory.mktemp("study")
    result = run_study(SMOKE, folder, isolate=False, progress=False)
    return folder, result


def test_smoke_study_runs_every_cell_and_writes_tables(smoke_run):
    folder, result = smoke_run
    assert not result.failed
    assert result.ran == [f"{NUCLEI}__{m}__s0" for m in ("base", "freeze_encoder", "lora")]
    import datasets
    import pandas as pd

    frame = pd.read_csv(folder / "results.csv")
    assert len(frame) == 3 * 3  # one row per cell and metric
    assert set(frame["metric"]) == {"msa", "dice", "iou"}
    tuned = frame[(frame["method"] == "lora") & (frame["metric"] == "iou")].iloc[0]
    assert tuned["steps"] == 2 and tuned["trainable_parameters"] > 0
    assert tuned["time_per_iteration_s"] > 0 and tuned["peak_memory_gib"] > 0
    for mode in ("point", "box", "ip", "ib"):
        assert 0.0 <= tuned[mode] <= 1.0
    base = frame[(frame["method"] == "base")].iloc[0]
    assert base["trainable_parameters"] == 0 and base["steps"] == 0
    table = datasets.load_dataset("csv", data_files=str(folder / "results.csv"), split="train")
    assert table.num_rows == 9
    text = (folder / "results.md").read_text()
    assert "| method | dsb2018_stage1test_fluo_nuclei Point (mSA)" in text
    assert "| lora | 43,043 |" not in text or "lora" in text
    for name in ("scores.png", "score_vs_parameters.png", "score_vs_time.png"):
        assert (folder / name).stat().st_size > 1000
    # each cell kept its adapter, with provenance and model card
    assert (folder / "cells" / f"{NUCLEI}__lora__s0" / "run" / "adapter" / "adapter_config.json").is_file()


def test_finished_cells_never_run_again_and_a_lost_cell_resumes(smoke_run, tmp_path):
    folder, first = smoke_run
    again = run_study(SMOKE, folder, isolate=False, progress=False)
    assert again.ran == [] and again.skipped == first.ran
    # a cell killed after its last checkpoint (no cell_result.json yet) continues from it: no new step
    lost = folder / "cells" / f"{NUCLEI}__lora__s0"
    before = json.loads((lost / RESULT_NAME).read_text())
    (lost / RESULT_NAME).unlink()
    resumed = run_study(SMOKE, folder, isolate=False, progress=False)
    assert resumed.ran == [f"{NUCLEI}__lora__s0"]
    after = json.loads((lost / RESULT_NAME).read_text())
    assert after["steps"] == before["steps"] == 2
    assert after["scores"] == before["scores"]  # the same adapter, scored the same way


def test_changed_settings_are_an_error_unless_overwrite(smoke_run, tmp_path):
    folder, _ = smoke_run
    raw = smoke_dict()
    raw["evaluation"]["n_corrections"] = 2
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="finished with other settings"):
        run_study(changed, folder, isolate=False, progress=False)
    # --only limits the run (and the check) to matching cells
    result = run_study(changed, folder, only=["__base__"], overwrite=True, isolate=False, progress=False)
    assert result.ran == [f"{NUCLEI}__base__s0"]
    cell = json.loads((folder / "cells" / f"{NUCLEI}__base__s0" / "cell_result.json").read_text())
    assert len(cell["rounds"]["box"]["iou"]) == 3  # box + 2 corrections


def test_overwrite_with_other_training_settings_trains_again_instead_of_resuming(tmp_path):
    shared_dataset(NUCLEI)
    raw = smoke_dict()
    raw.update(methods=["freeze_encoder"], base=False)
    run_study(study_from_dict(raw), tmp_path, isolate=False, progress=False)
    raw["training"].update(max_steps=3, eval_steps=3, save_steps=3)
    with pytest.raises(ValueError, match="finished with other settings"):
        run_study(study_from_dict(raw), tmp_path, isolate=False, progress=False)
    result = run_study(study_from_dict(raw), tmp_path, overwrite=True, isolate=False, progress=False)
    cell = result.records[0]
    assert cell["steps"] == 3 and cell["time_per_iteration_s"] is not None  # trained anew, not resumed at step 2


def test_a_killed_cell_with_changed_settings_is_not_resumed_silently(tmp_path):
    shared_dataset(NUCLEI)
    raw = smoke_dict()
    raw.update(methods=["freeze_encoder"], base=False)
    run_study(study_from_dict(raw), tmp_path, isolate=False, progress=False)
    cell_dir = tmp_path / "cells" / f"{NUCLEI}__freeze_encoder__s0"
    (cell_dir / RESULT_NAME).unlink()  # killed after its checkpoint, before scoring
    raw["training"]["learning_rate"] = 0.5
    with pytest.raises(ValueError, match="was started with other settings"):
        run_study(study_from_dict(raw), tmp_path, isolate=False, progress=False)


def test_a_failing_cell_does_not_lose_the_others(tmp_path):
    shared_dataset(NUCLEI)
    raw = smoke_dict()
    raw["methods"] = ["freeze_encoder"]
    raw["evaluation"]["split"] = "no_such_split"  # every cell fails at scoring: reported, the study goes on
    spec = study_from_dict(raw)
    result = run_study(spec, tmp_path, isolate=False, progress=False)
    assert set(result.failed) == {f"{NUCLEI}__base__s0", f"{NUCLEI}__freeze_encoder__s0"}
    assert (tmp_path / "results.csv").read_text().count("\n") == 1  # header only


def test_cli_runs_cells_in_their_own_processes(tmp_path, capsys):
    shared_dataset(NUCLEI)
    from hf_sam_peft.cli import main

    raw = smoke_dict()
    raw["methods"] = ["lora"]
    raw["base"] = False
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["study", str(path), "--output-dir", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "ran 1 cells, 0 already done, 0 failed" in printed and "| lora |" in printed
    log = (out / "cells" / f"{NUCLEI}__lora__s0" / "log.txt").read_text()
    assert "Traceback" not in log
    assert main(["study", str(path), "--output-dir", str(out), "--list"]) == 0
    assert capsys.readouterr().out.strip() == f"done  {NUCLEI}__lora__s0"


def test_cli_bad_study_is_one_line(tmp_path, capsys):
    from hf_sam_peft.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndatasets: [nope]\nmethods: [lora]\n")
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-sam-peft study: error: study file") and "\n" not in err


def _record(method, dataset, seed, score, ablation="", metric="msa"):
    scores = {m: {k: score for k in ("point", "box", "ip", "ib")} for m in ("msa", "dice", "iou")}
    return {
        "study": "s", "cell_id": f"{dataset}__{method}__s{seed}", "dataset": dataset, "method": method, "seed": seed,
        "ablation_label": ablation, "table_metric": metric, "scores": scores, "ais": None,
        "trainable_parameters": 10 if method != "base" else 0, "time_per_iteration_s": 1.0, "peak_memory_gib": 2.0,
        "wall_s": 3.0, "steps": 5, "best_is_base": method == "fact",
    }


def test_markdown_is_the_papers_layout_with_seed_spread_and_ablations():
    spec = study_from_dict({**smoke_dict(), "methods": ["lora", "fact"], "method_options": {}})
    records = [
        _record("base", "a", 0, 0.1), _record("lora", "a", 0, 0.5), _record("lora", "a", 1, 0.7),
        _record("fact", "a", 0, 0.4), _record("lora", "b", 0, 0.9, metric="dice"),
        _record("lora", "a", 0, 0.2, ablation="r=2"),
    ]
    text = markdown_report(spec, records)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    assert header.split(" | ")[1:3] == ["a Point (mSA)", "a Box (mSA)"] and "b I_B (Dice)" in header
    lora = next(line for line in lines if line.startswith("| lora |"))
    assert "0.600 ± 0.141" in lora and "0.900" in lora  # two seeds averaged, ± their spread
    assert "did not beat the untouched base" in text and "a__fact__s0" in text
    assert "## Ablation: lora" in text and "| lora (r=2) | 0.200" in text
    assert "| lora | 10 | 1.00 | 2.00 | 5 | 3 |" in text  # resources: params, time/it, memory, steps, wall


def test_copy_of_records_not_mutated():
    spec = study_from_dict(smoke_dict())
    records = [_record("lora", "a", 0, 0.5)]
    snapshot = copy.deepcopy(records)
    markdown_report(spec, records)
    assert records == snapshot


def test_cells_choose_checkpoints_on_held_out_training_images_not_the_scored_split(monkeypatch, tmp_path):
    root = shared_dataset(NUCLEI)
    from hf_sam_peft import train as train_module
    from hf_sam_peft.data import train_val_datasets

    splits = train_val_datasets(root, val_split=None, seed=0, patch_shape=(256, 256), min_size=5)
    sources = {Path(s).parent.parent.name for s in splits["val"]["source"]}
    assert sources == {"train"}
    seen = {}
    original = train_module.build_datasets

    def spy(recipe):
        seen["val_split"] = recipe.data.get("val_split", "val")
        return original(recipe)

    monkeypatch.setattr(train_module, "build_datasets", spy)
    raw = smoke_dict()
    raw.update(methods=["freeze_encoder"], base=False)
    run_study(study_from_dict(raw), tmp_path, isolate=False, progress=False)
    assert seen["val_split"] is None


def test_efficiency_points_one_per_model_method_and_mode_seeds_averaged():
    records = [
        _record("base", "a", 0, 0.1), _record("lora", "a", 0, 0.5), _record("lora", "a", 1, 0.7),
        {**_record("dora", "a", 0, 0.6), "trainable_parameters": 40},
        _record("lora", "a", 0, 0.9, ablation="r=2"),  # ablation cells are not points
        {**_record("lora", "a", 0, 0.3), "base_model": "other", "trainable_parameters": 20},
    ]
    for record in records[:5]:
        record["base_model"] = "tiny"
    points = efficiency_points(records)
    assert len(points) == 4 * 4  # (tiny: base, lora, dora; other: lora) x Point, Box, I_P, I_B
    by = {(p["model"], p["method"], p["mode"]): p for p in points}
    assert by[("tiny", "lora", "ib")] == {
        "model": "tiny", "method": "lora", "dataset": "a", "mode": "ib", "metric": "msa",
        "trainable_parameters": 10, "score": pytest.approx(0.6), "n_seeds": 2}
    assert by[("tiny", "dora", "point")]["trainable_parameters"] == 40
    assert by[("tiny", "base", "box")]["trainable_parameters"] == 0
    assert by[("other", "lora", "ip")]["score"] == pytest.approx(0.3)
    spec = study_from_dict({**smoke_dict(), "base_model": ["tiny", "other"], "methods": ["lora", "dora"]})
    text = markdown_report(spec, records, plots=["score_vs_parameters"])
    assert "| lora @ tiny | 0.600 ± 0.141" in text and "| lora @ other | 0.300" in text
    assert "| lora @ tiny | 10 |" in text and "| dora @ tiny | 40 |" in text  # resources per method and model
    assert text.rstrip().endswith("(score_vs_parameters.png)") and "Base models `tiny, other`" in text


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """The smoke study with two of peft's methods beside the paper's LoRA (cells in-process)."""
    shared_dataset(NUCLEI)
    folder = tmp_path_factory.mktemp("peft_study")
    spec = load_study(SMOKE, methods=["lora", "dora", "ia3"])
    return folder, run_study(spec, folder, isolate=False, progress=False)


def test_a_study_of_peft_methods_carries_their_parameters_and_plots_them(peft_run):
    import hf_sam_peft
    from hf_sam_peft.modeling import load_base_model

    folder, result = peft_run
    assert not result.failed and result.ran == [f"{NUCLEI}__{m}__s0" for m in ("base", "lora", "dora", "ia3")]
    trainable = {r["method"]: r["trainable_parameters"] for r in result.records}
    for method, options in (("lora", {"r": 4}), ("dora", {}), ("ia3", {})):  # the count of the model it trained
        model = hf_sam_peft.apply_method(load_base_model("tiny")[0], method, **options)
        assert trainable[method] == hf_sam_peft.count_parameters(model)[0] > 0
    assert trainable["ia3"] < trainable["lora"] < trainable["dora"]
    assert all(r["base_model"] == "tiny" for r in result.records)
    points = efficiency_points(result.records)
    assert {(p["method"], p["mode"]) for p in points} == {
        (m, mode) for m in ("base", "lora", "dora", "ia3") for mode in ("point", "box", "ip", "ib")}
    for p in points:
        record = next(r for r in result.records if r["method"] == p["method"])
        assert p["trainable_parameters"] == record["trainable_parameters"]
        assert p["score"] == pytest.approx(record["scores"]["msa"][p["mode"]])
    assert result.files["score_vs_parameters"] == folder / "score_vs_parameters.png"
    assert (folder / "score_vs_parameters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (folder / "results.md").read_text()
    assert "![score against trainable parameters (log scale)" in text and "(score_vs_parameters.png)" in text
    import pandas as pd

    frame = pd.read_csv(folder / "results.csv")
    assert set(frame["base_model"]) == {"tiny"} and set(frame["method"]) == {"base", "lora", "dora", "ia3"}
