"""Inference helpers: load a base SAM (+ adapter, + UNETR decoder) and prompt it on one image at a time.

:class:`SamPredictor` embeds an image once and then answers any number of prompt queries, with prompts
and masks in the **original image frame** (pixel ``(x, y)`` coordinates, boxes ``(x0, y0, x1, y1)`` with
exclusive maxima as :func:`hf_sam_peft.prompts.boxes_from_masks` gives them). It reuses the training code's
preprocessing (:func:`~hf_sam_peft.sam_forward.preprocess.image_preprocessor`) and decoder call
(:func:`~hf_sam_peft.sam_forward.forward.decode`) from :mod:`hf_sam_peft.sam_forward`, which training
uses too, so evaluation sees exactly what training saw.

Anything with ``set_image(image)`` and ``predict(points, labels, boxes, multimask) -> (logits, iou)`` is a
*prompt predictor* for :func:`hf_sam_peft.evaluation.interactive.evaluate_interactive` (e.g. a test oracle).

**Which output answers a point.** SAM answers a lone point through its three-mask (multimask) output. An
adapter trained with ``point_multimask=False`` (``InteractiveTrainingArguments``; e.g. on LiteMedSAM, which
was trained on boxes only and whose multimask outputs carry no point skill) trained points through the
single-mask output instead. :func:`~hf_sam_peft.hub.save_adapter` records this as ``"point_multimask"`` in
the adapter's ``hf_sam_peft.json``; :func:`load_model` and :func:`hf_sam_peft.from_pretrained` set it on the
loaded model (:func:`point_multimask_of` reads it back, default True: SAM's own behaviour), and
:class:`SamPredictor` then answers a prompt without a box that asks for multimask output through the single
mask. The app, ``evaluate`` and ``segment`` all go through it.

:func:`load_model` loads an adapter through the one adapter loader,
:func:`hf_sam_peft.hub.load.load_adapter_folder` (as ``from_pretrained`` and the app do), which reads::

    <adapter>/adapter_config.json, adapter_model.safetensors   peft adapter (load_adapter)
    <adapter>/unetr/unetr_config.json, unetr.safetensors       optional UNETR decoder (save_unetr)
    <adapter>/hf_sam_peft.json                                 provenance: base size, QLoRA, point_multimask

A decoder saved inside the adapter (``"unetr_decoder"`` in the adapter's ``modules_to_save``) is found too:
its shape is read from the adapter weights and an empty decoder is attached before the adapter loads
(peft silently skips ``modules_to_save`` entries the base model lacks).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from hf_sam_peft.evaluation.fast_decoder import ImageTokens, autocast_to, decode_objects, fast_decoder_supported, image_tokens
# how a loaded adapter trained point prompts, and the UNETR settings in an adapter's weights: kept beside the
# adapter loader (hf_sam_peft.loading) and importable from here as well
from hf_sam_peft.loading import (
    POINT_MULTIMASK_ATTRIBUTE,
    point_multimask_of,
    set_point_multimask,
    unetr_config_from_weights,
)
from hf_sam_peft.sam_forward.forward import decode as forward_decode
from hf_sam_peft.sam_forward.forward import encode_images, unwrap_sam
from hf_sam_peft.sam_forward.frames import Frames, Prompts
from hf_sam_peft.sam_forward.kinds import ImageEmbeddings, frame_of, input_size_of, main_embedding
from hf_sam_peft.sam_forward.precision import fast_autocast_dtype
from hf_sam_peft.sam_forward.preprocess import image_preprocessor

__all__ = [
    "POINT_MULTIMASK_ATTRIBUTE",
    "decode",
    "PromptPredictor",
    "SamPredictor",
    "UNETR_SUBFOLDER",
    "check_prompts",
    "eval_mode",
    "has_unetr",
    "image_size_of",
    "load_base",
    "load_model",
    "model_device_dtype",
    "point_multimask_of",
    "set_point_multimask",
    "warm_up",
]

UNETR_SUBFOLDER = "unetr"


@runtime_checkable
class PromptPredictor(Protocol):
    """What interactive evaluation needs from a model: embed an image once, then answer prompts."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BatchNorm, dropout) and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and float dtype of the image encoder (4-bit encoders hold uint8 weights: skip those)."""
    encoder = unwrap_sam(model).vision_encoder
    reference = next((p for p in encoder.parameters() if p.is_floating_point()), None)
    if reference is None:
        return torch.device("cpu"), torch.float32
    return reference.device, reference.dtype


def image_size_of(model: nn.Module) -> int:
    """Side of the model's square input (SAM: ``vision_config.image_size``; SAM 2: the prompt encoder's)."""
    return input_size_of(unwrap_sam(model))


def _as_image(image: Any) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3))):
        raise ValueError(f"image must be a 2D image of shape (H, W) or (H, W, 1|3), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image must hold at least one pixel (H, W >= 1), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise TypeError(f"image must hold real numbers, got dtype {array.dtype}")
    # NaN / inf would run through the normalisation into the embedding and every mask without any error
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError("image holds NaN or inf values")
    return array


def _as_prompt_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` as a tensor of real numbers, or a one-line error naming the argument."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(value).__name__} ({err})") from None
    if tensor.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    return tensor


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True entry of ``mask`` (for naming the offending prompt)."""
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def check_prompts(
    points: Any, labels: Any, boxes: Any, image_size: tuple[int, int]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Validate prompts in the original image frame (``image_size`` = (H, W)); returns them as tensors.

    ``points`` ``(N, P, 2)`` (x, y) with ``P >= 1``, finite, ``0 <= x < W`` and ``0 <= y < H``; ``labels``
    ``(N, P)`` of 1 (positive) / 0 (negative); ``boxes`` ``(N, 4)`` ``(x0, y0, x1, y1)``, finite, ``x0 < x1``,
    ``y0 < y1`` (exclusive maxima), inside ``[0, W] x [0, H]``, ``N`` matching the points. Anything else is a
    one-line ValueError naming the argument, the offending entry and what was expected.
    """
    height, width = image_size
    if points is None and boxes is None:
        raise ValueError("predict needs points (with labels) and/or boxes")
    if (points is None) != (labels is None):
        raise ValueError("points and labels must be given together")
    n_objects = None
    if points is not None:
        points, labels = _as_prompt_tensor(points, "points"), _as_prompt_tensor(labels, "labels")
        if points.ndim != 3 or points.shape[-1] != 2 or labels.shape != points.shape[:2]:
            raise ValueError(
                f"points must be (N, P, 2) and labels (N, P), got {tuple(points.shape)} and {tuple(labels.shape)}"
            )
        if points.shape[1] == 0:
            raise ValueError(f"points must hold at least one point per object (N, P >= 1, 2), got {tuple(points.shape)}")
        # checked on a float64 CPU copy: exact for every input dtype and device, and printable in the message
        values = points.detach().cpu().double()
        if not torch.isfinite(values).all():
            index = _first_bad(~torch.isfinite(values).all(-1))
            raise ValueError(f"points{list(index)} = {values[index].tolist()} is not finite (NaN or inf)")
        # a point names a pixel: x < W and y < H (box maxima are exclusive, so there x1 == W is allowed, below)
        outside = (values[..., 0] < 0) | (values[..., 0] >= width) | (values[..., 1] < 0) | (values[..., 1] >= height)
        if outside.any():
            index = _first_bad(outside)
            raise ValueError(
                f"points{list(index)} = (x, y) {tuple(values[index].tolist())} lies outside the {width} x {height} "
                f"image (expected 0 <= x < {width}, 0 <= y < {height})"
            )
        label_values = labels.detach().cpu().double()
        # the prompt encoder gives other label values internal meanings (padding, not-a-point): refuse them here
        bad = (label_values != 0) & (label_values != 1)
        if bad.any():
            index = _first_bad(bad)
            raise ValueError(
                f"labels{list(index)} = {label_values[index].item():g}: point labels must be 1 (positive) or 0 (negative)"
            )
        n_objects = points.shape[0]
    if boxes is not None:
        boxes = _as_prompt_tensor(boxes, "boxes")
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or (n_objects is not None and boxes.shape[0] != n_objects):
            raise ValueError(f"boxes must be (N, 4) with N matching the points, got {tuple(boxes.shape)}")
        values = boxes.detach().cpu().double()
        if not torch.isfinite(values).all():
            index = _first_bad(~torch.isfinite(values).all(-1))
            raise ValueError(f"boxes[{index[0]}] = {values[index].tolist()} is not finite (NaN or inf)")
        inverted = (values[:, 2] <= values[:, 0]) | (values[:, 3] <= values[:, 1])
        if inverted.any():
            index = _first_bad(inverted)
            raise ValueError(
                f"boxes[{index[0]}] = {tuple(values[index].tolist())} is empty or inverted "
                "(expected (x0, y0, x1, y1) with x0 < x1 and y0 < y1)"
            )
        outside = (values[:, :2] < 0).any(-1) | (values[:, 2] > width) | (values[:, 3] > height)
        if outside.any():
            index = _first_bad(outside)
            raise ValueError(
                f"boxes[{index[0]}] = {tuple(values[index].tolist())} reaches outside the {width} x {height} image "
                f"(expected 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})"
            )
    return points, labels, boxes


def decode(
    model: nn.Module,
    embeddings: ImageEmbeddings,
    prompts: Prompts,
    multimask: bool,
    tokens: ImageTokens | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor's one decoder call for one image: low-res logits ``(1, N, K, h', w')`` and IoUs ``(1, N, K)``.

    With ``tokens`` (:func:`~hf_sam_peft.evaluation.fast_decoder.image_tokens` of ``embeddings``) through the
    fast decoder, else through the model's forward (:func:`hf_sam_peft.sam_forward.forward.decode`) under
    ``autocast_dtype`` (None: the model's dtype, the plain path).
    """
    if tokens is None:
        with autocast_to(main_embedding(embeddings).device, autocast_dtype):
            return forward_decode(model, embeddings, prompts, multimask)
    # (1, N, ...) one image of N objects -> (N, 1, ...): the fast decoder takes one object per batch entry
    flat = [None if t is None else t[0][:, None] for t in (prompts.points, prompts.labels, prompts.boxes)]
    low, iou = decode_objects(model, tokens, *flat, multimask)
    # back to forward_decode's (1, N, K, ...) layout
    return low[None], iou[None]


class SamPredictor:
    """Embed an image once (no gradients), then predict masks for prompts in the original image frame.

    ``predict`` returns mask logits ``(N, K, H, W)`` at the image's resolution and predicted IoUs ``(N, K)``
    for ``N`` objects (``K`` = 3 with ``multimask`` else 1). The model is put in eval mode for each call
    and restored afterwards.

    ``point_multimask``: whether a prompt without a box (a lone click) that asks for ``multimask`` gets SAM's
    three masks (True) or is answered through the single-mask output (False, ``K`` = 1) because the adapter
    trained points that way. None (default): what the loaded model records (:func:`point_multimask_of`,
    True when nothing is recorded).

    ``fast`` (default True): decode through :mod:`hf_sam_peft.evaluation.fast_decoder` (per-image caches, float32)
    where it reproduces the model's decoder: SAM's ``SamMaskDecoder``. SAM 2's decoder (``Sam2MaskDecoder``: an
    object-score token, high-resolution skips) always takes the plain path (see ``fast_decoder_supported``).
    ``bf16`` (opt-in, with ``fast``): bf16 autocast where the device runs it natively and faster than float32
    (:func:`~hf_sam_peft.sam_forward.precision.fast_autocast_dtype`); not within tolerance on small objects.
    False: the plain float32 path through the model's forward (:func:`~hf_sam_peft.sam_forward.forward.decode`),
    the reference the fast path is measured against (``benchmarks/eval_speed.py``). A decoder the fast path
    cannot reproduce (e.g. LoRA on its attention projections) goes through the model's forward under the
    same autocast. The image encoder runs in the model's dtype either way.
    """

    def __init__(self, model: nn.Module, point_multimask: bool | None = None, fast: bool = True, bf16: bool = False) -> None:
        unwrap_sam(model)  # one-line TypeError for anything that is not SAM
        if point_multimask is not None and not isinstance(point_multimask, bool):
            raise TypeError(f"point_multimask must be True, False or None, got {point_multimask!r}")
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be True or False, got {fast!r}")
        self.fast = fast
        self.point_multimask = point_multimask_of(model) if point_multimask is None else point_multimask
        self.model = model
        self.image_size = image_size_of(model)
        self.preprocess = image_preprocessor(model)
        self.device, self.dtype = model_device_dtype(model)
        # bf16 is opt-in: on the demo tile's small nuclei it moved box-round-0 masks to a mean IoU of 0.95
        # with the float32 masks (tolerance 0.99), see benchmarks/EVALUATION.md
        self.autocast_dtype = fast_autocast_dtype(self.device) if fast and bf16 else None
        self.embeddings: ImageEmbeddings | None = None
        self.frames: Frames | None = None
        self.tokens: ImageTokens | None = None  # the fast decoder's per-image inputs (set_image)

    @property
    def original_size(self) -> tuple[int, int]:
        self._check_image()
        return tuple(int(v) for v in self.frames.original_sizes[0].tolist())  # type: ignore[union-attr]

    @torch.no_grad()
    def set_image(self, image: Any) -> None:
        """Preprocess (the model's: SAM's resize + pad, SAM 2's square) and embed ``image`` (H x W grey or H x W x 3)."""
        array = _as_image(image)
        pixel_values, reshaped = self.preprocess(array, self.image_size)
        self.tokens = None  # whatever happens below, never decode against the previous image's caches
        with eval_mode(self.model):
            # [None]: a batch of one, in the encoder's own device and dtype
            self.embeddings = encode_images(self.model, pixel_values[None].to(self.device, self.dtype))
            # checked per image, not once: which decoder copy runs follows the adapter active now (active_module)
            if self.fast and fast_decoder_supported(self.model):
                self.tokens = image_tokens(self.model, self.embeddings, self.autocast_dtype)
        # original (H, W) and resized (pre-padding) size: what maps prompts into the model frame and masks back
        self.frames = Frames(
            torch.tensor([array.shape[:2]], dtype=torch.long),
            torch.tensor([reshaped], dtype=torch.long),
            self.image_size,
            frame_of(self.model),
        )

    def _check_image(self) -> None:
        if self.embeddings is None or self.frames is None:
            raise RuntimeError("call set_image(image) before predicting")

    @torch.no_grad()
    def predict(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits ``(N, K, H, W)`` and IoU predictions ``(N, K)`` for ``N`` objects' prompts.

        ``points`` ``(N, P, 2)`` (x, y) with ``labels`` ``(N, P)`` (1 positive, 0 negative) and/or ``boxes``
        ``(N, 4)``, all in the original image's pixel frame. ``multimask`` for points without a box is
        honoured only when ``self.point_multimask`` (see the class docstring); else ``K`` = 1. Prompts are
        checked where they enter (:func:`check_prompts`): points outside the image, inverted or empty boxes,
        NaN / inf, labels other than 0 / 1 and wrong shapes are one-line ValueErrors naming the argument.
        """
        low, iou = self._decode_low_res(points, labels, boxes, multimask)
        return self.frames.upscale(0, low), iou  # type: ignore[union-attr]

    @torch.no_grad()
    def predict_best(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> torch.Tensor:
        """Boolean masks ``(N, H, W)``: per object the mask with the highest predicted IoU, logits > 0.

        What interactive evaluation needs per round. The fast path picks the mask at low resolution and
        upscales only that one (upscaling is per mask, so this is exact); the plain path is
        :meth:`predict` followed by the pick, as before.
        """
        if not self.fast:
            logits, iou = self.predict(points, labels, boxes, multimask)
            return logits[torch.arange(logits.shape[0]), iou.argmax(-1).to(logits.device)] > 0
        low, iou = self._decode_low_res(points, labels, boxes, multimask)
        best = low[torch.arange(low.shape[0], device=low.device), iou.argmax(-1).to(low.device)]
        return self.frames.upscale(0, best) > 0  # type: ignore[union-attr]

    @torch.no_grad()
    def _decode_low_res(
        self, points: Any, labels: Any, boxes: Any, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked prompts -> low-res logits ``(N, K, h', w')`` and IoUs ``(N, K)``, float32."""
        self._check_image()
        frames = self.frames
        points, labels, boxes = check_prompts(points, labels, boxes, self.original_size)
        prompts = Prompts()
        if points is not None:
            # into the model's input frame (scaled as the image was), in the model's dtype
            coords = frames.coords(0, points.to(self.device)).to(self.dtype)
            # [None]: a batch of one image holding the N objects
            prompts = prompts.add_points(coords[None], labels.to(self.device).long()[None])
        if boxes is not None:
            prompts = Prompts(prompts.points, prompts.labels, frames.boxes(0, boxes.to(self.device)).to(self.dtype)[None])
        multimask = self.uses_multimask(multimask, boxes is not None)
        # eval mode per call: a model shared with a trainer may be back in train mode (dropout, BatchNorm)
        with eval_mode(self.model):
            low, iou = decode(self.model, self.embeddings, prompts, multimask, self.tokens, self.autocast_dtype)
        # float32 whatever the model's dtype: callers see one dtype
        return low[0].float(), iou[0].float()

    def uses_multimask(self, multimask: bool, has_box: bool = False) -> bool:
        """The output a prompt that asks for ``multimask`` is answered through: the single mask for points
        without a box when the adapter trained points through it (``point_multimask=False``)."""
        return bool(multimask) and (has_box or self.point_multimask)

    def predict_masks(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> np.ndarray:
        """:meth:`predict_best` as a NumPy array."""
        return self.predict_best(points, labels, boxes, multimask).cpu().numpy()


def _innermost(predictor: Any) -> Any:
    """The predictor a wrapper (e.g. :class:`~hf_sam_peft.evaluation.resized.ResizedPredictor`) delegates to."""
    seen: set[int] = set()
    # `seen` stops a wrapper chain that loops back on itself
    while hasattr(predictor, "predictor") and id(predictor) not in seen:
        seen.add(id(predictor))
        predictor = predictor.predictor
    return predictor


def _warm_up_prompts(size: int, n_objects: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_objects`` boxes ``(N, 4)`` in a grid over a ``size``² image, a positive point at each centre and a
    negative one at a corner ``(N, 2, 2)`` with labels ``(N, 2)`` (all inside the image)."""
    side = max(1, math.ceil(math.sqrt(n_objects)))
    cell = size / side
    index = torch.arange(n_objects)
    x0, y0 = (index % side).float() * cell, (index // side).float() * cell
    boxes = torch.stack([x0, y0, x0 + cell, y0 + cell], dim=-1).floor().clamp(0, size)
    # at least 1 px per side (more objects than pixels per row): check_prompts refuses empty boxes
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1).clamp(max=size)
    # exclusive maxima: the last pixel inside is x1 - 1
    centres = (boxes[:, :2] + boxes[:, 2:] - 1) / 2
    points = torch.stack([centres, boxes[:, :2]], dim=1).clamp(0, size - 1)
    # clone: expand() is a stride-0 view
    labels = torch.tensor([[1, 0]]).expand(n_objects, 2).clone()
    return boxes, points, labels


def warm_up(predictor: "SamPredictor | nn.Module", n_objects: int = 16) -> Any:
    """Run once what interactive evaluation runs, on a synthetic image, and forget that image.

    A process's first image embedding and first decoder calls carry one-off costs (oneDNN primitive creation
    for each new shape, the allocator's first pages, lazy initialisation): measured on LiteMedSAM, 2 CPU
    threads, a 256² tile: first ``set_image`` 0.84 s vs 0.71 s after, first 16-box decode 0.15 s vs 0.14 s.
    Calling this before timing the first of several evaluations keeps those costs out of the first model's
    time, so two models evaluated in one process are timed alike (``hf-sam-peft demo``: base vs fine-tuned).

    ``predictor``: a :class:`SamPredictor` (or a wrapper of one with a ``predictor`` attribute, e.g.
    ``ResizedPredictor``), or a SAM / PeftModel (a ``SamPredictor`` is made for it; the caches warmed are
    the process's, so the evaluation's own predictor benefits). Runs ``set_image`` on a ``S x S`` grey
    image (S: the model's input side), then, for ``n_objects`` objects (interactive evaluation's batch size,
    16), the prompts of its rounds: a box, a lone point asking for multimask output (answered as the
    predictor's ``point_multimask`` says), and points with a box. Nothing is trained or kept: the model's
    mode is restored (``SamPredictor`` runs it in eval mode, without gradients) and the predictor holds no
    image afterwards (``predict`` before the next ``set_image`` raises). Returns the predictor.
    """
    if isinstance(predictor, nn.Module):
        predictor = SamPredictor(predictor)
    if not isinstance(n_objects, int) or isinstance(n_objects, bool) or n_objects < 1:
        raise ValueError(f"n_objects must be a positive int, got {n_objects!r}")
    inner = _innermost(predictor)
    if not isinstance(inner, SamPredictor):
        raise TypeError(f"predictor must be a SamPredictor (or wrap one), got {type(predictor).__name__}")
    size = inner.image_size
    # a bright disc on a dim ramp: some structure for the encoder, values that never matter for the costs
    yy, xx = np.mgrid[:size, :size]
    # values stay below 210, so the uint8 cast below is exact
    image = ((xx + yy) * (60.0 / (2 * size)) + 150.0 * (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2))
    boxes, points, labels = _warm_up_prompts(size, n_objects)
    # what interactive evaluation calls (_best_masks): predict_best where the predictor has one
    best = getattr(predictor, "predict_best", None) or predictor.predict
    try:
        predictor.set_image(image.astype(np.uint8))
        best(boxes=boxes)  # box start, round 0
        best(points=points[:, :1], labels=labels[:, :1], multimask=True)  # point start, round 0
        best(points=points, labels=labels)  # point start, a correction
        best(points=points, labels=labels, boxes=boxes)  # box start, a correction
    finally:
        # even after an error: the synthetic image must never answer a later predict (that raises until set_image)
        inner.embeddings = inner.frames = inner.tokens = None
    return predictor


# --------------------------------------------------------------------------------------------- loading


def load_base(base: str, device: str | torch.device = "cpu") -> nn.Module:
    """A base model in eval mode: a name (``"tiny"``, ``"lite_medsam"``), a model folder or a Hub id."""
    from hf_sam_peft.modeling.base_models import load_base_model

    if not isinstance(base, str) or not base:
        raise ValueError(f"base must be a model folder or name, got {base!r}")
    return load_base_model(base, device=device)[0]


def load_model(
    base: str | nn.Module,
    adapter: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Base SAM (folder, name, ``"tiny"`` or a model) + optional adapter (folder or Hub repo id), in eval mode.

    The adapter goes on through :func:`hf_sam_peft.hub.load.load_adapter_folder`, the loader
    ``from_pretrained`` and the app use: its UNETR decoder (``<adapter>/unetr`` or the adapter's own
    ``modules_to_save`` copy), QLoRA's 4-bit encoder, the size check, and how it trained point prompts
    (``"point_multimask"`` in its ``hf_sam_peft.json``, for :class:`SamPredictor`: :func:`point_multimask_of`).
    """
    from hf_sam_peft.hub.load import load_adapter_folder, resolve_adapter_folder

    model = load_base(base, device) if isinstance(base, str) else base
    unwrap_sam(model)  # one-line TypeError for anything that is not SAM, before an adapter is touched
    if adapter is None:
        return model.eval()
    if not isinstance(adapter, str) or not adapter:
        raise ValueError(f"adapter must be an adapter folder or Hub repo id, got {adapter!r}")
    folder = resolve_adapter_folder(adapter, {})  # also puts back a folder a killed save left in its .old copy
    return load_adapter_folder(model, folder, source=adapter).eval()


def has_unetr(model: nn.Module) -> bool:
    """Whether the model (or the SamModel inside a peft model) carries a UNETR decoder for AIS."""
    from hf_sam_peft.modeling.unetr import ATTRIBUTE_NAME

    return hasattr(unwrap_sam(model), ATTRIBUTE_NAME)
