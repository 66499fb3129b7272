"""`hf-sam-peft segment`: label images (AIS, or prompts from ground-truth boxes) + an overlay PNG per image."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from . import add_resize_argument
from ..atomic import atomic_write
from ..run_lock import output_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images: automatic instance segmentation, or from ground-truth boxes",
        description=(
            "Segment 2D images with a SAM (+ adapter). With a UNETR decoder (<adapter>/unetr or "
            "'unetr_decoder' in the adapter's modules_to_save) every image gets automatic instance "
            "segmentation: <out>/<name>_ais.tif. With --boxes-from LABELS (one label image per image) SAM is "
            "prompted with each object's box: <out>/<name>_boxes.tif. <out>/<name>_overlay.png shows the image, "
            "the labels (if given) and the prediction(s) side by side. --data DIR segments every image of "
            "DIR/<split>/images with boxes from DIR/<split>/labels."
        ),
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="2D image files (png, tif, jpg); or --data")
    parser.add_argument(
        "--data", metavar="DIR",
        help="segment every image of DIR/<split>/images, prompted with boxes from DIR/<split>/labels; "
        "without --resize, served as train --data would serve DIR (chosen from its train split)",
    )
    parser.add_argument("--split", default="val", help="split of --data to segment (default: val)")
    parser.add_argument("--base", "--model", dest="base", required=True, help="base model: a SamModel / Sam2Model folder or Hub id, or a name: lite_medsam, tiny, tiny_sam2 (random, for development)")
    parser.add_argument("--adapter", help="adapter folder or Hub repo id")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--boxes-from", "--labels", dest="labels", nargs="+", metavar="LABELS",
        help="label images, one per IMAGE in the same order: prompt SAM with each object's box",
    )
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help="watershed parameter override for AIS, e.g. min_size=100 (repeatable)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="objects per mask-decoder call (default: 16)")
    add_resize_argument(parser)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(func=run)


def _parse_params(items: list[str]) -> dict[str, Any]:
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..evaluation.ais import DEFAULT_WATERSHED

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULT_WATERSHED:
            raise ValueError(f"--param must be KEY=VALUE with KEY in {sorted(DEFAULT_WATERSHED)}, got {item!r}")
        try:
            # min_size is a pixel count; the other watershed parameters are thresholds and smoothing sigmas
            params[key] = int(value) if key == "min_size" else float(value)
        except ValueError:
            raise ValueError(f"--param {key} needs a number, got {value!r}") from None
    return params


def _load_2d(path: str, labels: bool = False, shape: tuple[int, ...] | None = None):
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..data import load_image, load_labels

    array = load_labels(path) if labels else load_image(path, spatial_shape=shape)
    # an image may be grey (H x W) or RGB (H x W x 3, channel-last after load_image); labels only H x W
    is_2d = array.ndim == 2 or (not labels and array.ndim == 3 and array.shape[-1] == 3)
    if not is_2d:
        kind = "label image" if labels else "image"
        raise ValueError(f"{kind} {path} has shape {array.shape}; segment expects 2D images (split volumes into slices)")
    return array


def _write_tif(path: Path, labels) -> None:
    """A label image as zlib TIFF, under a temporary name first: a kill or a full disk leaves no half file."""
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    import tifffile

    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, labels.astype("uint32"), compression="zlib"))


def run(args: argparse.Namespace) -> int:
    # lazy: kept off the CLI start-up path (every command module is imported to build --help)
    from ..evaluation.ais import NO_DECODER_MESSAGE, segment_ais
    from ..evaluation.interactive import segment_from_labels
    from ..evaluation.predictor import SamPredictor, has_unetr, image_size_of, load_model
    from ..evaluation.resized import resized_if
    from ..data.io import file_id
    from ..evaluation.results import check_output_folder
    from ..visualization import save_overlay

    if args.data is not None:
        # lazy: kept off the CLI start-up path (every command module is imported to build --help)
        from ..data import find_pairs
        from . import scoring_layout

        if args.images or args.labels is not None:
            raise ValueError("--data takes the images and labels from DIR/<split>: pass IMAGE files or --data, not both")
        resize, line = scoring_layout(args.data, args.split, args.resize is not None, adapter=args.adapter)
        if line is not None:
            print(line)
        if resize:
            args.resize = 0  # 0: the model's own input size (resized_if)
        pairs = find_pairs(args.data, args.split)
        args.images, args.labels = [str(p.image_path) for p in pairs], [str(p.label_path) for p in pairs]
    elif not args.images:
        raise ValueError("segment needs IMAGE files or --data DIR")
    if args.labels is not None and len(args.labels) != len(args.images):
        raise ValueError(f"--boxes-from needs one label image per image: got {len(args.labels)} for {len(args.images)} images")
    params = _parse_params(args.param)
    # outputs are named by stem: two inputs with one stem (a/x.png, b/x.tif) would write the same files; checked
    # before the model loads
    stems: set[str] = set()
    for image_path in args.images:
        stem = file_id(image_path)  # "x.nii.gz" -> "x", as datasets pair files
        if stem in stems:
            raise ValueError(f"two images share the name {stem!r}; outputs would overwrite each other")
        stems.add(stem)
    out = check_output_folder(args.out)  # before the model is loaded or any image segmented
    with output_lock(out):  # one run at a time writes into the folder
        model = load_model(args.base, args.adapter, device=args.device)
        with_ais = has_unetr(model)
        if not with_ais and args.labels is None:
            raise ValueError(f"{NO_DECODER_MESSAGE}; or pass --boxes-from LABELS to segment from ground-truth boxes")
        # answers prompts through the outputs the adapter trained (its recorded point_multimask, set by load_model)
        predictor = resized_if(SamPredictor(model), args.resize, image_size_of(model)) if args.labels is not None else None

        for index, image_path in enumerate(args.images):
            stem = file_id(image_path)  # "x.nii.gz" -> "x", as datasets pair files
            labels = _load_2d(args.labels[index], labels=True) if args.labels is not None else None
            # the label shape settles a 3 x H x W file: RGB if the labels are H x W (load_image's spatial_shape)
            image = _load_2d(image_path, shape=None if labels is None else labels.shape)
            if labels is not None and image.shape[:2] != labels.shape:
                raise ValueError(f"image {image_path} shape {image.shape[:2]} does not match labels shape {labels.shape}")
            predictions = {}
            if with_ais:
                predictions["AIS"] = segment_ais(model, image, **params)
                _write_tif(out / f"{stem}_ais.tif", predictions["AIS"])
            if labels is not None:
                predictions["from boxes"] = segment_from_labels(predictor, image, labels, batch_size=args.batch_size)
                _write_tif(out / f"{stem}_boxes.tif", predictions["from boxes"])
            save_overlay(out / f"{stem}_overlay.png", image, predictions, ground_truth=labels, title=Path(image_path).name)
            # count_nonzero over the unique ids: the objects, background 0 not counted
            summary = ", ".join(f"{name}: {np.count_nonzero(np.unique(p))} objects" for name, p in predictions.items())
            print(f"{image_path}: {summary} -> {out / (stem + '_overlay.png')}")
        return 0
