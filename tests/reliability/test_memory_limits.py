"""Bounded memory (issue 31, item 2): every limit is a named setting with a one-line error, and each test
watches the peak memory of the real code path on a real input (a crafted TIFF header, a label map with 70,000
objects, a grid of 2.56 million cells, an oversized upload, a large AIS post-processing).

Memory is measured in a subprocess (``ru_maxrss`` before and after the call, tracemalloc for numpy's
allocations) with an address-space limit, so the code as it was fails the test with a MemoryError instead of
taking the machine's memory.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures /proc and RLIMIT_AS (Linux)")


def measure(setup: str, call: str, budget_mb: int = 1024) -> dict:
    """Run ``setup`` then ``call`` in a fresh Python; ``call`` runs under an address-space limit of the process's
    size after ``setup`` + ``budget_mb``. Returns ``{"error": type or None, "message", "rss_mb": peak RSS growth
    during the call, "traced_mb": tracemalloc's peak during the call}``."""
    script = textwrap.dedent(
        """
        import json, resource, tracemalloc
        {setup}
        def vm_bytes():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        limit = vm_bytes() + {budget} * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        error = message = None
        try:
        {call}
        except BaseException as exc:
            error, message = type(exc).__name__, str(exc)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("RESULT" + json.dumps({{"error": error, "message": message, "rss_mb": (after - before) / 1024,
                                     "traced_mb": traced / 2 ** 20}}))
        """
    ).format(setup=textwrap.dedent(setup), call=textwrap.indent(textwrap.dedent(call), "    "), budget=budget_mb)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, f"no result (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT"):])


# ---- TIFF: the header's declared size is checked before decoding -----------------------------------------


def crafted_tiff(path: Path, width: int, height: int) -> Path:
    """A real, tiny TIFF whose header declares ``width x height`` uint8 pixels in one deflate strip."""
    data = zlib.compress(b"\0" * 1000)
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, None),
               (277, 3, 1), (278, 4, height), (279, 4, len(data))]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, value in entries:
        value = data_offset if value is None else value
        out += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    path.write_bytes(bytes(out + struct.pack("<I", 0) + data))
    return path


def test_a_tiff_header_declaring_100000_squared_fails_before_allocating(tmp_path):
    bomb = crafted_tiff(tmp_path / "bomb.tif", 100_000, 100_000)
    assert bomb.stat().st_size < 1000
    result = measure("from hf_sam_peft.data import load_image", f"load_image({str(bomb)!r})")
    assert result["error"] == "DataError", result
    message = result["message"]
    assert "\n" not in message and str(bomb) in message and "(100000, 100000)" in message
    assert "hf_sam_peft.data.io.MAX_IMAGE_PIXELS" in message
    assert result["traced_mb"] < 4 and result["rss_mb"] < 16, result


def test_a_small_crafted_tiff_still_reads_and_the_limit_is_a_setting(tmp_path, monkeypatch):
    from hf_sam_peft.data import io
    from hf_sam_peft.data import load_image

    small = crafted_tiff(tmp_path / "small.tif", 40, 25)
    assert load_image(small).shape == (25, 40)
    monkeypatch.setattr(io, "MAX_IMAGE_PIXELS", 999)
    with pytest.raises(io.DataError, match=r"small.tif: its header declares an image of shape \(25, 40\) \(1,000 samples\)"):
        load_image(small)


# ---- labels: 70,000 objects ----------------------------------------------------------------------------


def many_objects(side: int = 800, pitch: int = 3, big_ids: bool = True) -> np.ndarray:
    """A label map of 2 x 2 objects on a ``pitch`` grid (70,756 of them at 800²); ids hashed into 1 .. 4e9 as
    some annotation tools store them."""
    n = side // pitch
    rng = np.random.default_rng(0)
    ids = np.arange(1, n * n + 1, dtype=np.int64)
    if big_ids:
        ids = np.unique(rng.integers(1, 4_000_000_000, size=2 * n * n, dtype=np.int64))[: n * n]
        rng.shuffle(ids)
    tile = np.zeros((pitch, pitch), dtype=np.uint32)
    tile[:2, :2] = 1
    labels = np.zeros((side, side), dtype=np.uint32)
    labels[: n * pitch, : n * pitch] = np.kron(ids.astype(np.uint32).reshape(n, n), tile)
    return labels


def test_70000_objects_with_large_ids_choose_a_layout_without_a_dense_table(tmp_path):
    """`train --data` / the demo look at the label values of each training image (choose_layout): a bincount
    over ids up to 4e9 allocated 32 GB (the 23.8 GB report) for 2.5 MB of labels."""
    labels = many_objects()
    assert len(np.unique(labels)) - 1 > 70_000
    np.save(tmp_path / "labels.npy", labels)
    result = measure(
        f"import numpy as np\nfrom hf_sam_peft.demo import choose_layout\nlabels = np.load({str(tmp_path / 'labels.npy')!r})",
        "layout = choose_layout([{'labels': labels}])\nassert layout.layout == 'tiles', layout",
    )
    assert result["error"] is None, result
    assert result["traced_mb"] < 20 * labels.nbytes / MB and result["rss_mb"] < 200, result


def test_label_sizes_matches_bincount_for_small_and_large_ids():
    from hf_sam_peft.data.labels import label_sizes

    small = many_objects(60, big_ids=False)
    np.testing.assert_array_equal(label_sizes(small), np.bincount(small.ravel())[1:][np.bincount(small.ravel())[1:] > 0])
    large = many_objects(60)
    assert sorted(label_sizes(large).tolist()) == sorted(label_sizes(small).tolist())
    assert label_sizes(np.zeros((3, 3), np.uint8)).size == 0


def test_sampling_16_of_70000_objects_stays_far_below_the_dense_masks():
    """Training samples ``n_objects`` ids first and builds only their masks (the reference's ConvertToSamInputs
    ``_get_prompt_lists`` samples ids before ``segmentation_to_one_hot``): 16 masks, not 70,000."""
    import torch

    from hf_sam_peft.data.labels import to_instances
    from hf_sam_peft.prompts import sample_objects

    instances = torch.from_numpy(to_instances(many_objects(big_ids=False))).long()
    n = int(instances.max())
    dense = n * instances.numel()  # bytes of (N, H, W) bool masks of every object: 45 GB
    import tracemalloc

    tracemalloc.start()
    masks = sample_objects([instances], 16, torch.Generator().manual_seed(0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert masks[0].shape == (16, *instances.shape) and n > 70_000
    assert peak < dense / 1000, (peak, dense)


# ---- study grid --------------------------------------------------------------------------------------------


def test_a_grid_of_2_56_million_cells_is_a_one_line_error_at_once():
    shared = ROOT.parent / "shared" / "data" / "dsb2018_stage1test_fluo_nuclei"
    if not shared.is_dir():
        pytest.skip("the study checks its dataset recipe, whose data lives in ../shared/data")
    axes = {"r": list(range(1, 41)), "alpha": list(range(1, 41)), "lora_dropout": [i / 100 for i in range(40)],
            "training.learning_rate": [i * 1e-5 for i in range(1, 41)]}
    raw = {"name": "huge", "datasets": ["dsb2018_stage1test_fluo_nuclei"], "methods": ["lora"], "seeds": [0],
           "ablations": {"lora": axes}}
    result = measure(
        # the modules the check imports lazily are imported first: only the check itself is measured
        f"import hf_sam_peft.data, hf_sam_peft.methods, hf_sam_peft.train, hf_sam_peft.training.trainer\n"
        f"from hf_sam_peft.study.spec import study_from_dict\nraw = {raw!r}",
        "study_from_dict(raw)", budget_mb=512,
    )
    assert result["error"] == "ValueError", result
    message = result["message"]
    assert "\n" not in message and "the grid has 2,560,002 cells" in message
    assert "hf_sam_peft.study.spec.MAX_STUDY_CELLS" in message
    assert result["traced_mb"] < 10, result


# ---- the app's uploads -------------------------------------------------------------------------------------


def test_the_app_refuses_an_image_too_large_before_decoding_it(tmp_path):
    from PIL import Image

    path = tmp_path / "scan.png"
    Image.new("L", (9000, 9000)).save(path)  # 81 million pixels, a few hundred kB on disk
    setup = "import hf_sam_peft.data, PIL.Image, PIL.PngImagePlugin\nfrom hf_sam_peft.app.session import load_app_image"
    result = measure(setup, f"load_app_image({str(path)!r})")
    assert result["error"] == "ValueError", result
    assert "scan.png has 81,000,000 pixels" in result["message"] and "MAX_APP_IMAGE_PIXELS" in result["message"]
    assert result["traced_mb"] < 4, result  # the 81 MB of pixels were never decoded


def test_the_app_refuses_a_file_over_the_upload_limit(tmp_path, monkeypatch):
    from PIL import Image

    from hf_sam_peft.app import session

    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8)).save(path)
    monkeypatch.setattr(session, "MAX_UPLOAD_BYTES", 100_000)
    with pytest.raises(ValueError, match=r"^big.png is 0 MB, more than the app's upload limit of 0 MB \(hf_sam_peft.app.session.MAX_UPLOAD_BYTES\)$"):
        session.load_app_image(path)


def test_the_app_server_is_launched_with_the_upload_limit(monkeypatch):
    gradio = pytest.importorskip("gradio")
    from hf_sam_peft.app import session, ui

    seen = {}
    monkeypatch.setattr(ui, "build_app", lambda logic: gradio.Blocks())
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))

    class Logic:
        out_dir = Path(".")

    ui.launch(Logic())
    assert seen["max_file_size"] == session.MAX_UPLOAD_BYTES


# ---- AIS post-processing of a large image --------------------------------------------------------------------


def blob_maps(side: int, sigma: float = 4.0) -> np.ndarray:
    """Decoder-like maps with blob objects: foreground, centre and boundary distances."""
    from scipy.ndimage import gaussian_filter

    base = gaussian_filter(np.random.default_rng(0).random((side, side), dtype=np.float32), sigma)
    base = (base - base.min()) / (base.max() - base.min())
    return np.stack([base > 0.5, 1 - base, 1 - base]).astype(np.float32)


def test_large_ais_post_processing_runs_in_blocks_with_bounded_memory(tmp_path):
    """Above POSTPROCESS_TILE_PIXELS the watershed runs block by block (settings scaled down here so the image
    is small: 1500² with 256² blocks stands for 10000² with 2048² blocks)."""
    np.save(tmp_path / "maps.npy", blob_maps(1500))
    setup = f"""
        import numpy as np
        import hf_sam_peft.instance_segmentation as ins
        maps = np.load({str(tmp_path / 'maps.npy')!r})
        ins.POSTPROCESS_TILE_PIXELS, ins.POSTPROCESS_BLOCK, ins.POSTPROCESS_HALO = 250_000, 256, 32
    """
    result = measure(setup, "ins.distances_to_instances(*maps, min_size=50)")
    assert result["error"] is None, result
    pixels = 1500 * 1500
    assert result["traced_mb"] * MB < 16 * pixels, result  # one watershed over the image: 38 bytes / px traced
    assert result["rss_mb"] * MB < 50 * pixels, result  # ... and 135 bytes / px resident


def test_block_post_processing_gives_the_objects_of_one_watershed(monkeypatch):
    import hf_sam_peft.instance_segmentation as ins
    from hf_sam_peft.evaluation.metrics import mean_segmentation_accuracy

    maps = blob_maps(900, sigma=6.0)
    whole = ins.distances_to_instances(*maps, min_size=50)
    monkeypatch.setattr(ins, "POSTPROCESS_TILE_PIXELS", 100_000)
    monkeypatch.setattr(ins, "POSTPROCESS_BLOCK", 256)
    monkeypatch.setattr(ins, "POSTPROCESS_HALO", 48)
    blocks = ins.distances_to_instances(*maps, min_size=50)
    assert blocks.dtype == np.uint32 and blocks.max() == whole.max() > 20
    assert mean_segmentation_accuracy(blocks, whole) == pytest.approx(1.0)
