"""The three round executions (``speed/rounds.py``) on the one round loop: same losses and gradients as keeping
the graphs, the choice made from the options, and what each refuses."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_sam_peft.sam_forward.forward import encode_images
from hf_sam_peft.sam_forward.kinds import frame_of
from hf_sam_peft.sam_forward.seeding import prompt_generator
from hf_sam_peft.speed import EfficiencyOptions, prepare_model
from hf_sam_peft.speed.rounds import (
    BackwardPerRound,
    CheckpointedRounds,
    KeptGraphs,
    accumulate_gradients,
    execution_kind,
    round_execution,
)
from hf_sam_peft.training.interactive import (
    POINT_MODE,
    batch_objects,
    initial_prompts,
    interactive_rounds,
)
from tests.training.corrections import CorrectionReplay, assert_gradients_close
from tests.training.test_efficiency import disc_batch, tiny_model

N_ROUNDS = 3


def test_accumulate_gradients_is_the_plain_sum_with_none_as_zero():
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    a16, b16 = torch.randn(7, generator=gen).bfloat16(), torch.randn(7, generator=gen).bfloat16()
    expanded = torch.randn(1, 3, generator=gen).expand(5, 3)  # autograd can hand out such views
    before = expanded.clone()
    sums = [a32, None, a16, None, expanded]
    grads = [b32, b16, b16, None, a32]
    out = accumulate_gradients(sums, grads)
    assert torch.equal(out[0], a32 + b32) and out[1] is b16 and torch.equal(out[2], a16 + b16)
    assert out[2].dtype == torch.bfloat16 and out[3] is None and torch.equal(out[4], expanded + a32)
    assert torch.equal(expanded, before)  # out of place: nothing it was given changes
    assert accumulate_gradients([], []) == []
    with pytest.raises(ValueError, match="as long"):
        accumulate_gradients([a32], [])


def _rounds_step(model, options: EfficiencyOptions | None):
    """One batch's rounds as the objective runs them: per-round losses (detached), the finished loss and the
    gradients it gives after ``backward``."""
    batch = disc_batch()
    generator = prompt_generator(0, 0, 0)
    _, targets, frames = batch_objects(batch, 3, generator, frame_of(model))
    embeddings = encode_images(model, batch["pixel_values"])
    prompts = initial_prompts(targets, frames, POINT_MODE, 0.0, generator)
    with round_execution(model, embeddings, options, N_ROUNDS) as execution:
        rounds = list(interactive_rounds(
            model, embeddings, targets, frames, prompts, n_rounds=N_ROUNDS, multimask_first=True,
            mask_prob=0.5, generator=generator, loss=True, execution=execution,
        ))
        losses = torch.stack([r.loss for r in rounds])
        loss = execution.finish(losses.mean())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return type(execution), losses.detach(), loss.detach(), grads


@pytest.mark.parametrize("kind, options", [
    (CheckpointedRounds, EfficiencyOptions.plain(checkpoint_rounds=True)),
    (BackwardPerRound, EfficiencyOptions.plain(backward_per_round=True)),
    (BackwardPerRound, EfficiencyOptions.plain(backward_per_round=True, fuse_decoder_projections=True)),
    (KeptGraphs, EfficiencyOptions.plain(fuse_decoder_projections=True)),
])
def test_each_execution_gives_the_kept_graphs_losses_and_gradients(monkeypatch, kind, options):
    """Gradients reach the encoder (LoRA trains there) through every execution, equal to keeping every graph."""
    reference = tiny_model("lora", decisive=True)
    model = prepare_model(copy.deepcopy(reference), options)
    corrections = CorrectionReplay(monkeypatch)
    with corrections.record():
        ref_kind, ref_losses, ref_loss, ref_grads = _rounds_step(reference, None)
    with corrections.replay():
        got_kind, losses, loss, grads = _rounds_step(model, options)
    assert (ref_kind, got_kind) == (KeptGraphs, kind)
    assert torch.allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert any("vision_encoder" in n for n in grads)
    assert_gradients_close(grads, ref_grads, 1e-4)


def test_the_execution_follows_the_options_and_the_grad_and_autocast_modes():
    per_round = EfficiencyOptions.plain(backward_per_round=True, checkpoint_rounds=True)
    assert execution_kind(None) is KeptGraphs
    assert execution_kind(EfficiencyOptions.plain()) is KeptGraphs
    assert execution_kind(per_round) is BackwardPerRound
    assert execution_kind(EfficiencyOptions.plain(checkpoint_rounds=True)) is CheckpointedRounds
    with torch.no_grad():  # validation: nothing to differentiate or recompute
        assert execution_kind(per_round) is KeptGraphs
    # fp16 needs the loop's loss scaling before any backward: checkpoint_rounds' choice instead
    with torch.autocast("cpu", dtype=torch.float16):
        assert execution_kind(per_round) is CheckpointedRounds
        assert execution_kind(EfficiencyOptions.plain(backward_per_round=True)) is KeptGraphs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert execution_kind(per_round) is BackwardPerRound


def test_what_the_executions_refuse():
    model = tiny_model("lora")
    batch = disc_batch(batch=1)
    generator = prompt_generator(0, 0, 0)
    _, targets, frames = batch_objects(batch, 2, generator, frame_of(model))
    embeddings = encode_images(model, batch["pixel_values"])
    prompts = initial_prompts(targets, frames, POINT_MODE, 0.0, generator)
    kwargs = dict(n_rounds=2, multimask_first=True, generator=generator)
    with pytest.raises(ValueError, match="n_rounds must be a positive int"):
        KeptGraphs(model, embeddings, 0)
    with pytest.raises(ValueError, match="shared must be None"):
        CheckpointedRounds(model, embeddings, 2, shared=object())
    with pytest.raises(ValueError, match="needs rounds that compute their loss"):
        list(interactive_rounds(model, embeddings, targets, frames, prompts,
                                execution=BackwardPerRound(model, embeddings, 2), **kwargs))
    other = encode_images(model, batch["pixel_values"])
    with pytest.raises(ValueError, match="execution must be built for the embeddings"):
        list(interactive_rounds(model, embeddings, targets, frames, prompts,
                                execution=KeptGraphs(model, other, 2), **kwargs))
