"""Overlay PNGs: panels side by side, instance colours, input checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hf_sam_peft.visualization import colorize_instances, instance_colors, overlay_figure, save_overlay


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.linspace(0, 1000, 48 * 64, dtype=np.float32).reshape(48, 64)  # not uint8: gets min-max scaled
    labels = np.zeros((48, 64), np.int32)
    labels[5:20, 5:20], labels[25:40, 30:60] = 1, 2
    return image, labels


def test_colours_are_distinct_and_background_black():
    colors = instance_colors(20)
    assert colors.shape == (21, 3) and np.all(colors[0] == 0)
    assert len({tuple(np.round(c, 3)) for c in colors[1:]}) == 20
    assert instance_colors(0).shape == (1, 3)


def test_colorize_tints_objects_and_keeps_background():
    image, labels = _scene()
    rgb = colorize_instances(image, labels)
    grey = np.repeat((np.round(image / 1000 * 255) / 255)[..., None], 3, axis=-1)
    assert rgb.shape == (48, 64, 3)
    assert np.allclose(rgb[labels == 0], grey[labels == 0])
    assert not np.allclose(rgb[labels == 1], grey[labels == 1])
    assert not np.allclose(rgb[12, 12], rgb[30, 40])  # two objects, two colours


def test_overlay_png_has_one_panel_per_map(tmp_path):
    image, labels = _scene()
    prediction = labels.copy()
    prediction[prediction == 2] = 0
    path = save_overlay(
        tmp_path / "sub" / "overlay.png", image, {"AIS": prediction, "from boxes": labels}, ground_truth=labels,
        title="test image", scores={"AIS": "mSA 0.500"},
    )
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[1] > 3 * png.shape[0]  # four panels side by side
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 50  # an actual picture, not a blank canvas
    figure = overlay_figure(image, {"AIS": prediction}, ground_truth=labels)
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["image (64×48 px)", "ground truth: 2 objects", "AIS: 1 object"]
    assert len(overlay_figure(image, prediction).axes) == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"predictions": np.zeros((48, 65), np.int32)}, ValueError, "does not match"),
        ({"predictions": np.zeros((48, 64), np.float32)}, TypeError, "integer"),
        ({"ground_truth": np.zeros((2, 48, 64), np.int32)}, ValueError, "2D"),
        ({"predictions": -np.ones((48, 64), np.int32)}, ValueError, "negative"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    image, _ = _scene()
    with pytest.raises(error, match=match):
        overlay_figure(image, **kwargs)


def test_bad_image_and_path(tmp_path):
    with pytest.raises(ValueError, match="image"):
        overlay_figure(np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match=".png"):
        save_overlay(tmp_path / "x.jpg", np.zeros((8, 8)))


def _rounds(point: list[float], box: list[float]) -> dict:
    return {"rounds": {"point": {"iou": point}, "box": {"iou": box}}}


def test_round_curves_and_table_show_whether_corrections_help(tmp_path):
    from hf_sam_peft.evaluation.results import format_rounds
    from hf_sam_peft.visualization import round_curves_figure

    results = {"base": _rounds([0.1, 0.2, 0.3], [0.6, 0.5, 0.4]), "tuned": _rounds([0.5, 0.6, 0.7], [0.8, 0.8, 0.85])}
    table = format_rounds(results)
    lines = table.splitlines()
    assert lines[0] == "| model | start | r0 | r1 | r2 | corrections |" and len(lines) == 2 + 4
    assert "| base | box | 0.600 | 0.500 | 0.400 | hurt (-0.200) |" in lines
    assert "| tuned | box | 0.800 | 0.800 | 0.850 | help (+0.050) |" in lines
    figure = round_curves_figure(results, title="t")
    assert len(figure.axes) == 2 and [len(ax.lines) for ax in figure.axes] == [2, 2]
    assert list(figure.axes[1].lines[1].get_ydata()) == [0.8, 0.8, 0.85]
    figure.savefig(tmp_path / "rounds.png")
    assert (tmp_path / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one"):
        format_rounds({})
    with pytest.raises(ValueError, match="at least one"):
        round_curves_figure({})
