"""Shared fixtures: tiny SAM models and the real datasets beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: the suite's models are tiny, and OpenMP threads contending on a 2-core machine made
# such tests 10-20x slower (measured: tests/training/test_efficiency.py 264 s with 2 threads, 16 s with 1).
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def tiny_config():
    from hf_sam_peft.modeling.sam import tiny_sam_config

    return tiny_sam_config()


@pytest.fixture
def tiny_sam(tiny_config):
    from transformers import SamModel

    torch.manual_seed(0)
    return SamModel(tiny_config).eval()


def shared_dataset(name: str) -> Path:
    """Path of a real dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name!r} not found at {path} (../shared/data is absent in this checkout)")
    return path


@pytest.fixture
def decode_calls(monkeypatch):
    """The ``multimask`` every SamPredictor decoder call really used."""
    from hf_sam_peft.evaluation import predictor as predictor_module

    calls: list[bool] = []
    original = predictor_module.decode

    def spy(model, embeddings, prompts, multimask, *args, **kwargs):
        calls.append(bool(multimask))
        return original(model, embeddings, prompts, multimask, *args, **kwargs)

    monkeypatch.setattr(predictor_module, "decode", spy)
    return calls
