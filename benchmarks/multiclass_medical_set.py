"""A small real multi-class medical segmentation set: axial brain-MRI slices with grey / white matter labels.

Source: the MNI ICBM152 2009a *symmetric* non-linear T1 template and its grey- and white-matter probability
maps, in the form nilearn ships them inside its wheel (``nilearn/datasets/data/``; nothing is fetched at run
time). The files are found through ``importlib.metadata`` (nilearn itself is never imported, so the package may
be installed with ``pip install --no-deps nilearn``) and read with the library's NIfTI loader (nibabel, the
``nifti`` extra), so building needs none of nilearn's dependencies.

Output, the layout of the sets in ../shared/data::

    OUT/{train,val,test}/images/<id>.png   uint8 grey T1 slice, H x W = 233 x 197 (1 mm voxels)
    OUT/{train,val,test}/labels/<id>.tif   uint8 class map: 0 background (CSF and outside the brain),
                                           1 grey matter, 2 white matter (zlib TIFF)
    OUT/SOURCE.md, OUT/manifest.json

Labels are the voxel-wise maximum-probability class of {background = 1 - p(GM) - p(WM), GM, WM}. Slices are
axial (the volume's third axis, inferior -> superior), spread evenly over the levels where both classes cover
at least ``min_class_frac`` of the slice, and dealt to the splits in the repeating pattern
train, train, val, train, test, so every split spans the brain from the cerebellum to the vertex and no two
slices of different splits are closer than ``min_gap`` mm. See SOURCE.md (written by :func:`build`) for the
details, the licence and the citations.

Usage: ``python benchmarks/multiclass_medical_set.py OUT [--overwrite]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGE = "nilearn"
DATA_DIR = "nilearn/datasets/data"
FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# sha256 of the files as shipped by nilearn 0.10.3, 0.12.1 and 0.14.1 (identical in all three)
KNOWN_SHA256 = {
    "t1": "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    "gm": "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    "wm": "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
}
SHAPE_XYZ = (197, 233, 189)  # 1 mm voxels, RAS, world origin (-98, -134, -72) mm
Z_ORIGIN_MM = -72.0
CLASSES = {1: "grey matter", 2: "white matter"}
SPLIT_PATTERN = ("train", "train", "val", "train", "test")
OUTPUTS = ("train", "val", "test", "SOURCE.md", "manifest.json")  # what build() writes (and --overwrite replaces)
INSTALL_HINT = f"pip install --no-deps {PACKAGE}==0.14.1"
SET_NAME = "icbm152_2009a_sym_brain_tissue"


class SourceMissing(RuntimeError):
    """The package that ships the source files is not installed (or lacks the files)."""


class SourceMismatch(RuntimeError):
    """The installed package ships files other than the ones this set was made from."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_files() -> tuple[str, dict[str, Path]]:
    """``(nilearn version, {"t1" | "gm" | "wm": path})`` of the installed distribution's files, without
    importing it; each file is checked against the distribution's RECORD hash where RECORD lists it."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise SourceMissing(f"{PACKAGE} is not installed; install it with: {INSTALL_HINT}") from None
    record = {str(f).replace("\\", "/"): f for f in (dist.files or [])}
    paths = {}
    for key, name in FILES.items():
        rel = f"{DATA_DIR}/{name}"
        entry = record.get(rel)
        path = Path(dist.locate_file(entry if entry is not None else rel))
        if not path.is_file():
            raise SourceMissing(f"{PACKAGE} {dist.version} has no {rel} (looked at {path}); {INSTALL_HINT}")
        if entry is not None and entry.hash is not None and entry.hash.mode == "sha256":
            digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
            if digest != entry.hash.value:
                raise SourceMismatch(f"{path} does not match the sha256 in {PACKAGE}'s RECORD (file altered?)")
        paths[key] = path
    return dist.version, paths


def read_volume(path: Path) -> np.ndarray:
    """A uint8 NIfTI volume as ``(x, y, z)``, read by the library's own NIfTI loader (which returns the
    reference's ``(z, y, x)``; transposed back here so the anatomy below reads in RAS terms)."""
    from hf_sam_peft.data import load_image

    volume = load_image(path)
    if volume.dtype != np.uint8 or volume.ndim != 3:
        raise SourceMismatch(f"{path}: expected a 3D uint8 volume, got {volume.dtype} {volume.shape}")
    return np.ascontiguousarray(volume.T)


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Maximum-probability class of {0: background (1 - GM - WM), 1: GM, 2: WM} from 0..255 probability maps;
    ties go GM over WM, and a tissue must beat the background strictly."""
    gm, wm = gm.astype(np.int16), wm.astype(np.int16)
    background = 255 - np.clip(gm + wm, 0, 255)
    labels = np.zeros(gm.shape, np.uint8)
    labels[(gm >= wm) & (gm > background)] = 1
    labels[(wm > gm) & (wm > background)] = 2
    return labels


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` of a RAS ``(x, y, z)`` volume as an image: rows anterior (top) -> posterior,
    columns the subject's left -> right (neurological convention)."""
    return np.ascontiguousarray(np.flipud(volume[:, :, z].T))


def select_slices(labels: np.ndarray, n_slices: int, min_class_frac: float, min_gap: int) -> list[int]:
    """``n_slices`` axial indices spread evenly over the levels where every class covers >= ``min_class_frac``
    of the slice (each target snapped to the nearest such level); consecutive picks are >= ``min_gap`` apart."""
    n_pixels = labels.shape[0] * labels.shape[1]
    counts = np.stack([(labels == c).sum(axis=(0, 1)) for c in CLASSES])  # (classes, z)
    valid = np.flatnonzero((counts >= min_class_frac * n_pixels).all(axis=0))
    if valid.size == 0:
        raise ValueError(f"no axial slice has every class at >= {min_class_frac} of its pixels")
    targets = np.linspace(valid[0], valid[-1], n_slices)
    picks = [int(valid[np.argmin(np.abs(valid - t))]) for t in targets]
    gaps = np.diff(picks)
    if gaps.size and gaps.min() < min_gap:
        raise ValueError(
            f"{n_slices} slices over axial levels {valid[0]}..{valid[-1]} come {gaps.min()} apart, under "
            f"min_gap={min_gap}: ask for fewer slices or a smaller gap"
        )
    return picks


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2D uint8 image, got {image.dtype} {image.shape}")
    Image.fromarray(image).save(path, format="PNG", optimize=False, compress_level=6)  # 2D uint8 -> mode "L"


def _write_tif(path: Path, labels: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, labels, compression="zlib", photometric="minisblack", metadata=None)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace its set")


def build(
    out_dir: str | Path,
    *,
    n_slices: int = 15,
    min_class_frac: float = 0.02,
    min_gap: int = 6,
    overwrite: bool = False,
    strict: bool = True,
) -> list[dict]:
    """Write the set to ``out_dir`` and return its manifest (one dict per image).

    ``n_slices`` (>= 10: at least 5 train, 2 val, 2 test) axial slices are dealt to the splits in the pattern
    train, train, val, train, test (15 -> 9 / 3 / 3). ``strict`` refuses files whose sha256 differs from the
    ones this set was made from (nilearn 0.10.3-0.14.1). A non-empty ``out_dir`` is refused unless
    ``overwrite``, which replaces only the entries this function writes (``OUTPUTS``), each once the new set
    is complete; other files there are left alone.
    """
    if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 10:
        raise ValueError(f"n_slices: expected an int >= 10 (5 train, 2 val, 2 test at least), got {n_slices!r}")
    if not 0.0 < float(min_class_frac) < 0.5:
        raise ValueError(f"min_class_frac: expected a fraction in (0, 0.5), got {min_class_frac!r}")
    if isinstance(min_gap, bool) or not isinstance(min_gap, int) or min_gap < 2:
        raise ValueError(f"min_gap: expected an int >= 2 (no neighbouring slices across splits), got {min_gap!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)

    version, paths = source_files()
    digests = {key: _sha256(path) for key, path in paths.items()}
    if strict and digests != KNOWN_SHA256:
        changed = sorted(k for k in FILES if digests[k] != KNOWN_SHA256[k])
        raise SourceMismatch(
            f"{PACKAGE} {version} ships other {', '.join(changed)} files than the set was made from "
            f"(sha256 in KNOWN_SHA256); pass strict=False (--not-strict) to build from them anyway"
        )
    volumes = {key: read_volume(path) for key, path in paths.items()}
    for key, volume in volumes.items():
        if volume.shape != SHAPE_XYZ:
            raise SourceMismatch(f"{paths[key]}: shape {volume.shape}, expected {SHAPE_XYZ}")
    t1 = volumes["t1"]
    labels = tissue_labels(volumes["gm"], volumes["wm"])
    picks = select_slices(labels, n_slices, min_class_frac, min_gap)

    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".multiclass_medical_set-", dir=out_dir))
    try:
        manifest = []
        for i, z in enumerate(picks):
            split = SPLIT_PATTERN[i % len(SPLIT_PATTERN)]
            sample_id = f"icbm152_ax{z:03d}"
            image, label = axial(t1, z), axial(labels, z)
            for sub in ("images", "labels"):
                (stage / split / sub).mkdir(parents=True, exist_ok=True)
            _write_png(stage / split / "images" / f"{sample_id}.png", image)
            _write_tif(stage / split / "labels" / f"{sample_id}.tif", label)
            present = [int(c) for c in np.unique(label) if c != 0]
            manifest.append({
                "split": split,
                "id": sample_id,
                "shape": list(label.shape),
                "n_classes": len(present),
                "classes": {str(c): CLASSES[c] for c in present},
                "foreground_frac": round(float((label > 0).mean()), 4),
                "class_frac": {str(c): round(float((label == c).mean()), 4) for c in present},
                "slice_axis": "axial (volume axis 3, z)",
                "slice_index": int(z),
                "mni_z_mm": Z_ORIGIN_MM + z,
            })
        with open(stage / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
        (stage / "SOURCE.md").write_text(_source_md(version, digests, manifest, min_class_frac, min_gap),
                                         encoding="utf-8")
        for name in OUTPUTS:  # the new set is complete: swap it in
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(stage / name, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


LICENCE_NOTICE = """\
Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University. Permission to use, copy, modify, and distribute this software and its documentation for
any purpose and without fee is hereby granted, provided that the above copyright notice appear in all copies.
The authors and McGill University make no representations about the suitability of this software for any
purpose. It is provided "as is" without express or implied warranty. The authors are not responsible for any
data loss, equipment damage, property loss, or injury to subjects or patients resulting from the use or
misuse of this software package."""


def _source_md(version: str, digests: dict[str, str], manifest: list[dict], min_class_frac: float,
               min_gap: int) -> str:
    by_split = {s: [m for m in manifest if m["split"] == s] for s in ("train", "val", "test")}
    split_lines = "\n".join(
        f"  - {split} ({len(rows)}): "
        + ", ".join(f"`{m['id']}` (z = {m['mni_z_mm']:+.0f} mm)" for m in rows)
        for split, rows in by_split.items()
    )
    fg = [m["foreground_frac"] for m in manifest]
    spacing = np.diff(sorted(m["slice_index"] for m in manifest)).tolist()
    files = "\n".join(f"  - `{DATA_DIR}/{FILES[k]}` (sha256 `{digests[k]}`)" for k in FILES)
    return f"""# {SET_NAME}

Real T1-weighted brain MRI (the MNI ICBM152 2009a symmetric non-linear average of 152 normal adults, 1 mm)
with a **multi-class** tissue label map per axial slice: **0 = background** (cerebrospinal fluid and everything
outside the brain), **1 = grey matter** (cerebral and cerebellar cortex, most of the deep grey nuclei; the
template's putamen / thalamus are partly labelled white matter), **2 = white matter**.

- Upstream: ICBM 2009a Nonlinear Symmetric template, McConnell Brain Imaging Centre, Montreal Neurological
  Institute (http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009, archive
  `mni_icbm152_nlin_sym_09a_nifti.zip`).
- Taken from: the Python package **{PACKAGE}=={version}** (BSD-3-Clause), which ships re-scaled copies inside
  its wheel; read through `importlib.metadata` (nilearn is not imported), no download:
{files}
  The same three files (same sha256) are in nilearn 0.10.3, 0.12.1 and 0.14.1. nilearn's copies are uint8:
  the T1 is skull-stripped (0 outside the brain mask) and scaled to 0..255, the probability maps are scaled
  to 0..255 (255 = probability 1). Verified: all three volumes are exactly left-right symmetric (the
  symmetric release, as the file names say; nilearn's description calling it "asymmetrical" is wrong).
- Licence of the images (nilearn's description says "unknown"; this is the template's own COPYING, which
  asks for the notice in all copies, so it is reproduced here):

  > {LICENCE_NOTICE.replace(chr(10), chr(10) + "  > ")}

- Cite: V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli, D.L. Collins. "Unbiased nonlinear average
  age-appropriate brain templates from birth to adulthood." NeuroImage 47 Suppl. 1, S102 (2009),
  doi:10.1016/S1053-8119(09)70884-5; V. Fonov, A.C. Evans, K. Botteron, C.R. Almli, R.C. McKinstry,
  D.L. Collins and the BDCG. "Unbiased average age-appropriate atlases for pediatric studies." NeuroImage
  54(1), 313-327 (2011), doi:10.1016/j.neuroimage.2010.07.033; D.L. Collins, A.P. Zijdenbos, W.F.C. Baare,
  A.C. Evans. "ANIMAL+INSECT: Improved cortical structure segmentation." IPMI 1999, LNCS 1613, 210-223,
  doi:10.1007/3-540-48714-X_16.
- What the labels are: **derived, not hand-drawn**. The ICBM tissue maps are probability maps from automatic
  GM/WM/CSF classification of the non-linearly registered subjects (no manual tracing); here each
  voxel gets the most probable of {{background = 1 - p(GM) - p(WM), GM, WM}} (ties GM over WM; a tissue must
  beat background strictly), so CSF (ventricles, sulci) is background. The image is one average brain, not a
  patient scan: sharper-edged anatomy and less noise than any single MRI.
- Processing (`benchmarks/multiclass_medical_set.py`, deterministic, numpy only):
  - slice axis: **axial**, the volume's third axis (z, inferior -> superior), MNI z = index - 72 mm; each slice
    is stored as rows anterior -> posterior, columns subject left -> right (neurological), 233 x 197 px,
    1 mm pixels, no resizing; image = nilearn's uint8 T1 values unchanged (8-bit grey PNG), label = uint8
    class map (zlib TIFF), values 0, 1, 2 only;
  - slice choice: only levels where **each** class covers >= {min_class_frac:.0%} of the slice (this skips the
    lowest and highest slices, where white matter is absent or tiny); {len(manifest)} slices spread evenly over
    those levels (nearest valid level), dealt in the repeating pattern train, train, val, train, test, so each
    split spans cerebellum to vertex;
  - leakage: consecutive chosen slices are {min(spacing)}-{max(spacing)} mm apart (required: >= {min_gap} mm), so no
    two slices of different splits are neighbours. All slices still come from the **same (average) brain**: val/test
    measure generalisation to other axial levels, not to other subjects or scanners.
- Splits and ids (`icbm152_ax<z index>`):
{split_lines}
- Foreground fraction per slice {min(fg):.2f}-{max(fg):.2f}; both classes present in every label map
  (per-class fractions in manifest.json).
- Layout: `<split>/images/<id>.png`, `<split>/labels/<id>.tif`; details in manifest.json. Read as semantic
  labels (`label_mode="semantic"`): class values 1..2, 0 background.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the set in a non-empty OUT")
    parser.add_argument("--n-slices", type=int, default=15, help="axial slices in all (default 15: 9/3/3)")
    parser.add_argument("--min-class-frac", type=float, default=0.02,
                        help="skip slices where a class covers less than this fraction (default 0.02)")
    parser.add_argument("--min-gap", type=int, default=6, help="least distance of chosen slices, mm (default 6)")
    parser.add_argument("--not-strict", action="store_true",
                        help="build even if nilearn's files differ from the ones the set was made from")
    args = parser.parse_args(argv)
    try:
        manifest = build(args.out, n_slices=args.n_slices, min_class_frac=args.min_class_frac,
                         min_gap=args.min_gap, overwrite=args.overwrite, strict=not args.not_strict)
    except (SourceMissing, SourceMismatch, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = {s: sum(m["split"] == s for m in manifest) for s in ("train", "val", "test")}
    print(f"wrote {len(manifest)} slices to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
