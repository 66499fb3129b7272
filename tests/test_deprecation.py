"""Names that moved stay importable from their old modules, with a DeprecationWarning naming the successor."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import hf_sam_peft.speed as speed
import hf_sam_peft.speed.cpu_runtime as cpu_runtime
from hf_sam_peft.deprecation import moved_names
from hf_sam_peft.training import efficiency, interactive


def test_every_old_speed_name_is_its_successor_with_a_warning():
    assert efficiency._MOVED  # the table this test walks
    for name, target in efficiency._MOVED.items():
        owner, _, attribute = target.rpartition(".")
        with pytest.warns(DeprecationWarning, match=rf"hf_sam_peft\.training\.efficiency\.{name} is deprecated: use {target}"):
            value = getattr(efficiency, name)
        assert value is getattr(importlib.import_module(owner), attribute), name
    # what the old module's __all__ offered is all there
    assert {"EfficiencyOptions", "prepare_model", "EmbeddingCache", "options_from_arguments"} <= set(efficiency._MOVED)


def test_from_import_of_a_moved_name_warns_at_the_importing_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from hf_sam_peft.training.efficiency import EfficiencyOptions  # noqa: F401
    assert EfficiencyOptions is speed.EfficiencyOptions
    (warning,) = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert warning.filename == __file__  # the user's line, not the shim's


def test_old_cpu_runtime_and_round_helper_paths():
    import hf_sam_peft.training.cpu_runtime as old_runtime

    with pytest.warns(DeprecationWarning, match="hf_sam_peft.speed.cpu_runtime.flush_denormals"):
        assert old_runtime.flush_denormals is cpu_runtime.flush_denormals
    with pytest.warns(DeprecationWarning, match="hf_sam_peft.speed.rounds.accumulate_gradients"):
        assert interactive.accumulate_gradients is speed.accumulate_gradients
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        efficiency.not_a_name  # noqa: B018


def test_deprecated_round_loss_functions_still_compute_the_rounds():
    from hf_sam_peft.sam_forward.forward import encode_images
    from hf_sam_peft.sam_forward.kinds import frame_of
    from hf_sam_peft.sam_forward.seeding import prompt_generator
    from hf_sam_peft.training.interactive import POINT_MODE, batch_objects, initial_prompts
    from tests.training.test_efficiency import disc_batch, tiny_model

    model = tiny_model("lora", decisive=True)
    batch = disc_batch(batch=1)
    results = {}
    for name in ("checkpointed_round_losses", "backward_round_losses", None):
        generator = prompt_generator(0, 0, 0)
        _, targets, frames = batch_objects(batch, 2, generator, frame_of(model))
        embeddings = encode_images(model, batch["pixel_values"])
        prompts = initial_prompts(targets, frames, POINT_MODE, 0.0, generator)
        kwargs = dict(n_rounds=2, multimask_first=True, generator=generator)
        if name is None:
            rounds = list(interactive.interactive_rounds(model, embeddings, targets, frames, prompts, loss=True, **kwargs))
            results[name] = [r.dice.item() for r in rounds]
            continue
        with pytest.warns(DeprecationWarning, match=f"{name} is deprecated: use interactive_rounds"):
            out = getattr(interactive, name)(model, embeddings, targets, frames, prompts, **kwargs)
        results[name] = [d.item() for d in out[0]]
        if name == "backward_round_losses":
            assert out[2].requires_grad  # the surrogate carries the rounds' gradients
    assert results["checkpointed_round_losses"] == pytest.approx(results[None], rel=1e-5)
    assert results["backward_round_losses"] == pytest.approx(results[None], rel=1e-5)


def test_moved_names_resolves_lazily_and_only_listed_names():
    getter = moved_names("old.place", {"tensor": "torch.tensor"})
    with pytest.warns(DeprecationWarning, match="old.place.tensor is deprecated: use torch.tensor"):
        assert getter("tensor") is torch.tensor
    with pytest.raises(AttributeError, match="module 'old.place' has no attribute 'other'"):
        getter("other")
