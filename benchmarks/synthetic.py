"""The synthetic batch both benchmarks train on (numpy only: it also runs in the micro-sam venv)."""

from __future__ import annotations

import numpy as np


def synthetic_rows(batch: int, size: int, n_objects: int, seed: int = 0) -> list[dict]:
    """Grey images with `n_objects` bright discs each, and their instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for _ in range(batch):
        labels = np.zeros((size, size), np.int32)
        radius = max(3, size // (4 * int(np.ceil(np.sqrt(n_objects)))))
        for i in range(n_objects):
            cy, cx = rng.integers(radius, size - radius, 2)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i + 1
        image = (labels > 0).astype(np.float32) * 0.7 + rng.normal(0.2, 0.05, (size, size)).astype(np.float32)
        rows.append({"image": image[..., None], "labels": labels})
    return rows
