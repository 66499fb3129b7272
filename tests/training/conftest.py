"""Fixtures for the training tests."""

from __future__ import annotations

import pytest

from tests.training.corrections import CorrectionReplay


@pytest.fixture
def corrections(monkeypatch) -> CorrectionReplay:
    """Record one step's correction prompts and replay them in another (why: ``corrections.py``)."""
    return CorrectionReplay(monkeypatch)
