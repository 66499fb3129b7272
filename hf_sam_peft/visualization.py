"""Overlay PNGs a person can look at: the image, the ground truth and prediction(s) side by side.

Each panel shows the grey/RGB image with every instance filled in its own colour (half transparent) and
outlined; titles say what the panel is and how many objects it holds (plus a score when given). Colours
are deterministic per label id (golden-ratio hues), so the same id looks the same in every panel.
Rendering uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hf_sam_peft.data.normalize import normalize_image

__all__ = ["colorize_instances", "instance_colors", "overlay_figure", "round_curves_figure", "save_overlay"]

# golden-ratio conjugate: hue steps of 0.618 turns keep consecutive ids (often neighbours) far apart on the
# colour wheel, and no two ids ever get exactly the same hue
_GOLDEN = 0.6180339887498949


def instance_colors(n: int) -> np.ndarray:
    """RGB colours ``(n + 1, 3)`` in [0, 1] for ids 0..n (id 0, the background, is black)."""
    # imported on use, as in every function here: importing the module (and what imports it) stays light
    from matplotlib.colors import hsv_to_rgb

    ids = np.arange(1, n + 1)
    # saturation cycles over 4 levels and brightness over 2, so ids whose hues land close still differ
    hsv = np.stack([(ids * _GOLDEN) % 1.0, 0.65 + 0.3 * ((ids * 7) % 4) / 3, 0.85 + 0.15 * (ids % 2)], axis=-1)
    return np.concatenate([np.zeros((1, 3)), hsv_to_rgb(hsv)]) if n else np.zeros((1, 3))


def _check_labels(labels: Any, name: str, shape: tuple[int, int] | None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be a 2D label image, got shape {labels.shape}")
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must not contain negative labels, got minimum {labels.min()}")
    if shape is not None and labels.shape != shape:
        raise ValueError(f"{name} shape {labels.shape} does not match the image shape {shape}")
    # int64: the labels index the colour table below; bool masks become ids 0 / 1
    return labels.astype(np.int64, copy=False)


def colorize_instances(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB float image: ``image`` with each instance of ``labels`` tinted in its colour and outlined."""
    from skimage.segmentation import find_boundaries

    rgb = normalize_image(np.asarray(image)).astype(np.float64) / 255.0
    labels = _check_labels(labels, "labels", rgb.shape[:2])
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    # (H, W, 3): each pixel looks up its id's colour (background black, never shown: `inside` excludes it)
    colors = instance_colors(int(labels.max()) if labels.size else 0)[labels]
    inside = labels > 0
    out = rgb.copy()
    out[inside] = (1 - alpha) * rgb[inside] + alpha * colors[inside]
    # mode="inner": the outline lies on the object's own pixels, so touching objects each keep theirs
    edges = find_boundaries(labels, mode="inner") & inside
    out[edges] = colors[edges]
    return out


def _objects(labels: np.ndarray) -> str:
    n = int(np.count_nonzero(np.unique(labels)))
    return f"{n} object" if n == 1 else f"{n} objects"


def overlay_figure(
    image: np.ndarray,
    predictions: Mapping[str, np.ndarray] | np.ndarray | None = None,
    ground_truth: np.ndarray | None = None,
    title: str | None = None,
    scores: Mapping[str, str] | None = None,
    panel_size: float = 4.0,
):
    """A matplotlib ``Figure``: image | ground truth | each prediction (a dict ``name -> labels`` or one array).

    ``scores`` adds a line under a panel's title (e.g. ``{"AIS": "mSA 0.612"}``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    array = np.asarray(image)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3))):
        raise ValueError(f"image must be (H, W) or (H, W, 1|3), got shape {array.shape}")
    shape = array.shape[:2]
    if predictions is None:
        predictions = {}
    elif not isinstance(predictions, Mapping):
        predictions = {"prediction": predictions}
    panels: list[tuple[str, np.ndarray | None]] = [("image", None)]
    if ground_truth is not None:
        panels.append(("ground truth", _check_labels(ground_truth, "ground_truth", shape)))
    for name, labels in predictions.items():
        panels.append((str(name), _check_labels(labels, f"predictions[{name!r}]", shape)))
    scores = dict(scores or {})

    # panels keep the image's aspect ratio; max(.., 1) guards a zero-width image
    aspect = shape[0] / max(shape[1], 1)
    # height for the titles on top: more when a figure title is added
    figure = Figure(figsize=(panel_size * len(panels), panel_size * aspect + (0.9 if title else 0.6)))
    # attaching the Agg canvas is what lets savefig render without pyplot or a display
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (name, labels) in zip(axes, panels):
        if labels is None:
            axis.imshow(normalize_image(array))
            # width × height, the order image sizes are usually quoted in
            axis.set_title(f"image ({shape[1]}×{shape[0]} px)", fontsize=11)
        else:
            axis.imshow(colorize_instances(array, labels))
            text = f"{name}: {_objects(labels)}"
            if name in scores:
                text += f"\n{scores[name]}"
            axis.set_title(text, fontsize=11)
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=12)
    figure.tight_layout()
    return figure


def save_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    predictions: Mapping[str, np.ndarray] | np.ndarray | None = None,
    ground_truth: np.ndarray | None = None,
    title: str | None = None,
    scores: Mapping[str, str] | None = None,
    dpi: int = 100,
) -> Path:
    """Render :func:`overlay_figure` to a PNG file (folders created as needed); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    from .atomic import atomic_write

    figure = overlay_figure(image, predictions, ground_truth, title, scores)
    # a temporary name, then a rename: a kill or a full disk never leaves half a PNG under the final name
    # format given explicitly: the temporary file ends in .tmp, from which savefig could not infer PNG
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))
    return path


def round_curves_figure(results: Mapping[str, Mapping[str, Any]], metric: str = "iou", title: str | None = None):
    """Per-round curves (round 0 = the first prompt, then one per correction) of interactive evaluations.

    ``results`` maps a model name to an ``evaluate_interactive`` result; one panel per start (point, box),
    one line per model. Corrections help where a line rises.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("results must map at least one model name to an evaluate_interactive result")
    # every start that any model has, first-seen order, each once
    starts = list(dict.fromkeys(start for result in results.values() for start in result["rounds"]))
    figure = Figure(figsize=(4.6 * len(starts), 3.8), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(starts), squeeze=False)[0]
    for ax, start in zip(axes, starts):
        for name, result in results.items():
            if start in result["rounds"]:
                values = result["rounds"][start][metric]
                ax.plot(range(len(values)), values, "o-", label=name, markersize=4)
        ax.set_title(f"{start} start")
        ax.set_xlabel("round (0 = first prompt, then corrections)")
        ax.set_ylabel(metric if metric != "iou" else "mean IoU per object")
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
