"""End to end: `hf-sam-peft app` on a free loopback port, driven by Playwright in headless Debian Chromium.

Uploads a real image, clicks inside a known object, and checks that the mask the page shows (its overlay
picture and its downloadable label image) is the Python API's mask for the same prompt; then switches
adapters and sees the mask change. Skips with the reason when gradio, playwright, chromium or the data
are missing. Set HF_SAM_PEFT_APP_SCREENSHOT=path to keep a copy of the screenshot.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.app.test_app_logic import make_models
from tests.conftest import shared_dataset

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]
DATASET = "dsb2018_stage1test_fluo_nuclei"
TIMEOUT_MS = 20_000


def _requirements() -> str:
    """Path of the chromium binary, or skip with what is missing."""
    for module, hint in (("gradio", "pip install 'hf-sam-peft[app]'"), ("playwright", "pip install playwright")):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed ({hint})")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no 'chromium' on PATH (apt-get install -y chromium)")
    return chromium


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _app_command(args: list[str]) -> list[str]:
    """`python -m hf_sam_peft.cli app ...` once the command is wired in, else the command module directly."""
    from hf_sam_peft import cli

    if "app" in cli.COMMANDS:
        return [sys.executable, "-m", "hf_sam_peft.cli", "app", *args]
    shim = (
        "import argparse, sys; from hf_sam_peft.commands import app; p = argparse.ArgumentParser(); "
        "app.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    return [sys.executable, "-c", shim, "app", *args]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"app did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _inner_point(labels: np.ndarray) -> tuple[int, int, int]:
    """(x, y, id): the point deepest inside the largest object (its distance-transform maximum)."""
    from scipy.ndimage import distance_transform_edt

    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    obj = int(ids[np.argmax(counts)])
    depth = distance_transform_edt(labels == obj)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x), int(y), obj


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    _requirements()
    root = tmp_path_factory.mktemp("app_browser")
    base_dir, adapters = make_models(root)
    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": os.getcwd()}
    args = ["--base", str(base_dir), "--adapter", str(adapters["lora"]), "--adapter", str(adapters["ssf"])]
    with log.open("w") as out:
        process = subprocess.Popen(_app_command([*args, "--port", str(port)]), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(url, process, log)
        yield url, base_dir, adapters
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _api_mask(base_dir: Path, adapter: Path | None, image: np.ndarray, x: int, y: int) -> np.ndarray:
    """The Python API's mask for one positive point (best of SAM's three by predicted IoU)."""
    from hf_sam_peft.evaluation.predictor import SamPredictor, load_model

    predictor = SamPredictor(load_model(str(base_dir), str(adapter) if adapter else None))
    predictor.set_image(image)
    return predictor.predict_masks(torch.tensor([[[x, y]]]), torch.tensor([[1]]), multimask=True)[0]


def _fetch(page, url: str) -> bytes:
    response = page.request.get(url)
    assert response.ok, f"GET {url}: {response.status}"
    return response.body()


def _shown(page, model: str, plain: np.ndarray, click: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(label image offered for download, mask read off the overlay picture) once `model`'s result is shown."""
    import tifffile
    from PIL import Image

    link = page.locator(f"#download a[href*='_{model}_mask.tif']")
    link.wait_for(timeout=TIMEOUT_MS)
    labels = tifffile.imread(io.BytesIO(_fetch(page, link.first.get_attribute("href"))))
    page.wait_for_function(
        "() => { const e = document.querySelector('#picture img'); return e && e.complete && e.naturalWidth > 0; }",
        timeout=TIMEOUT_MS, polling=100,
    )
    overlay = np.asarray(Image.open(io.BytesIO(_fetch(page, page.locator("#picture img").first.get_attribute("src")))).convert("RGB"))
    tinted = np.any(overlay != plain, axis=-1)
    yy, xx = np.mgrid[: plain.shape[0], : plain.shape[1]]
    marker = (xx - click[0]) ** 2 + (yy - click[1]) ** 2 <= 16  # the point marker drawn on top
    tinted[marker] = labels.astype(bool)[marker]
    return labels.astype(bool), tinted


def test_click_compare_adapters_in_browser(app_server, tmp_path):
    chromium = _requirements()
    from playwright.sync_api import sync_playwright

    from hf_sam_peft.data import load_image, load_labels, normalize_image

    url, base_dir, adapters = app_server
    data = shared_dataset(DATASET)
    image_path = sorted((data / "val" / "images").glob("*"))[0]
    image = load_image(image_path)
    gt = load_labels(data / "val" / "labels" / f"{image_path.stem}.tif")
    target_x, target_y, obj = _inner_point(gt)
    plain = normalize_image(image)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.locator("#image-upload input[type=file]").set_input_files(str(image_path))
            page.wait_for_function(
                "() => { const e = document.querySelector('#picture img');"
                " return e && e.complete && e.naturalWidth > 0 && e.getBoundingClientRect().width > 0; }",
                timeout=TIMEOUT_MS, polling=100,
            )
            picture = page.locator("#picture img").first
            box = picture.bounding_box()
            natural_w, natural_h = picture.evaluate("e => [e.naturalWidth, e.naturalHeight]")
            assert (natural_h, natural_w) == image.shape[:2]
            page.mouse.click(
                box["x"] + (target_x + 0.5) * box["width"] / natural_w,
                box["y"] + (target_y + 0.5) * box["height"] / natural_h,
            )
            prompts = page.locator("#prompts textarea")
            page.wait_for_function(
                "() => document.querySelector('#prompts textarea').value.startsWith('+(')", timeout=TIMEOUT_MS, polling=100
            )
            x, y = (int(v) for v in re.fullmatch(r"\+\((\d+), (\d+)\)", prompts.input_value()).groups())
            assert abs(x - target_x) <= 2 and abs(y - target_y) <= 2 and gt[y, x] == obj  # the click landed inside

            masks = {}
            for model, adapter in (("base", None), ("lora", adapters["lora"]), ("ssf", adapters["ssf"])):
                if model != "base":
                    page.locator("#model").get_by_label(model, exact=True).check()
                labels, tinted = _shown(page, model, plain, (x, y))
                expected = _api_mask(base_dir, adapter, image, x, y)
                assert labels.shape == expected.shape == image.shape[:2]
                assert np.mean(labels == expected) >= 0.99, model
                assert np.mean(tinted == expected) >= 0.99, model
                assert re.search(rf"model {model} · predicted IoU -?\d+\.\d{{3}}", page.locator("#status").inner_text())
                masks[model] = labels
            assert prompts.input_value() == f"+({x}, {y})"  # same prompt for every model
            assert np.mean(masks["base"] != masks["lora"]) > 0.01 and np.mean(masks["lora"] != masks["ssf"]) > 0.01

            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            if os.environ.get("HF_SAM_PEFT_APP_SCREENSHOT"):
                shutil.copy(tmp_path / "app.png", os.environ["HF_SAM_PEFT_APP_SCREENSHOT"])

            broken = tmp_path / "broken.png"
            broken.write_bytes(b"this is not a png")
            page.locator("#image-upload").get_by_role("button", name="Clear").click()  # back to an empty upload box
            page.locator("#image-upload input[type=file]").set_input_files(str(broken))
            status = page.locator("#status")
            page.wait_for_function(
                "() => document.querySelector('#status').innerText.includes('Error')", timeout=TIMEOUT_MS, polling=100
            )
            assert "could not read" in status.inner_text() and "Traceback" not in page.content()
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
