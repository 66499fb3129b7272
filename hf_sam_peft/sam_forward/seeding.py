"""The seeded prompt generator: every random prompt comes from one explicit ``torch.Generator``.

Training, validation and evaluation draw prompts from :func:`prompt_generator` instead of the global
NumPy / Python RNGs, so a resumed run replays the same prompts and an evaluation is reproducible. The
streams keep training and validation prompts apart.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["EVAL_STREAM", "TRAIN_STREAM", "prompt_generator"]

# Streams of the per-step prompt generator (training and validation never share prompts).
TRAIN_STREAM, EVAL_STREAM = 0, 1


def prompt_generator(seed: int, stream: int, index: int, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, stream, index, rank)`` only: the same step always gets the same prompts."""
    # % 2**32: SeedSequence refuses negative entries, so a negative seed is mapped into range (seeds 2^32 apart
    # then coincide)
    state = np.random.SeedSequence([int(seed) % 2**32, int(stream), int(index), int(rank)]).generate_state(2)
    # on the prompts' device: torch's samplers want a generator of the output tensor's device type
    generator = torch.Generator(device=device)
    # two 32-bit words -> one 64-bit seed; int() first: a uint32 numpy scalar shifted by 32 gives 0
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator
