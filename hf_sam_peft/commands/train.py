"""`hf-sam-peft train`: defined beside the training entry point it shares with accelerate launch."""

from ..train import register

__all__ = ["register"]
