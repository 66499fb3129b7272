"""Resize mode: whole images to a square (the reference's ``resize_inputs``), and back to the original size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from hf_sam_peft.data import build_dataset, train_val_datasets
from hf_sam_peft.data.resize import LongestSideResize
from hf_sam_peft.evaluation.interactive import evaluate_interactive
from hf_sam_peft.evaluation.resized import ResizedPredictor, resized_if

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _labels(shape: tuple[int, int], n: int = 3, block: int = 1, seed: int = 0) -> np.ndarray:
    """Rectangles 1..n on a grid of ``block``-sized cells (so a shrink by ``block`` is exact)."""
    rng = np.random.default_rng(seed)
    cells = np.zeros((shape[0] // block, shape[1] // block), dtype=np.int32)
    for i in range(1, n + 1):
        h, w = cells.shape
        y, x = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
        cells[y : y + h // 5 + 1, x : x + w // 5 + 1] = i
    return np.kron(cells, np.ones((block, block), dtype=np.int32))


def test_geometry_is_torch_em_resize_longest_side():
    resize = LongestSideResize((540, 800), 512)
    # SAM's get_preprocess_shape rounding; centred padding, ceil before and floor after (torch_em)
    assert resize.resized_shape == (346, 512)
    assert resize.padding == ((83, 83), (0, 0))
    odd = LongestSideResize((101, 200), 64)
    assert odd.resized_shape == (32, 64) and odd.padding == ((16, 16), (0, 0))
    odd = LongestSideResize((99, 200), 64)
    assert odd.resized_shape == (32, 64)
    assert LongestSideResize((200, 61), 64).padding == ((0, 0), (22, 22))
    assert LongestSideResize((200, 60), 64).resized_shape == (64, 19)
    assert LongestSideResize((200, 60), 64).padding == ((0, 0), (23, 22))
    image = np.arange(540 * 800, dtype=np.uint16).reshape(540, 800)
    square = resize.image(image)
    assert square.shape == (512, 512) and square.dtype == np.uint16
    assert not square[:83].any() and not square[-83:].any() and square[83:-83].any()
    rgb = resize.image(np.zeros((540, 800, 3), dtype=np.uint8))
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    with pytest.raises(ValueError, match="target"):
        LongestSideResize((10, 10), 0)
    with pytest.raises(ValueError, match="expected shape"):
        resize.labels(np.zeros((10, 10), dtype=np.int32))


@pytest.mark.parametrize(
    "shape, target, block", [((200, 120), 256, 1), ((120, 203), 256, 1), ((512, 320), 256, 2), ((400, 96), 100, 4)]
)
def test_label_round_trip_is_exact(shape, target, block):
    labels = _labels(shape, n=4, block=block)
    resize = LongestSideResize(shape, target)
    square = resize.labels(labels)
    assert square.shape == (target, target) and square.dtype == labels.dtype
    assert set(np.unique(square)) == set(np.unique(labels))  # nearest neighbour: no new values
    np.testing.assert_array_equal(resize.restore_labels(square), labels)
    # a boolean mask goes back as a boolean mask
    restored = resize.restore_labels(square == 1)
    assert restored.dtype == bool
    np.testing.assert_array_equal(restored, labels == 1)


def test_shrinking_by_a_non_integer_factor_is_as_exact_as_the_resolution_allows():
    labels = _labels((300, 450), n=3, seed=2)
    resize = LongestSideResize(labels.shape, 256)
    back = resize.restore_labels(resize.labels(labels))
    assert back.shape == labels.shape and (back == labels).mean() > 0.99


class SquareOracle:
    """A prompt predictor for the square frame: answers each prompt with the square's ground-truth object
    under the box centre (or the first point), so any error in mapping prompts shows up as a wrong mask."""

    def __init__(self, square_labels: np.ndarray) -> None:
        self.labels = torch.from_numpy(square_labels.astype(np.int64))
        self.seen_shape: tuple[int, ...] | None = None

    def set_image(self, image: np.ndarray) -> None:
        self.seen_shape = tuple(np.asarray(image).shape)

    def predict(self, points=None, labels=None, boxes=None, multimask=False):
        n = (boxes if boxes is not None else points).shape[0]
        logits = torch.full((n, 1, *self.labels.shape), -10.0)
        for i in range(n):
            if boxes is not None:
                x = (boxes[i, 0] + boxes[i, 2]) / 2
                y = (boxes[i, 1] + boxes[i, 3]) / 2
            else:
                x, y = points[i, 0]
            object_id = int(self.labels[int(y), int(x)])
            logits[i, 0][self.labels == object_id] = 10.0
        return logits, torch.ones(n, 1)


def test_resized_prediction_comes_back_at_the_original_size_exactly():
    """image -> square model input -> prediction at the original size: exact for labels when enlarging."""
    labels = _labels((90, 150), n=4, seed=3)
    image = np.where(labels > 0, 200, 20).astype(np.uint8)
    resize = LongestSideResize(labels.shape, 256)
    oracle = SquareOracle(resize.labels(labels))
    predictor = ResizedPredictor(oracle, 256)
    result = evaluate_interactive(predictor, [{"image": image, "labels": labels}], n_corrections=1, progress=False)
    assert oracle.seen_shape == (256, 256)  # the model saw the whole image, resized and padded
    assert predictor.original_size == labels.shape
    for metric in ("iou", "dice", "msa"):
        assert result[metric]["box"] == pytest.approx(1.0) and result[metric]["point"] == pytest.approx(1.0)
    # without the wrapper the oracle's square masks do not fit the original image: the evaluation refuses
    with pytest.raises(ValueError, match="shape"):
        evaluate_interactive(oracle, [{"image": image, "labels": labels}], n_corrections=0, progress=False)


def test_resized_if_picks_the_model_input_size():
    oracle = SquareOracle(np.zeros((8, 8), dtype=np.int32))
    assert resized_if(oracle, None, 1024) is oracle
    assert resized_if(oracle, 0, 1024).target == 1024 and resized_if(oracle, 512, 1024).target == 512
    with pytest.raises(ValueError, match="resize"):
        resized_if(oracle, -3, 1024)
    with pytest.raises(TypeError, match="predictor"):
        ResizedPredictor(object(), 64)


def _folder(root: Path, shape: tuple[int, int], n_images: int = 3) -> Path:
    for split in ("train", "val"):
        for folder in ("images", "labels"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n_images):
            labels = _labels(shape, n=2, seed=i)
            image = (np.where(labels > 0, 3000, 500) + i).astype(np.uint16)
            tifffile.imwrite(root / split / "images" / f"img{i}.tif", image)
            tifffile.imwrite(root / split / "labels" / f"img{i}.tif", labels)
    return root


def test_builder_serves_whole_resized_images_in_every_split(tmp_path):
    from hf_sam_peft.data import normalize_image, to_instances

    root = _folder(tmp_path / "data", (80, 50))
    val = build_dataset(root, "val", patch_shape=(64, 64), resize_inputs=True, min_size=0, cache_dir=tmp_path / "c")
    assert len(val) == 3  # one row per image, never a crop
    row = val[0]
    image = tifffile.imread(root / "val" / "images" / "img0.tif")
    labels = tifffile.imread(root / "val" / "labels" / "img0.tif")
    resize = LongestSideResize(labels.shape, 64)
    np.testing.assert_array_equal(row["image"], resize.image(normalize_image(image)))
    np.testing.assert_array_equal(row["labels"], to_instances(resize.labels(labels), 0))
    splits = train_val_datasets(
        root, patch_shape=(64, 64), resize_inputs=True, min_size=0, augment="none", cache_dir=tmp_path / "c"
    )
    assert len(splits["train"]) == 3
    sample = splits["train"][1]
    assert sample["image"].shape == (64, 64, 3) and "_y" not in sample["id"]  # the whole image, no position
    train_labels = tifffile.imread(root / "train" / "labels" / f"{sample['id']}.tif")
    np.testing.assert_array_equal(sample["labels"], to_instances(LongestSideResize(train_labels.shape, 64).labels(train_labels), 0))
    with pytest.raises(ValueError, match="square"):
        build_dataset(root, "val", patch_shape=(64, 32), resize_inputs=True)
    with pytest.raises(ValueError, match="n_patches_per_image"):
        build_dataset(root, "val", patch_shape=(64, 64), resize_inputs=True, n_patches_per_image=2)


def test_medical_recipes_resize_as_the_reference_loaders_do():
    from hf_sam_peft.data import dataset_kwargs, load_dataset_recipe

    for name in ("papila", "motum", "psfhs", "jsrt", "amd_sd", "mice_tumseg", "hc18_fetal_head_ultrasound"):
        assert dataset_kwargs(load_dataset_recipe(name)).get("resize_inputs") is True, name
    for name in ("livecell", "covid_if", "hpa", "gonuclear", "orgasegment", "mitolab", "platynereis_cilia"):
        assert not dataset_kwargs(load_dataset_recipe(name)).get("resize_inputs"), name


def test_hc18_recipe_rows_are_whole_resized_heads(tmp_path):
    root = SHARED / "hc18_fetal_head_ultrasound"
    if not root.is_dir():
        pytest.skip(f"the small real datasets are not beside the checkout ({root} is absent)")
    from hf_sam_peft.data import dataset_kwargs, load_dataset_recipe

    kwargs = dataset_kwargs(load_dataset_recipe("hc18_fetal_head_ultrasound"))
    rows = build_dataset(split="val", cache_dir=tmp_path, **kwargs)
    labels = tifffile.imread(sorted((root / "val" / "labels").iterdir())[0])
    resize = LongestSideResize(labels.shape, 512)
    assert rows[0]["image"].shape == (512, 512, 3)
    # the head is whole: its area in the row equals the original area scaled by the resize, within a border
    area, expected = (rows[0]["semantic"] == 1).sum(), (labels == 1).sum() * np.prod(resize.scale)
    assert abs(area - expected) < 0.02 * expected
