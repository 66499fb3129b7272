"""Installed from a wheel, as a new user installs it: the commands work outside the checkout.

Once per run: the wheel is built from a copy of the sources, installed with ``pip --no-deps --no-index`` into a
fresh virtual environment in a temporary folder, and every command runs from a working directory that is not
the checkout. The venv sees the test interpreter's *dependencies* (torch, transformers, peft, ...) through a
``.pth`` of their site-packages folders: a path line in a ``.pth`` is only appended to ``sys.path``, the
``.pth`` files inside it are not run, so the checkout's editable finder (``__editable__*.pth``) never loads
and ``hf_sam_peft`` can only come from the wheel; the first test checks that it does (package, recipes, model
card template, tuner registration, console script). ``../shared/data`` is linked beside the working directory,
so the packaged recipes' relative roots (relative to the working directory) find the small real nuclei set.
Tiny random SAM, two training steps: about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA, shared_dataset

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]
DSB = "dsb2018_stage1test_fluo_nuclei"
DATA = f"../shared/data/{DSB}"  # as a user passes it: relative to the working directory
# two steps on two images, every process light: these runs check that the wheel works, not what it learns
TINY = [
    "--max-steps", "2", "--set", "n_objects=4", "--set", "n_sub_iterations=2", "--set", "per_device_train_batch_size=1",
    "--set", "per_device_eval_batch_size=1", "--set", "dataloader_num_workers=0", "--set", "method_options.r=4",
    "--set", "data.max_images=2", "--set", "eval_strategy=steps", "--set", "eval_steps=2", "--set",
    "save_strategy=steps", "--set", "save_steps=2", "--set", "logging_steps=1", "--set", "use_cpu=true",
    "--set", "disable_tqdm=true",
]
# what the wheel is built from; tests, benchmarks and build leftovers stay behind
SOURCE_IGNORE = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", "outputs", "tests", "benchmarks", "*.whl",
)

CHECK_SCRIPT = r"""
import importlib.metadata as md, inspect, json, sys
import hf_sam_peft
from hf_sam_peft.cli import COMMANDS
from hf_sam_peft.data.recipes import RECIPES_DIR
from hf_sam_peft.hub.card import _template_path
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType
dist = md.distribution("hf-sam-peft")
scripts = [e.value for e in md.entry_points(group="console_scripts") if e.name == "hf-sam-peft"]
print(json.dumps({
    "package": hf_sam_peft.__file__, "version": hf_sam_peft.__version__, "recipes": str(RECIPES_DIR),
    "card": str(_template_path()), "fact": inspect.getfile(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.FACT]),
    "dist": str(dist.locate_file("")), "direct_url": json.loads(dist.read_text("direct_url.json") or "{}"),
    "entry_point": scripts[0] if scripts else None, "commands": list(COMMANDS),
    "editable_finders": [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()],
    "modules": sorted({getattr(m, "__file__", None) or "" for n, m in sys.modules.items()
                       if n.startswith("hf_sam_peft")}),
}))
"""


class WheelEnv:
    """The built wheel, the venv it is installed in, and a user's working folder beside ``shared/data``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.venv = base / "venv"
        self.bin = self.venv / "bin"
        self.work = base / "home" / "user"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(self.venv),
                   HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONNOUSERSITE="1")
        return env

    def run(self, *argv: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
        """Run a command of the venv (``hf-sam-peft``, ``python``) in the user's folder; it must succeed."""
        command = [str(self.bin / str(argv[0])), *map(str, argv[1:])]
        result = subprocess.run(command, cwd=self.work, env=self.env(), capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result


def _run(command: list, **kwargs) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> WheelEnv:
    shared_dataset(DSB)
    wheel_env = WheelEnv(tmp_path_factory.mktemp("wheel"))
    base = wheel_env.base
    shutil.copytree(ROOT, base / "src", ignore=SOURCE_IGNORE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          base / "dist", base / "src"], timeout=300)
    (wheel_env.wheel,) = (base / "dist").glob("hf_sam_peft-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", wheel_env.venv], timeout=120)
    python = wheel_env.bin / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=wheel_env.env()).stdout.strip()
    wheel_env.site = Path(purelib)
    # the wheel first, into a venv that sees nothing else: pip must not take the editable install for this one
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
          "-q", wheel_env.wheel], timeout=300, env=wheel_env.env())
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (wheel_env.site / "_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    wheel_env.work.mkdir(parents=True)
    (base / "home" / "shared").mkdir()
    (base / "home" / "shared" / "data").symlink_to(SHARED_DATA.resolve(), target_is_directory=True)
    return wheel_env


@pytest.fixture(scope="module")
def trained(installed) -> Path:
    """An adapter trained by ``train --data`` on the user's folder (tiles chosen from the data, + UNETR)."""
    result = installed.run("hf-sam-peft", "train", "--data", DATA, "--model", "tiny", "--method", "lora",
                           "--output-dir", "by_data", *TINY)
    assert "data layout: tiles (" in result.stdout and "adapter saved to: by_data/adapter" in result.stdout
    assert "+ UNETR decoder (AIS)" in result.stdout  # folder_tiles trains the AIS decoder, as micro-sam does
    return installed.work / "by_data" / "adapter"


def test_the_wheel_holds_the_recipes_and_the_model_card_template(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    source = ROOT / "hf_sam_peft" / "recipes"
    shipped = {f"hf_sam_peft/recipes/{p.relative_to(source).as_posix()}" for p in source.rglob("*.yaml")}
    assert len(shipped) > 30 and shipped <= names  # training recipes, datasets/, studies/, accelerate/
    assert "hf_sam_peft/model_cards/adapter_card.md" in names
    entry_points = zipfile.ZipFile(installed.wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "hf-sam-peft = hf_sam_peft.cli:main" in entry_points


def test_the_installed_package_is_the_wheels_copy(installed):
    info = json.loads(installed.run("python", "-c", CHECK_SCRIPT).stdout)
    site_dir = str(installed.site)
    for key in ("package", "recipes", "card", "fact", "dist"):
        assert info[key].startswith(site_dir), (key, info[key])
    assert all(path.startswith(site_dir) for path in info["modules"] if path), info["modules"]
    assert info["direct_url"]["url"].endswith(installed.wheel.name)  # pip installed this very file
    assert info["entry_point"] == "hf_sam_peft.cli:main" and not info["editable_finders"]
    assert (installed.bin / "hf-sam-peft").is_file()
    assert installed.run("hf-sam-peft", "--version").stdout.strip() == f"hf-sam-peft {info['version']}"
    listing = installed.run("python", "-m", "hf_sam_peft", "recipes").stdout  # python -m: the same CLI
    assert "  smoke_tiny " in listing and "  accelerate/cpu_ddp " in listing and site_dir in listing


def test_train_by_recipe_name(installed):
    result = installed.run("hf-sam-peft", "train", "smoke_tiny", "--output-dir", "by_name", "--max-steps", "2",
                           "--set", "n_sub_iterations=2", "--set", "plot_loss_curve=false")
    assert "recipe smoke_tiny: lora on tiny" in result.stdout
    summary = json.loads((installed.work / "by_name" / "adapter" / "training_summary.json").read_text())
    assert summary["steps"] == 2
    card = (installed.work / "by_name" / "adapter" / "README.md").read_text()
    assert DSB in card  # the model card, rendered from the wheel's template


def test_evaluate_segment_and_push_from_the_wheel(installed, trained):
    result = installed.run("hf-sam-peft", "evaluate", "--model", "tiny", "--adapter", trained, "--data", DATA,
                           "--max-images", "1", "--n-corrections", "1", "--out", "results.csv", "--no-progress")
    # the adapter records how it was trained (patches): evaluate serves the folder that way
    assert "data layout: the adapter was trained on patches" in result.stdout
    assert (installed.work / "results.csv").read_text().count("\n") >= 2
    assert " AIS" in result.stdout  # the adapter's UNETR decoder was found and scored
    result = installed.run("hf-sam-peft", "segment", "--model", "tiny", "--adapter", trained, "--data", DATA,
                           "--out", "segmented")
    val_images = sorted((SHARED_DATA / DSB / "val" / "images").iterdir())
    for image in val_images:
        stem = image.name.split(".")[0]
        for suffix in ("_ais.tif", "_boxes.tif", "_overlay.png"):
            assert (installed.work / "segmented" / f"{stem}{suffix}").is_file()
    result = installed.run("hf-sam-peft", "push", trained, "someone/sam-lora-nuclei", "--dry-run")
    assert "dry run: would upload" in result.stdout and "adapter_model.safetensors" in result.stdout


def test_export_from_the_wheel(installed, trained):
    """The adapter merged into a segment_anything-layout .pth (the command lives in commands/convert.py)."""
    installed.run("hf-sam-peft", "export", trained, "exported.pth")
    assert (installed.work / "exported.pth").stat().st_size > 1000
    state = torch.load(installed.work / "exported.pth", map_location="cpu", weights_only=True)
    # the adapter carries a UNETR decoder: micro-sam's layout for that, SAM's weights beside the decoder's
    assert set(state) == {"model_state", "decoder_state"}
    assert any(key.startswith("image_encoder.") for key in state["model_state"]) and state["decoder_state"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_of_packaged_recipes(installed):
    """Two CPU processes (DDP over gloo) with the packaged accelerate config and the packaged smoke recipe."""
    config = installed.run("hf-sam-peft", "recipes", "path", "accelerate/cpu_ddp").stdout.strip()
    assert config.startswith(str(installed.site))
    result = installed.run(
        "python", "-m", "accelerate.commands.launch", "--config_file", config, "--main_process_port",
        str(_free_port()), "-m", "hf_sam_peft.train", "smoke_tiny", "--output-dir", "ddp", "--max-steps", "2",
        "--set", "n_sub_iterations=2", "--set", "plot_loss_curve=false", timeout=600,
    )
    assert result.stdout.count("adapter saved to") == 1
    assert (installed.work / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
