"""The optimizer's speed choice: torch's fused AdamW where it has one for the device."""

from __future__ import annotations

from typing import Any

import torch


def optimizer_kwargs(device: torch.device | str, fused: bool = True) -> dict[str, Any]:
    """AdamW keyword arguments: the fused kernel where torch has it for ``device`` (CPU and CUDA)."""
    device = torch.device(device)
    return {"fused": True} if fused and device.type in ("cpu", "cuda") else {"foreach": False}
