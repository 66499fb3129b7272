import re
from pathlib import Path

from setuptools import find_packages, setup

# one version: hf_sam_peft.__version__ (what `hf-sam-peft --version` prints)
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("hf_sam_peft").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="hf-sam-peft",
    version=VERSION,
    description="Parameter-efficient fine-tuning of Segment Anything (SAM) with transformers + peft",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # model_cards/ (top level in the repo) ships inside the package as hf_sam_peft/model_cards
    packages=find_packages(include=["hf_sam_peft", "hf_sam_peft.*"]) + ["hf_sam_peft.model_cards"],
    package_dir={"hf_sam_peft.model_cards": "model_cards"},
    include_package_data=True,
    # recipes/ (training, datasets/, studies/, accelerate/) is package data: found the same way from a wheel
    package_data={
        "hf_sam_peft": ["**/*.py", "**/*.md", "**/*.yaml", "recipes/*.yaml", "recipes/*/*.yaml"],
        "hf_sam_peft.model_cards": ["*.md"],
    },
    install_requires=[
        # tested: torch 2.6.0 / 2.11.0 / 2.13.0, transformers 5.20.0 / 5.24.0 (transformers 5 needs torch 2.6;
        # SubConfigSpec, which LiteMedSAM's config uses, is from transformers 5.20)
        "torch>=2.6,<2.15",
        "transformers>=5.20,<6",
        "peft>=0.21,<0.22",  # our tuners use peft internals checked against 0.21
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "safetensors>=0.4",
        "scikit-image>=0.22",
        "scipy>=1.10",
        "tifffile>=2023.1",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "huggingface_hub>=0.30",
        "pillow>=9.0",
    ],
    extras_require={
        "quant": ["bitsandbytes>=0.45"],
        "app": ["gradio>=5"],
        # NIfTI (.nii / .nii.gz) images and labels, e.g. the medical volumes MOTUM and Mice TumSeg; imported lazily
        "nifti": ["nibabel>=5"],
        # segment-anything (the original SAM code) is the converter's reference in tests; playwright drives
        # Debian's chromium in the app's browser test (no browser download); hydra-core and iopath are what the
        # SAM 2 reference (`sam2`, installed with --no-deps: its torchvision pin would pull another torch) imports,
        # setuptools is what building its sdist without isolation needs, and builds our wheel in
        # tests/test_wheel_install.py (70.1: bdist_wheel without the `wheel` package)
        "test": [
            "pytest>=7", "pytest-timeout>=2", "bitsandbytes>=0.45", "segment-anything>=1.0", "gradio>=5",
            "playwright>=1.40", "hydra-core>=1.3", "iopath>=0.1.10", "setuptools>=70.1", "nibabel>=5",
        ],
    },
    entry_points={"console_scripts": ["hf-sam-peft=hf_sam_peft.cli:main"]},
)
