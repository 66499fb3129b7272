"""Two compute forms of one training step compared on a tiny SAM whose masks are decisive, given the same
correction prompts.

Why decisive: a random tiny SAM initialised as transformers does (std 0.02) outputs mask logits of std ~3e-5,
so every pixel sits on the threshold, the three multimask outputs tie in Dice to ~1e-5 and the min over them
(µSAM's multimask loss) is picked by float32 rounding. :func:`decisive_tiny_sam_config` initialises with std 0.3
instead: logits of std ~1-2 and masks that differ, as a real SAM's do.

Why the same corrections: the next round's prompts are sampled uniformly from the pixels a binarised mask gets wrong
(``prompts.correction_points``). Two compute forms of the same step (row loops vs batched, another memory
layout) round differently in float32; a logit within ~1e-7 of 0 then lands on the other side, the error region
gains or loses one pixel, and the same generator draw picks a neighbouring pixel: a new prompt, a different
graph, and 5-16% different gradients (measured on the tiny SAM, AMD EPYC, 1 thread: a negative point at x 64 vs
65). Which pixel sits that close to 0 depends on the CPU and thread count, so a test that compares forms must
give both the same prompts, as the first run drew them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from transformers import SamConfig

from hf_sam_peft.modeling.sam import tiny_sam_config
from hf_sam_peft.training import interactive

DECISIVE_INIT_STD = 0.3


def decisive_tiny_sam_config(**kwargs) -> SamConfig:
    """:func:`tiny_sam_config` with weights drawn at std 0.3, whose masks are far from the threshold."""
    config = tiny_sam_config(**kwargs)
    config.initializer_range = DECISIVE_INIT_STD
    return config


class CorrectionReplay:
    """``with replay.record(): run()`` keeps every round's corrections; ``with replay.replay(): run()`` hands
    them back in the same order (the generator is still drawn as in a normal step, so later draws match)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self._drawn: list[tuple] = []
        self.replayed = 0

    @contextmanager
    def record(self) -> Iterator[None]:
        self._drawn.clear()
        original = interactive.next_round_inputs

        def recording(*args, **kwargs):
            out = original(*args, **kwargs)
            self._drawn.append(out)
            return out

        with self._monkeypatch.context() as patch:
            patch.setattr(interactive, "next_round_inputs", recording)
            yield

    @contextmanager
    def replay(self) -> Iterator[None]:
        original = interactive.next_round_inputs
        queue = iter(list(self._drawn))
        self.replayed = 0

        def replaying(*args, **kwargs):
            original(*args, **kwargs)  # draws from the generator as the recorded run did
            self.replayed += 1
            return next(queue)

        with self._monkeypatch.context() as patch:
            patch.setattr(interactive, "next_round_inputs", replaying)
            yield
        assert self.replayed == len(self._drawn), "the replayed step ran fewer rounds than the recorded one"


def _component(name: str) -> str:
    return next((part for part in ("vision_encoder", "prompt_encoder", "mask_decoder") if part in name), "other")


def assert_gradients_close(grads: dict[str, torch.Tensor], ref_grads: dict[str, torch.Tensor], rtol: float) -> None:
    """Every gradient within ``rtol`` of the reference's, against a meaningful scale.

    Float32 rounding in a gradient scales with the terms summed into it, not with the result: a parameter whose
    gradient nearly cancels (k-projection biases: exactly 0 in exact arithmetic, ~1e-18 here; others ~1e-8)
    carries the rounding of its whole component. So the tolerance is relative to the tensor's own max |g| plus
    a 10x smaller part relative to the largest gradient of its component (encoder, prompt encoder, mask
    decoder), never to a fixed floor.
    """
    assert ref_grads and set(grads) == set(ref_grads)
    group_scale: dict[str, float] = {}
    for name, ref in ref_grads.items():
        group = _component(name)
        group_scale[group] = max(group_scale.get(group, 0.0), ref.abs().max().item())
    for name, ref in ref_grads.items():
        tolerance = rtol * (10 * ref.abs().max().item() + group_scale[_component(name)])
        assert (grads[name] - ref).abs().max().item() <= tolerance, (name, tolerance)
