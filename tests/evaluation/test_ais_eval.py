"""AIS evaluation end to end: a tiny SAM + UNETR trained a few steps on real nuclei, then AIS (with a grid
search on validation images) and interactive evaluation fill a results table written to CSV and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_sam_peft.evaluation.ais import DEFAULT_WATERSHED, evaluate_ais, predict_ais_maps, segment_ais, tiling_for
from hf_sam_peft.evaluation.interactive import evaluate_interactive
from hf_sam_peft.evaluation.results import ResultsTable
from tests.conftest import shared_dataset
from tests.evaluation.test_interactive_eval import DSB, small_rows

FEATURES = (32, 16, 8, 8)  # a small UNETR: the architecture of the paper, fewer channels


def train_ais(model: torch.nn.Module, rows: list[dict], steps: int) -> list[float]:
    """A plain torch loop on the distance loss (the joint Trainer is tested elsewhere)."""
    from hf_sam_peft.modeling.unetr import predict_distances
    from hf_sam_peft.training.ais import ais_loss, batch_distance_targets
    from hf_sam_peft.training.collate import SamInteractiveCollator

    batch = SamInteractiveCollator(image_size=model.config.vision_config.image_size)(rows)
    targets = batch_distance_targets(batch["labels"], min_size=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        maps = predict_distances(model, batch["pixel_values"], original_shape=tuple(batch["labels"].shape[-2:]))
        loss = ais_loss(maps, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module")
def trained():
    from transformers import SamModel

    from hf_sam_peft.data import iter_rows
    from hf_sam_peft.modeling.sam import tiny_sam_config
    from hf_sam_peft.modeling.unetr import attach_unetr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SamModel(tiny_sam_config())
    attach_unetr(model, features=FEATURES)
    train_rows = list(iter_rows(shared_dataset(DSB), "train", min_size=0, max_images=2))
    losses = train_ais(model, train_rows, steps=8)
    torch.set_num_threads(threads)
    return model.eval(), losses


def test_training_reduces_the_distance_loss(trained):
    _, losses = trained
    assert losses[-1] < losses[0]


def test_ais_with_grid_search_then_table_to_csv_and_json(trained, tmp_path):
    model, _ = trained
    rows = small_rows(2, size=128)
    grid = {
        "center_distance_thresholds": [0.4, 0.6],
        "boundary_distance_thresholds": [0.5],
        "distance_smoothings": [1.0, 1.6],
        "min_sizes": [5, 20],
    }
    ais = evaluate_ais(model, rows, val_rows=rows[:1], grid=grid, keep_segmentations=True, progress=False)
    assert set(ais) >= {"msa", "sa50", "sa75", "params", "grid_search_score", "images", "n_images"}
    assert ais["n_images"] == 2 and len(ais["segmentations"]) == 2
    assert 0.0 <= ais["sa75"] <= ais["sa50"] <= 1.0 and ais["msa"] <= ais["sa50"]  # SA falls with the threshold
    assert ais["params"]["min_size"] in (5, 20) and ais["params"]["center_distance_threshold"] in (0.4, 0.6)
    assert 0.0 <= ais["grid_search_score"] <= 1.0
    for segmentation, row in zip(ais["segmentations"], rows):
        assert segmentation.shape == row["labels"].shape and segmentation.dtype == np.uint32
    # The chosen parameters applied directly reproduce the evaluation.
    again = segment_ais(model, rows[0]["image"], **ais["params"])
    assert np.array_equal(again, ais["segmentations"][0])

    interactive = evaluate_interactive(model, rows, progress=False)
    table = ResultsTable()
    table.add_evaluation("dsb2018", "lora", "runs/lora", interactive=interactive, ais=ais, metrics=("msa", "dice"))
    msa = table.rows[0]
    assert (msa.metric, msa.point, msa.box, msa.ip, msa.ib, msa.ais) == (
        "msa", interactive["msa"]["point"], interactive["msa"]["box"], interactive["msa"]["ip"],
        interactive["msa"]["ib"], ais["msa"],
    )
    assert table.rows[1].metric == "dice" and table.rows[1].ais is None and table.rows[1].ib is not None
    csv_path, json_path = table.write(tmp_path / "r.csv"), table.write(tmp_path / "r.json", details={"ais": ais["params"]})
    for path in (csv_path, json_path):
        assert ResultsTable.read(path).to_records() == table.to_records()
    assert json.loads(json_path.read_text())["details"]["ais"] == ais["params"]
    text = table.format()
    assert "I_P" in text and "AIS" in text and "dsb2018" in text


def test_large_images_are_tiled(trained):
    model, _ = trained
    size = model.config.vision_config.image_size
    assert tiling_for(model, (size, size)) is None
    tile_shape, halo = tiling_for(model, (size + 40, 300))
    assert tile_shape[0] + 2 * halo[0] == size
    image = np.random.default_rng(0).integers(0, 255, (size + 40, 300), dtype=np.uint8)
    maps = predict_ais_maps(model, image)
    assert maps.shape == (3, size + 40, 300) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    whole = predict_ais_maps(model, image[:size, :size])
    assert whole.shape == (3, size, size)


def test_ais_errors(tiny_sam, trained):
    rows = [{"image": np.zeros((16, 16), np.uint8), "labels": np.zeros((16, 16), np.int32)}]
    with pytest.raises(ValueError, match="UNETR decoder"):
        evaluate_ais(tiny_sam, rows, progress=False)
    model, _ = trained
    with pytest.raises(ValueError, match="val_rows"):
        evaluate_ais(model, rows, grid={"min_sizes": [5]}, progress=False)
    with pytest.raises(ValueError, match="unknown watershed"):
        evaluate_ais(model, rows, watershed={"sigma": 1.0}, progress=False)
    with pytest.raises(ValueError, match="no rows"):
        evaluate_ais(model, [], progress=False)
    with pytest.raises(TypeError, match="integer"):
        evaluate_ais(model, [{"image": rows[0]["image"], "labels": np.zeros((16, 16))}], progress=False)
    with pytest.raises(ValueError, match="2D"):
        predict_ais_maps(model, np.zeros((2, 16, 16, 3)))
    assert set(DEFAULT_WATERSHED) >= {"min_size", "distance_smoothing"}
