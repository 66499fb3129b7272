"""Process-wide CPU settings: denormals flushed on every OpenMP thread, glibc's thresholds set and validated."""

from __future__ import annotations

import platform

import pytest
import torch

from hf_sam_peft.speed.cpu_runtime import flush_denormals, retain_freed_memory


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    flush_denormals(False)  # earlier tests' prepare_model calls may have turned it on for the process
    yield
    flush_denormals(False)
    torch.set_num_threads(before)


def test_flush_denormals_reaches_every_thread_and_reverts(two_threads):
    denormal = torch.full((2**22,), 1e-39)  # large enough that both threads take a share of the multiply
    assert (denormal * 1.0).count_nonzero() == denormal.numel()
    if not flush_denormals():
        pytest.skip("this CPU/runtime cannot flush denormals on all threads (no SSE3 or no OpenMP runtime found)")
    assert (denormal * 1.0).count_nonzero() == 0  # a thread without the flag would leave its share nonzero
    assert torch.equal(torch.full((8,), 1e-30) * 1.0, torch.full((8,), 1e-30))  # normal floats untouched
    assert flush_denormals(False)
    assert (denormal * 1.0).count_nonzero() == denormal.numel()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_retain_freed_memory_applies_on_glibc():
    assert retain_freed_memory() is True


def test_retain_freed_memory_validates_thresholds():
    with pytest.raises(ValueError, match="mmap_threshold"):
        retain_freed_memory(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold"):
        retain_freed_memory(trim_threshold=2**31)
