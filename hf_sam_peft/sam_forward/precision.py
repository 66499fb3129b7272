"""Which reduced precision a device runs natively: the one place training and inference ask.

``hf_sam_peft.training.efficiency.resolve_autocast_dtype("auto", ...)`` and inference
(:mod:`hf_sam_peft.evaluation.fast_decoder`) both want "bf16 where the hardware has it, else nothing".
Evaluation may not import ``hf_sam_peft.training`` (``tests/test_import_graph.py``), so the test lives here,
beneath both.
"""

from __future__ import annotations

import torch

__all__ = ["native_autocast_dtype"]


def native_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """``torch.bfloat16`` where ``device`` computes it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX
    as oneDNN reports them), else None: emulated bf16 on a CPU is slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else None
    return None
