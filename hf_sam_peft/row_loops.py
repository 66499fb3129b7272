"""Where a Python loop over rows beats one batched kernel: on a CPU, not on a GPU. One rule for the package.

Some hot reductions are written as a loop over objects / masks / rows (``prompts._row_counts``,
``training.losses._SigmoidDiceSums``): on a CPU each row's full-resolution map is then read while it sits in
cache (memory bandwidth, not arithmetic, bounds these sums) and no wide temporary is made. On a GPU the same
loops dispatch a handful of ops per row, ~23,000 in all per training step of 2 images x 25 objects x 8 rounds
(``benchmarks/host_syncs.py``: 43,925 -> 20,765 ops), each costing host time, where one batched kernel does the
same work. Both forms compute the same sums; the batched one may add in another order (float rounding only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# None: decide by device; True / False only inside force_row_by_row
_forced: bool | None = None


def row_by_row(tensor: torch.Tensor) -> bool:
    """Whether to loop over rows for ``tensor``: on a CPU, unless :func:`force_row_by_row` says otherwise."""
    return tensor.device.type == "cpu" if _forced is None else _forced


@contextmanager
def force_row_by_row(enabled: bool | None) -> Iterator[None]:
    """Within the block, take (True) or skip (False) the row loops on every device (None: by device).

    For tests of both forms, and for counting a GPU step's operations on a CPU (``benchmarks/host_syncs.py``).
    Process-wide, not thread-local.
    """
    global _forced
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    # restore the outer value on exit, so the blocks nest
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous
