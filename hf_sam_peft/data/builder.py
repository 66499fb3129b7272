"""Image/label folders -> Hugging Face ``datasets`` of normalised 2D patches with instance label maps.

Row columns (the contract with training and evaluation):

- ``image``: ``uint8 H x W x 3``, already passed through :func:`normalize_image` (so the trainer may call it
  again at no change). Normalised per row (patch / slice), as micro-sam's raw transform runs per patch.
- ``labels``: ``int32 H x W`` instance map, 0 = background, objects numbered 1..N by :func:`to_instances`
  (connected components, objects below ``min_size`` removed).
- ``id``: ``<file id>[_z<slice>][_y<row>_x<col>]``; ``source``: the image file path.
- ``semantic`` (only with ``label_mode="semantic"``): ``int32 H x W`` class map, zero where ``labels`` is.

Format: when every row has the same shape (always with ``patch_shape``) the columns are fixed-shape
``Array3D``/``Array2D`` and the dataset is returned ``with_format("numpy", dtype=None)`` (native dtypes,
no int64 upcast). Full images of different shapes are stored flat with a ``shape`` column and returned
``with_transform`` that restores ``H x W`` arrays (re-formatting such a dataset yields the flat arrays).

Options: every builder takes one :class:`~hf_sam_peft.data.options.DataOptions` (patches or resize, labels,
object filter, sampler, augmentation, split), and / or its fields as keyword arguments applied on top.

The table is written to the ``datasets`` cache (``cache_dir``); the cache key includes every option that
shapes rows and each file's size and modification time, so edited files are re-read.

Training vs. fixed rows: :func:`train_val_datasets` serves its "train" split as a
:class:`~hf_sam_peft.data.sampling.RandomPatchDataset` (a new random patch per fetch, torch_em's
``MinInstanceSampler`` rule, flips for microscopy; see :mod:`hf_sam_peft.data.sampling` for the references)
over a cached table of whole raw slices, and its "val" split as fixed rows (:func:`build_dataset`).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import datasets
import numpy as np

from .folders import FilePair, find_pairs, iter_slices, load_pair
from .io import DataError, check_finite, image_dtype_of, spatial_shape_of
from .labels import count_objects, to_instances
from .normalize import normalize_image
from .options import LABEL_MODES, DataOptions, resolve_options
from .patches import crop, grid_positions, random_position
from .resize import LongestSideResize
from .sampling import RandomPatchDataset, min_instance_ok

__all__ = ["LABEL_MODES", "DataOptions", "build_dataset", "holdout_split", "iter_rows", "train_val_datasets",
           "training_dataset"]
_FORMAT_VERSION = 1  # bump when row contents change, to invalidate cached tables
_SLICES_VERSION = 1  # the same for the tables of whole raw slices behind the training split
_MAX_ATTEMPTS_PER_PATCH = 50  # fixed random rows: draws per wanted patch (50 k)


def _make_row(
    image: np.ndarray,
    labels: np.ndarray,
    position: tuple[int, int] | None,
    options: DataOptions,
    source: Path | str,
) -> dict[str, Any]:
    """Cut, relabel and normalise one patch (or the whole slice when ``position`` is None).

    ``options.resize_inputs``: the whole slice, normalised, then resized to the square ``patch_shape``
    (longest side scaled, centred zero padding, labels nearest neighbour:
    :class:`~hf_sam_peft.data.resize.LongestSideResize`); ``label_transform`` then runs on the resized labels,
    as torch_em composes its resize before a dataset's own label transform (``update_kwargs_for_resize_trafo``).
    """
    patch_shape, label_transform, resize_to = options.patch_shape, options.label_transform, options.resize_to
    if position is not None:
        # cut before normalising: intensities are scaled per patch, as peft-sam's raw transform runs per patch
        window = tuple(slice(p, p + s) for p, s in zip(position, patch_shape))
        image, labels = image[window], labels[window]
    # files are checked when read (load_image); this names the file for tables cached before that check
    check_finite(image, source)
    if position is not None:
        # crop at (0, 0) only pads (the window was cut above), and after normalising: the zero padding stays out of
        # the min-max range and is 0 in the served image (torch_em pads the raw image before its raw_transform)
        image = crop(normalize_image(image), (0, 0), patch_shape)
        labels = crop(labels, (0, 0), patch_shape)
    else:
        image = normalize_image(image)
        if resize_to is not None:
            resize = LongestSideResize(labels.shape[:2], resize_to)
            image, labels = resize.image(image), resize.labels(labels)
    if label_transform is not None:
        transformed = np.asarray(label_transform(labels))
        if transformed.shape != labels.shape or not np.issubdtype(transformed.dtype, np.integer):
            raise DataError(
                f"label_transform returned {transformed.dtype} {transformed.shape} for {source}; "
                f"expected integers of shape {labels.shape}"
            )
        labels = transformed
    instances = to_instances(labels, options.min_size)
    row = {"image": image, "labels": instances}
    if options.label_mode == "semantic":
        # class values only where an object survived min_size, so both maps agree on what is background
        row["semantic"] = np.where(instances > 0, labels, 0).astype(np.int32)
    return row


def _make_row_at(
    image: np.ndarray, labels: np.ndarray, position: tuple[int, int] | None, source: str, *, options: DataOptions
) -> dict[str, Any]:
    """:func:`_make_row` with the dataset's options bound by keyword (a picklable ``functools.partial``
    for DataLoader workers)."""
    return _make_row(image, labels, position, options, source)


def _keep(labels: np.ndarray, options: DataOptions) -> bool:
    """The object filter of fixed rows: ``min_objects`` objects, and torch_em's MinInstanceSampler rule when
    ``min_num_instances`` is set (background among the counted label values; see sampling.min_instance_ok)."""
    if count_objects(labels) < options.min_objects:
        return False
    return options.min_num_instances is None or min_instance_ok(
        labels, options.min_num_instances, options.sampler_min_size
    )


def _positions(
    shape: tuple[int, int], patch_shape: tuple[int, int], n_patches: int | None, rng: np.random.Generator
) -> Iterator[tuple[int, int]]:
    """Grid positions (all of them) or up to ``_MAX_ATTEMPTS_PER_PATCH * n`` distinct random draws."""
    if n_patches is None:
        yield from grid_positions(shape, patch_shape)
        return
    seen: set[tuple[int, int]] = set()
    # stop once every position was drawn: a small image cannot give n distinct patches, more draws only repeat
    n_possible = int(np.prod([max(s - p, 0) + 1 for s, p in zip(shape, patch_shape)]))
    for _ in range(_MAX_ATTEMPTS_PER_PATCH * n_patches):
        if len(seen) >= n_possible:
            return
        position = random_position(shape, patch_shape, rng)
        if position not in seen:
            seen.add(position)
            yield position


def _iter_rows(
    # **_cache_key: the file signature and format version ride in gen_kwargs only so that datasets' hash of
    # them (the cache key) changes with the files; unused here
    pairs: Sequence[FilePair], options: DataOptions, flat: bool = False, **_cache_key: Any
) -> Iterator[dict[str, Any]]:
    """Rows of all pairs in order: slices of volumes, then patches per slice (grid or seeded random), or
    one resized whole slice each with ``resize_inputs``."""
    patch_shape, n_patches_per_image = options.patch_shape, options.n_patches_per_image
    for pair in pairs:
        image, labels = load_pair(pair)
        for z, image_2d, labels_2d in iter_slices(image, labels):
            base_id = pair.id if z is None else f"{pair.id}_z{z:03d}"
            # One generator per slice, seeded by (seed, id): rows do not depend on which other files are read.
            # crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED); rows must not vary between runs
            rng = np.random.default_rng([options.seed, zlib.crc32(base_id.encode())])
            positions = (
                [None] if patch_shape is None or options.resize_inputs
                else _positions(labels_2d.shape, patch_shape, n_patches_per_image, rng)
            )
            n_accepted = 0
            for position in positions:
                row = _make_row(image_2d, labels_2d, position, options, pair.image_path)
                # a rejected row does not count towards n_patches_per_image: random positions keep coming (up to 50 n)
                if options.with_objects_only and not _keep(row["labels"], options):
                    continue
                row["id"] = base_id if position is None else f"{base_id}_y{position[0]}_x{position[1]}"
                row["source"] = str(pair.image_path)
                # Array2D takes one shape per column: rows of several shapes are stored flat with a shape (_unflatten)
                if flat:
                    row["shape"] = list(row["labels"].shape)
                    for key in ("image", "labels", "semantic"):
                        if key in row:
                            row[key] = row[key].ravel()
                yield row
                n_accepted += 1
                if n_patches_per_image is not None and n_accepted >= n_patches_per_image:
                    break


def iter_rows(
    root: str | Path, split: str = "train", options: DataOptions | None = None, **fields: Any
) -> Iterator[dict[str, Any]]:
    """The rows :func:`build_dataset` would hold, as plain dicts of numpy arrays, without a cache
    (e.g. to evaluate on whole images of different sizes). ``options`` and / or ``fields`` (option names,
    applied on top): :class:`DataOptions`."""
    options = resolve_options(options, fields, "iter_rows")  # checked here, before the first row is asked for
    return _iter_rows(find_pairs(root, split)[: options.max_images], options)


def _features(shape: tuple[int, int] | None, label_mode: str) -> datasets.Features:
    if shape is None:
        features = {
            "image": datasets.List(datasets.Value("uint8")),
            "labels": datasets.List(datasets.Value("int32")),
        }
        if label_mode == "semantic":
            features["semantic"] = datasets.List(datasets.Value("int32"))
        features["shape"] = datasets.List(datasets.Value("int32"), length=2)
    else:
        features = {"image": datasets.Array3D((*shape, 3), "uint8"), "labels": datasets.Array2D(shape, "int32")}
        if label_mode == "semantic":
            features["semantic"] = datasets.Array2D(shape, "int32")
    features.update(id=datasets.Value("string"), source=datasets.Value("string"))
    return datasets.Features(features)


def _unflatten(batch: dict[str, list]) -> dict[str, list]:
    """Transform for variable-shape datasets: flat columns + ``shape`` -> ``H x W[x3]`` arrays."""
    out = {k: v for k, v in batch.items() if k != "shape"}
    shapes = [tuple(int(s) for s in shape) for shape in batch["shape"]]
    if "image" in batch:
        # the transform gets Python lists (no format is set on these tables): the dtypes are restored here
        out["image"] = [np.asarray(v, dtype=np.uint8).reshape(*s, 3) for v, s in zip(batch["image"], shapes)]
    for key in ("labels", "semantic"):
        if key in batch:
            out[key] = [np.asarray(v, dtype=np.int32).reshape(s) for v, s in zip(batch[key], shapes)]
    return out


def _file_signature(pairs: Sequence[FilePair]) -> tuple:
    """Path, size and mtime of every file: part of the cache key so that changed files are re-read."""
    signature = []
    for pair in pairs:
        for path in (pair.image_path, pair.label_path):
            stat = path.stat()
            # resolved: one file reached by two paths (a symlink, a relative root) gets one cache entry
            signature.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def _generate(generator: Callable, features: datasets.Features, gen_kwargs: dict, cache_dir: Any) -> datasets.Dataset:
    """``Dataset.from_generator`` with the generator's own error surfaced as itself.

    ``datasets`` wraps whatever a generator raises into a ``DatasetGenerationError`` ("An error occurred while
    generating the dataset", the real message only in a long chained traceback). Our DataError (one line naming
    the file) and any other ValueError / TypeError / OSError raised while reading the files come out unwrapped,
    so that the CLI prints them as one line.
    """
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=gen_kwargs, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from cause
        if isinstance(cause, (ValueError, TypeError, OSError)):
            raise cause from cause.__cause__
        raise


def _build(
    pairs: Sequence[FilePair], options: DataOptions, *, cache_dir: str | Path | None, description: str
) -> datasets.Dataset:
    """Generate and cache the table for a list of pairs (shared by build_dataset and train_val_datasets).

    The cache key: the pairs with each file's size and mtime, the options that shape rows
    (:meth:`DataOptions.row_key`), the generator's code and :data:`_FORMAT_VERSION`."""
    row_shape = options.patch_shape
    if row_shape is None:
        # headers only (no decoding); [-2:]: slices of a volume share its H x W
        shapes = {spatial_shape_of(pair.label_path)[-2:] for pair in pairs}
        row_shape = shapes.pop() if len(shapes) == 1 else None
    flat = row_shape is None
    gen_kwargs = dict(
        # tuples, never lists: datasets splits a generator over the lists in its gen_kwargs as shards
        # (datasets/utils/sharding.py); row_key(): options that change no row must not split the cache
        pairs=tuple(pairs), options=options.row_key(), flat=flat, files=_file_signature(pairs), version=_FORMAT_VERSION
    )
    try:
        dataset = _generate(_iter_rows, _features(row_shape, options.label_mode), gen_kwargs, cache_dir)
    except ValueError as err:
        # a generator that yields nothing: datasets raises a plain ValueError ('Instruction ... corresponds to no
        # data!', arrow_reader.py), told from others by its message only
        if "corresponds to no data" not in str(err):
            raise
        n = options.min_num_instances
        rule = "" if n is None else f" and >= {n} label values incl. background"
        raise DataError(
            f"no rows from {description}: no patch holds {options.min_objects} object(s) of >= {options.min_size} px"
            f"{rule} (patch_shape={options.patch_shape}, with_objects_only={options.with_objects_only})"
        ) from err
    if flat:
        return dataset.with_transform(_unflatten)
    return dataset.with_format("numpy", dtype=None)


def build_dataset(
    root: str | Path,
    split: str = "train",
    options: DataOptions | None = None,
    *,
    cache_dir: str | Path | None = None,
    **fields: Any,
) -> datasets.Dataset:
    """Build a dataset of fixed 2D rows from ``<root>/<split>/images`` + ``<root>/<split>/labels``
    (validation and evaluation data; training data comes from :func:`train_val_datasets`, drawn anew).

    - 3D volumes (labels ``Z x H x W``) become one 2D slice per z; each slice is relabelled on its own
      (connected components per slice), so a 3D object with two blobs in a slice gives two objects.
    - ``patch_shape=None``: one row per image / slice. With ``patch_shape=(h, w)`` and
      ``n_patches_per_image=None``: the covering grid of :func:`grid_starts` (deterministic, overlapping
      at the far border). With ``n_patches_per_image=k``: up to ``k`` distinct positions drawn uniformly
      (as torch_em does), seeded by ``(seed, slice id)``; patches failing the object filter are redrawn, up
      to ``50 k`` draws. Images smaller than the patch are zero-padded bottom/right.
    - Labels per row: ``label_transform`` (optional, on the cropped 2D labels), then :func:`to_instances`
      with ``min_size`` (the dataset's own value, peft-sam's label-transform ``min_size``).
      ``label_mode="semantic"`` treats values as classes (each connected region an object, e.g. HC18's
      ``1 = head``) and keeps the class map in a ``semantic`` column.
    - ``with_objects_only``: drop rows with fewer than ``min_objects`` objects left (micro-sam's default
      sampler asks for 2 label values; we default to 1 object because medical images often hold a single
      object) and, when ``min_num_instances`` is set, rows failing torch_em's ``MinInstanceSampler`` rule
      (:func:`hf_sam_peft.data.sampling.min_instance_ok`: background counts among the label values;
      ``sampler_min_size`` counts only values covering that many pixels).
    - ``options`` (:class:`DataOptions`) and / or ``fields`` (its option names, applied on top). The
      training-only options (``augment``, ``val_fraction``, ...) are accepted and checked, so that one
      object serves every split; fixed rows are never augmented.
    - ``max_images``: only the first files by sorted id (volumes count as one).
    - ``resize_inputs``: instead of patches, every image / slice whole, resized to a square ``patch_shape``
      (longest side scaled, centred zero padding, labels nearest neighbour), as peft-sam serves its medical
      sets (see :mod:`hf_sam_peft.data.resize`); ``patch_shape`` must be square.
    """
    options = resolve_options(options, fields, "build_dataset")
    pairs = find_pairs(root, split)[: options.max_images]
    return _build(pairs, options, cache_dir=cache_dir, description=f"{Path(root) / split}")


def _storage_dtype(pairs: Sequence[FilePair]) -> str:
    """uint8 when every image file is 8-bit (the table then holds the file's values), else float32 (raw
    intensities kept, so that each served patch is normalised on its own, as peft-sam's RawTrafo does)."""
    return "uint8" if all(image_dtype_of(p.image_path) == np.uint8 for p in pairs) else "float32"


def _iter_slices(pairs: Sequence[FilePair], image_dtype: str, **_cache_key: Any) -> Iterator[dict[str, Any]]:
    """Whole raw 2D slices (image in ``image_dtype``, labels as int32 values of the file) for training."""
    from skimage.segmentation import relabel_sequential

    for pair in pairs:
        image, labels = load_pair(pair)
        for z, image_2d, labels_2d in iter_slices(image, labels):
            # ids past int32 (e.g. hashed ids) renumbered 1..N with 0 kept, to fit the int32 column; only which pixels
            # share an id matters downstream (load_labels has already refused negative ids)
            if labels_2d.size and (labels_2d.max() > np.iinfo(np.int32).max or labels_2d.min() < 0):
                labels_2d = relabel_sequential(labels_2d - labels_2d.min() if labels_2d.min() < 0 else labels_2d)[0]
            yield {
                # float32 for non-8-bit data holds uint16 exactly (rounds above 2^24); patches are normalised as served
                "image": np.asarray(image_2d, dtype=image_dtype).ravel(),
                "image_shape": list(image_2d.shape),  # may carry the RGB axis; "shape" is the labels' H x W
                "labels": labels_2d.astype(np.int32).ravel(),
                "shape": list(labels_2d.shape),
                "id": pair.id if z is None else f"{pair.id}_z{z:03d}",
                "source": str(pair.image_path),
            }


def _build_slices(pairs: Sequence[FilePair], cache_dir: str | Path | None) -> datasets.Dataset:
    """The cached table of whole raw slices a :class:`RandomPatchDataset` cuts its patches from."""
    image_dtype = _storage_dtype(pairs)
    features = datasets.Features(
        {
            "image": datasets.List(datasets.Value(image_dtype)),
            "image_shape": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "shape": datasets.List(datasets.Value("int32"), length=2),
            "id": datasets.Value("string"),
            "source": datasets.Value("string"),
        }
    )
    gen_kwargs = dict(pairs=tuple(pairs), image_dtype=image_dtype, files=_file_signature(pairs), version=_SLICES_VERSION)
    return _generate(_iter_slices, features, gen_kwargs, cache_dir).with_format("numpy", dtype=None)


def training_dataset(
    pairs: Sequence[FilePair],
    options: DataOptions | None = None,
    *,
    cache_dir: str | Path | None = None,
    name: str = "dataset",
    **fields: Any,
) -> RandomPatchDataset:
    """A :class:`RandomPatchDataset` over ``pairs`` (whole raw slices cached as an HF table): random
    ``patch_shape`` patches passing the sampler rule (:attr:`DataOptions.training_min_num_instances`,
    ``sampler_min_size``, :attr:`DataOptions.training_min_objects`), augmented by ``augment``; with
    ``resize_inputs`` each sample is a whole slice resized to the square ``patch_shape`` (no random crop).
    ``options`` and / or ``fields``: :class:`DataOptions` (defaults as in :func:`train_val_datasets`)."""
    from functools import partial

    options = resolve_options(options, fields, "training_dataset")
    return RandomPatchDataset(
        _build_slices(pairs, cache_dir), patch_shape=None if options.resize_inputs else options.patch_shape,
        make_row=partial(_make_row_at, options=options), n_patches_per_image=options.n_patches_per_image,
        min_num_instances=options.training_min_num_instances, sampler_min_size=options.sampler_min_size,
        min_objects=options.training_min_objects, augment=options.augment, seed=options.seed,
        max_attempts=options.max_attempts, name=name,
    )


def holdout_split(pairs: Sequence[FilePair], val_fraction: float, seed: int) -> tuple[list[FilePair], list[FilePair]]:
    """Deterministic split by source file (never by patch, so no image is in both): ``round(n * fraction)``
    files, at least one, chosen by a seeded permutation; both parts keep sorted id order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    if len(pairs) < 2:
        raise DataError(f"cannot hold out validation data from {len(pairs)} file(s); add a val/ split folder")
    # at least one file on each side; the permutation depends on the seed and the file count only, so a folder
    # always splits the same way
    n_val = min(max(1, round(len(pairs) * val_fraction)), len(pairs) - 1)
    chosen = set(np.random.default_rng(seed).permutation(len(pairs))[:n_val].tolist())
    train = [p for i, p in enumerate(pairs) if i not in chosen]
    val = [p for i, p in enumerate(pairs) if i in chosen]
    return train, val


def train_val_datasets(
    root: str | Path,
    options: DataOptions | None = None,
    *,
    cache_dir: str | Path | None = None,
    allow_no_val: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """``{"train": RandomPatchDataset, "val": datasets.Dataset}``: val from ``<root>/<val_split>`` when that
    folder exists, otherwise (or with ``val_split=None``, e.g. when ``val`` is the test set) a
    :func:`holdout_split` of ``val_fraction`` of the train files (default 0.1, micro-sam's; seeded by ``seed``).

    ``options`` (:class:`DataOptions`, e.g. :meth:`DataOptions.from_recipe`) and / or ``fields`` (its option
    names, applied on top); ``max_images`` applies to each split after splitting. Training data is served as
    torch_em serves it (see :mod:`hf_sam_peft.data.sampling`): a new random patch per fetch (``seed``, epoch,
    index), rejected until it passes the MinInstanceSampler rule (``min_num_instances``, default 2 = one
    object + background; ``sampler_min_size``), flipped when ``augment="flips"`` (default; ``"none"`` for
    medical sets). Validation rows are fixed (:func:`build_dataset`: grid or seeded positions, the same object
    filter, no flips). ``with_objects_only`` applies to validation rows only: every training patch passes the
    rule (and holds ``min_objects``), since a patch without objects cannot be prompted. ``random_train=False``
    gives fixed training rows too (the previous behaviour). ``resize_inputs`` serves every split as whole
    images resized to the square ``patch_shape`` (the reference's medical loaders), the same transform for
    both splits. ``allow_no_val``: a single training file and no validation folder give ``"val": None``
    (train without validation, as the demo does) instead of the :func:`holdout_split` error.
    """
    if "split" in fields:
        raise ValueError("split: not accepted here; train_val_datasets builds 'train' and 'val' itself")
    options = resolve_options(options, fields, "train_val_datasets")
    root = Path(root)
    train_pairs = find_pairs(root, "train")
    if options.val_split is not None and (root / options.val_split).is_dir():
        val_pairs = find_pairs(root, options.val_split)
    elif allow_no_val and len(train_pairs) == 1:
        val_pairs = []
    else:
        train_pairs, val_pairs = holdout_split(train_pairs, options.val_fraction, options.seed)
    # after the split: the holdout is drawn from all files, so max_images never changes which files validate
    train_pairs, val_pairs = train_pairs[: options.max_images], val_pairs[: options.max_images]
    val = _build(val_pairs, options, cache_dir=cache_dir, description=f"{root} (val)") if val_pairs else None
    if not options.random_train:
        train = _build(train_pairs, options, cache_dir=cache_dir, description=f"{root} (train)")
    else:
        train = training_dataset(train_pairs, options, cache_dir=cache_dir, name=f"{root} (train)")
    return {"train": train, "val": val}
