"""What the web app does, without the web page: load an image, collect prompts, predict, render, export.

:class:`AppLogic` is shared by all browser tabs (it owns the models and the embedding cache); each tab holds
its own :class:`Session` (image, prompts, result). Every public method raises ``ValueError`` with a one-line
message for bad input, which the page shows instead of a stack trace. Embeddings are cached per image and
model (``"base"`` or an adapter), so clicks only run the prompt encoder and mask decoder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tifffile
from skimage.draw import disk

from hf_sam_peft.app.models import BASE_NAME, ModelBank
from hf_sam_peft.data import load_image, normalize_image
from hf_sam_peft.data.io import spatial_shape_of
from hf_sam_peft.evaluation.ais import segment_ais
from hf_sam_peft.evaluation.predictor import SamPredictor
from hf_sam_peft.visualization import colorize_instances

__all__ = ["MAX_APP_IMAGE_PIXELS", "MAX_UPLOAD_BYTES", "MODES", "AppLogic", "Session", "image_key", "load_app_image",
           "render"]

MODES: tuple[str, ...] = ("positive point", "negative point", "box")
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
"""The largest file the app takes (the Gradio server refuses bigger uploads, and :func:`load_app_image` checks
the file before reading it): a whole-slide scan would otherwise grow the app past the machine's memory."""
MAX_APP_IMAGE_PIXELS = 8192 * 8192
"""The most pixels (height x width) an image in the app may have, checked from the file's header before any
pixel is decoded: the app keeps the image, its rendering and its masks at full resolution."""
_POSITIVE, _NEGATIVE, _BOX = (0, 200, 0), (230, 0, 0), (255, 210, 0)


def load_app_image(path: str | os.PathLike) -> np.ndarray:
    """A 2D grey or RGB image of any bit depth, read exactly as training reads it (:func:`~hf_sam_peft.data.load_image`)."""
    if path is None or not str(path):
        raise ValueError("no image given: upload a 2D image (png, tif, jpg)")
    _check_upload_size(Path(path))
    array = load_image(path)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ValueError(
            f"{Path(path).name} has shape {array.shape}; the app segments 2D images (H x W grey or H x W x 3 RGB), "
            "not volumes: save one slice as its own image"
        )
    if min(array.shape[:2]) < 2:
        raise ValueError(f"{Path(path).name} has shape {array.shape}; it is too small to segment")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{Path(path).name} contains NaN or infinite values")
    return array if array.flags.writeable else array.copy()


def _check_upload_size(path: Path) -> None:
    """One-line ValueErrors for a file over :data:`MAX_UPLOAD_BYTES` or a header over :data:`MAX_APP_IMAGE_PIXELS`,
    before the pixels are decoded."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # load_image names a missing file
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"{path.name} is {size / 2**20:,.0f} MB, more than the app's upload limit of "
                         f"{MAX_UPLOAD_BYTES / 2**20:,.0f} MB (hf_sam_peft.app.session.MAX_UPLOAD_BYTES)")
    shape = spatial_shape_of(path)
    if len(shape) == 3 and 3 in (shape[0], shape[-1]):  # a colour image: the channels are not pixels
        # channels first (3, H, W) only when the last axis is not 3 as well: H x W x 3 wins a tie
        shape = shape[1:] if shape[0] == 3 and shape[-1] != 3 else shape[:-1]
    # dtype=object: Python ints, so a forged header's huge sizes cannot overflow int64 into a small count
    pixels = int(np.prod(shape, dtype=object))
    if pixels > MAX_APP_IMAGE_PIXELS:
        raise ValueError(f"{path.name} has {pixels:,} pixels ({' x '.join(map(str, shape))}), more than the app's "
                         f"limit of {MAX_APP_IMAGE_PIXELS:,} (hf_sam_peft.app.session.MAX_APP_IMAGE_PIXELS): crop or "
                         "downscale it first")


def image_key(image: np.ndarray) -> str:
    """Content hash of an image: the embedding cache's key (the same pixels never get embedded twice)."""
    digest = hashlib.sha1(np.ascontiguousarray(image).tobytes())
    # shape and dtype too: the same bytes read as another shape or dtype are another image
    digest.update(f"{image.shape}{image.dtype}".encode())
    return digest.hexdigest()


def _draw_marker(out: np.ndarray, x: int, y: int, color: tuple[int, int, int], radius: int) -> None:
    # a white ring under the coloured disc, so a marker shows on dark and bright images alike; disk() takes (row, col)
    rr, cc = disk((y, x), radius + 1, shape=out.shape[:2])
    out[rr, cc] = 255
    rr, cc = disk((y, x), radius, shape=out.shape[:2])
    out[rr, cc] = color


def render(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    points: list[tuple[int, int]] = (),  # type: ignore[assignment]
    point_labels: list[int] = (),  # type: ignore[assignment]
    box: tuple[int, int, int, int] | None = None,
    corner: tuple[int, int] | None = None,
) -> np.ndarray:
    """uint8 RGB picture at the image's own resolution: labels tinted over the image, points and box on top."""
    if labels is not None and np.any(labels):
        out = np.round(colorize_instances(image, labels) * 255).astype(np.uint8)
    else:
        # copy: normalize_image returns a uint8 RGB input itself; markers must not land in the session's image
        out = normalize_image(np.asarray(image)).copy()
    # markers scale with the image, so they stay visible on large ones
    radius = max(2, round(max(out.shape[:2]) / 120))
    if box is not None:
        x0, y0, x1, y1 = box  # exclusive maxima: the outline runs along the box's outermost pixels
        out[[y0, y1 - 1], x0:x1] = _BOX
        out[y0:y1, [x0, x1 - 1]] = _BOX
    if corner is not None:
        _draw_marker(out, *corner, _BOX, radius)
    for (x, y), label in zip(points, point_labels):
        _draw_marker(out, x, y, _POSITIVE if label == 1 else _NEGATIVE, radius)
    return out


@dataclass
class Session:
    """One browser tab's state: the image, its prompts (original pixel frame) and the last result."""

    image: np.ndarray | None = None
    key: str = ""
    stem: str = "image"
    model: str = BASE_NAME
    points: list[tuple[int, int]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)
    box: tuple[int, int, int, int] | None = None
    corner: tuple[int, int] | None = None  # first corner of a box being drawn
    labels: np.ndarray | None = None  # last result: 0/1 mask, or instance labels from "segment all"
    iou: float | None = None
    result_kind: str = ""  # "mask" | "ais" | ""

    def clear_prompts(self) -> None:
        self.points, self.point_labels, self.box, self.corner = [], [], None, None
        self.labels, self.iou, self.result_kind = None, None, ""

    def prompt_text(self) -> str:
        """Prompts as text, e.g. ``+(12, 40) -(3, 9) box(1, 2, 30, 44)``: shown in the page (and read by tests)."""
        parts = [f"{'+' if label == 1 else '-'}({x}, {y})" for (x, y), label in zip(self.points, self.point_labels)]
        if self.box is not None:
            parts.append("box({}, {}, {}, {})".format(*self.box))
        if self.corner is not None:
            parts.append("corner({}, {})".format(*self.corner))
        return " ".join(parts) or "none"


class AppLogic:
    """Models + embedding cache shared by all sessions; the methods a page's events call."""

    def __init__(self, bank: ModelBank, cache_size: int = 8, out_dir: str | os.PathLike | None = None) -> None:
        if not isinstance(bank, ModelBank):
            raise TypeError(f"bank must be a ModelBank, got {type(bank).__name__}")
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self.bank = bank
        self.cache_size = cache_size
        # a fresh private folder by default: the one folder launch() lets Gradio serve files from (allowed_paths)
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="hf_sam_peft_app_"))
        # LRU over (image key, model name): per model because an adapter on the image encoder changes the embedding;
        # a hit moves to the end, the oldest entry is evicted first
        self._cache: OrderedDict[tuple[str, str], tuple[torch.Tensor, object]] = OrderedDict()
        self.encoder_runs = 0  # image encodings done so far (the cache keeps this at one per image and model)

    # ------------------------------------------------------------------ events

    def load(self, session: Session, path: str | os.PathLike) -> None:
        """Read an uploaded file into the session (prompts and result reset); ValueError for a bad file."""
        image = load_app_image(path)
        session.image, session.key, session.stem = image, image_key(image), Path(path).stem or "image"
        session.clear_prompts()

    def click(self, session: Session, x: int, y: int, mode: str) -> None:
        """A click at pixel ``(x, y)``: add a point, or a box corner (two clicks make a box); then predict."""
        image = self._require_image(session)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        height, width = image.shape[:2]
        x, y = int(x), int(y)
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"click ({x}, {y}) is outside the {width} x {height} image")
        # a click after "segment all" starts a prompted result: the AIS labels go
        if session.result_kind == "ais":
            session.labels, session.iou, session.result_kind = None, None, ""
        if mode == "box":
            if session.corner is None:
                session.corner = (x, y)
                return
            (xa, ya), session.corner = session.corner, None
            # corners in either order; + 1: box maxima are exclusive, so both clicked pixels lie inside the box
            session.box = (min(xa, x), min(ya, y), max(xa, x) + 1, max(ya, y) + 1)
        else:
            session.points.append((x, y))
            session.point_labels.append(1 if mode == "positive point" else 0)
        self._predict(session)

    def set_model(self, session: Session, name: str) -> None:
        """Switch to ``"base"`` or an adapter and redo the current result (same prompts) with it."""
        if name not in self.bank.names:
            raise ValueError(f"model must be one of {self.bank.names}, got {name!r}")
        session.model = name
        if session.image is None:
            return
        if session.result_kind == "ais":
            # redo AIS only where the new model can; otherwise clear rather than show another model's result
            if self.bank.has_decoder(name):
                self.segment_all(session)
            else:
                session.labels, session.iou, session.result_kind = None, None, ""
        elif session.points or session.box is not None:
            self._predict(session)

    def clear(self, session: Session) -> None:
        session.clear_prompts()

    def segment_all(self, session: Session) -> None:
        """Automatic instance segmentation with the active adapter's UNETR decoder."""
        image = self._require_image(session)
        if not self.bank.has_decoder(session.model):
            raise ValueError(
                f"'segment all' needs an adapter with a UNETR decoder; {session.model!r} has none "
                f"(adapters with one: {[n for n in self.bank.adapters if self.bank.has_decoder(n)] or 'none loaded'})"
            )
        with self.bank.use(session.model) as model:
            labels = segment_ais(model, image)
        # AIS takes no prompts: cleared so the page never shows prompts that did not make this result
        session.points, session.point_labels, session.box, session.corner = [], [], None, None
        session.labels, session.iou, session.result_kind = labels, None, "ais"

    # ------------------------------------------------------------------ outputs

    def picture(self, session: Session) -> np.ndarray | None:
        if session.image is None:
            return None
        return render(session.image, session.labels, session.points, session.point_labels, session.box, session.corner)

    def status(self, session: Session) -> str:
        if session.image is None:
            return "Upload an image to start."
        height, width = session.image.shape[:2]
        head = f"**{session.stem}** ({width} x {height}, {session.image.dtype}) · model **{session.model}**"
        if session.result_kind == "mask":
            return f"{head} · predicted IoU **{session.iou:.3f}** · {int(session.labels.sum())} pixels"
        if session.result_kind == "ais":
            return f"{head} · segment all: **{int(np.count_nonzero(np.unique(session.labels)))} objects**"
        if session.corner is not None:
            return f"{head} · click the opposite corner of the box"
        return f"{head} · click on the image to prompt"

    def export(self, session: Session) -> str | None:
        """Write the current result as a label tif (uint8 0/1 mask, or uint32 instances) and return its path."""
        if session.labels is None:
            return None
        suffix = "ais" if session.result_kind == "ais" else "mask"
        # one folder per image content: uploads with the same file name but other pixels keep their own exports
        path = self.out_dir / session.key[:12] / f"{session.stem}_{session.model}_{suffix}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        # instances may number more than 255; a prompted mask is 0 / 1
        dtype = np.uint32 if session.result_kind == "ais" else np.uint8
        tifffile.imwrite(path, session.labels.astype(dtype), compression="zlib")
        return str(path)

    # ------------------------------------------------------------------ model calls

    def _require_image(self, session: Session) -> np.ndarray:
        if session.image is None:
            raise ValueError("upload an image first")
        return session.image

    def predict(
        self,
        image: np.ndarray,
        name: str,
        points: list[tuple[int, int]] = (),  # type: ignore[assignment]
        point_labels: list[int] = (),  # type: ignore[assignment]
        box: tuple[int, int, int, int] | None = None,
        key: str | None = None,
    ) -> tuple[np.ndarray, float]:
        """Boolean mask ``(H, W)`` and its predicted IoU for one object's prompts, with model ``name``.

        One point alone is ambiguous, so SAM's three candidate masks are asked for and the one with the
        highest predicted IoU is kept (as SAM recommends); more prompts ask for a single mask. An adapter
        that trained points through the single-mask output (``point_multimask: false`` in its
        ``hf_sam_peft.json``) answers the lone point through that output instead
        (:meth:`~hf_sam_peft.app.models.ModelBank.point_multimask`).
        """
        if not points and box is None:
            raise ValueError("predict needs at least one point or a box")
        # hashing is a full pass over the image: sessions pass the key computed once at upload
        key = key or image_key(image)
        point_t = torch.tensor([points], dtype=torch.float32) if points else None
        label_t = torch.tensor([point_labels], dtype=torch.long) if points else None
        box_t = torch.tensor([box], dtype=torch.float32) if box is not None else None
        with self.bank.use(name) as model:
            # a new predictor per call is cheap: the costly part, the embedding, comes from the cache
            predictor = SamPredictor(model, point_multimask=self.bank.point_multimask(name))
            cached = self._cache.get((key, name))
            if cached is None:
                predictor.set_image(image)
                self.encoder_runs += 1
                self._cache[(key, name)] = (predictor.embeddings, predictor.frames)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end((key, name))
                predictor.embeddings, predictor.frames = cached
            # a lone point is ambiguous: SAM's three masks (or the single mask, for adapters that trained points so)
            logits, iou = predictor.predict(point_t, label_t, box_t, multimask=len(points) == 1 and box is None)
        # the mask with the highest predicted IoU (K = 1 without multimask)
        best = int(iou[0].argmax())
        return (logits[0, best] > 0).cpu().numpy(), float(iou[0, best])

    def _predict(self, session: Session) -> None:
        mask, iou = self.predict(
            session.image, session.model, session.points, session.point_labels, session.box, key=session.key
        )
        session.labels, session.iou, session.result_kind = mask.astype(np.uint8), iou, "mask"
