"""The bf16 choice: native capability, AMX, a one-off GEMM timing elsewhere, and the environment override."""

from __future__ import annotations

import math

import pytest
import torch

from hf_sam_peft.sam_forward import precision
from hf_sam_peft.speed import resolve_autocast_dtype


@pytest.fixture
def bf16_capable_cpu(monkeypatch):
    """A CPU that oneDNN reports bf16-capable, whatever this machine is; no override in the environment."""
    monkeypatch.setattr(precision, "native_autocast_dtype", lambda device: torch.bfloat16)
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    precision._bf16_pays_off.cache_clear()  # each test measures (its stand-in) afresh
    yield
    precision._bf16_pays_off.cache_clear()


def test_amx_keeps_bf16_without_timing(bf16_capable_cpu, monkeypatch):
    monkeypatch.setattr(precision, "_has_amx", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("AMX needs no measurement"))
    assert precision.fast_autocast_dtype("cpu") is torch.bfloat16


@pytest.mark.parametrize("speedup, expected", [(3.0, torch.bfloat16), (1.25, torch.bfloat16), (1.1, None), (0.7, None)])
def test_without_amx_the_measurement_decides(bf16_capable_cpu, monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "_has_amx", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    assert precision.fast_autocast_dtype("cpu") is expected
    assert resolve_autocast_dtype("auto", "cpu") is expected  # training's "auto" asks the same question
    assert resolve_autocast_dtype("bf16", "cpu") is torch.bfloat16  # an explicit dtype is never second-guessed
    assert resolve_autocast_dtype(None, "cpu") is None


def test_the_choice_is_measured_once_per_process(bf16_capable_cpu, monkeypatch):
    """Training asks at every step: the timing (and its log line) happens at the first call only."""
    calls = []
    monkeypatch.setattr(precision, "_has_amx", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: calls.append(1) or 2.0)
    for _ in range(5):
        assert precision.fast_autocast_dtype("cpu") is torch.bfloat16
    assert len(calls) == 1


def test_environment_overrides_the_measurement(bf16_capable_cpu, monkeypatch):
    monkeypatch.setattr(precision, "_has_amx", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("the override skips the timing"))
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert precision.fast_autocast_dtype("cpu") is torch.bfloat16
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    assert precision.fast_autocast_dtype("cpu") is None
    monkeypatch.setenv(precision.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="HF_SAM_PEFT_CPU_BF16 must be 0 or 1"):
        precision.fast_autocast_dtype("cpu")


def test_no_native_bf16_means_float32_whatever_the_override(monkeypatch):
    monkeypatch.setattr(precision, "native_autocast_dtype", lambda device: None)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert precision.fast_autocast_dtype("cpu") is None


def test_amx_is_capped_away_by_onednn(monkeypatch):
    flags = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    monkeypatch.setattr("builtins.open", lambda *a, **k: __import__("io").StringIO(flags))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    precision._cpu_flags.cache_clear()  # read the stand-in /proc/cpuinfo, and forget it afterwards
    try:
        assert precision._has_amx()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        assert not precision._has_amx()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
        assert precision._has_amx()
    finally:
        precision._cpu_flags.cache_clear()


def test_the_measurement_is_a_real_ratio_and_cached():
    if precision.native_autocast_dtype("cpu") is None:
        pytest.skip("this CPU has no native bf16 (oneDNN): nothing to time")
    first = precision.cpu_bf16_speedup(1)
    assert math.isfinite(first) and first > 0
    assert precision.cpu_bf16_speedup(1) == first  # once per process
    assert torch.get_num_threads() == 1  # the conftest's setting is restored
