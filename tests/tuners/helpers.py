"""Shared pieces of the tuner tests: a fixed input and the outputs we compare."""

from __future__ import annotations

import torch
from torch import nn

PIXELS = torch.Generator().manual_seed(0)


def example_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(1, 3, 256, 256, generator=g),
        "input_points": torch.tensor([[[[100.0, 120.0], [30.0, 200.0]]]]),
        "input_labels": torch.tensor([[[1, 0]]]),
    }


def base_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embedding, masks, predicted IoU) for the example inputs."""
    inputs = example_inputs()
    embedding = base_of(model).vision_encoder(inputs["pixel_values"]).last_hidden_state
    out = model(**inputs)
    return embedding, out.pred_masks, out.iou_scores


def assert_outputs_close(a, b, atol: float = 1e-6) -> None:
    for x, y, what in zip(a, b, ("image embedding", "masks", "iou")):
        assert torch.allclose(x, y, atol=atol), f"{what} differ by {(x - y).abs().max():.2e}"


def perturb_trainable(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move every trainable tensor away from its init so that round trips are not trivially identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
