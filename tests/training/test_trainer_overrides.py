"""The private / undocumented ``transformers.Trainer`` parts our trainer relies on are still there, unchanged.

``TRAINER_INTERNALS`` (hf_sam_peft/training/trainer.py) records each one with its parameters as read in the
transformers versions it names. A transformers upgrade that renames, re-signs or stops calling one of them
would otherwise make an override dead code (never called) or a call fail deep inside a training run.
"""

from __future__ import annotations

import inspect
import re

import pytest
import transformers
from transformers import Trainer, trainer_utils

from hf_sam_peft.training.trainer import TRAINER_INTERNALS, SamInteractiveTrainer, TrainerInternal


def parameters_of(function) -> str:
    """A signature without annotations: names, kinds and defaults only (annotations change for cosmetic reasons)."""
    signature = inspect.signature(function)
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def found(entry: TrainerInternal):
    """The object the entry names in the installed transformers, or None."""
    if entry.name.startswith("trainer_utils."):
        return getattr(trainer_utils, entry.name.split(".", 1)[1], None)
    return getattr(Trainer, entry.name, None)


def where(entry: TrainerInternal) -> str:
    return f"transformers {transformers.__version__} (the table in hf_sam_peft/training/trainer.py was checked " \
           f"against {', '.join(entry.checked)})"


CALLABLE = [e for e in TRAINER_INTERNALS if e.use in ("override", "call")]


def test_the_table_lists_every_private_trainer_method_we_override():
    """Nothing private is overridden without a row: every underscore name our class defines that the Trainer also
    has is in the table, and every overriding row names a method our class really defines."""
    ours = {name for name in vars(SamInteractiveTrainer) if name.startswith("_") and not name.startswith("__")}
    shadowed = {name for name in ours if hasattr(Trainer, name)}
    listed = {e.name for e in TRAINER_INTERNALS if e.use == "override"}
    assert shadowed == listed, (
        f"private Trainer methods overridden but not in TRAINER_INTERNALS: {sorted(shadowed - listed)}; "
        f"listed as overridden but not defined by SamInteractiveTrainer: {sorted(listed - shadowed)}"
    )
    assert all(e.checked and e.why and e.seen_in for e in TRAINER_INTERNALS)


def test_our_own_private_names_do_not_collide_with_the_trainers():
    """Our private attributes (``self._x = ...``) are not ones the Trainer sets: a name transformers later adds
    would silently swap state between the two."""
    ours = set(re.findall(r"self\.(_[a-z]\w*)\s*(?::[^=\n]+)?=", inspect.getsource(SamInteractiveTrainer)))
    theirs = set(re.findall(r"self\.(_[a-z]\w*)", inspect.getsource(Trainer)))
    clash = (ours & theirs) - {e.name for e in TRAINER_INTERNALS}
    assert not clash, f"SamInteractiveTrainer sets private attributes transformers.Trainer also uses: {sorted(clash)}"


@pytest.mark.parametrize("entry", CALLABLE, ids=[e.name for e in CALLABLE])
def test_private_trainer_methods_keep_their_signature(entry):
    target = found(entry)
    assert target is not None, f"{entry.name} ({entry.use}) is gone from {where(entry)}; it is used for: {entry.why}"
    actual = parameters_of(target)
    assert actual == entry.parameters, (
        f"{entry.name} changed its parameters: {actual} in {where(entry)}, {entry.parameters} recorded; "
        f"re-read transformers/trainer.py and update the {entry.use} and its table row"
    )
    if entry.use == "override":
        override = parameters_of(getattr(SamInteractiveTrainer, entry.name))
        assert override == entry.parameters, f"our {entry.name}{override} differs from the recorded {entry.parameters}"


@pytest.mark.parametrize("entry", TRAINER_INTERNALS, ids=[e.name for e in TRAINER_INTERNALS])
def test_the_trainer_still_uses_what_we_override(entry):
    """An override that the Trainer no longer calls is dead code; a recorded call site shows that it is not."""
    caller = getattr(Trainer, entry.seen_in, None)
    assert caller is not None, f"Trainer.{entry.seen_in} (where {entry.name} is used) is gone from {where(entry)}"
    name = entry.name.split(".")[-1]
    pattern = {"override": rf"self\.{name}\(", "call": rf"\b{name}\(", "attribute": rf"self\.{name}\b",
               "constant": rf"\b{name}\b"}[entry.use]
    assert re.search(pattern, inspect.getsource(caller)), (
        f"Trainer.{entry.seen_in} no longer uses {entry.name} in {where(entry)}: our {entry.use} of it ({entry.why}) "
        "would have no effect"
    )


def test_recorded_constants_keep_their_value():
    for entry in (e for e in TRAINER_INTERNALS if e.use == "constant"):
        assert repr(found(entry)) == entry.parameters, f"{entry.name} is {found(entry)!r} in {where(entry)}"


def test_a_changed_signature_fails_with_a_message_naming_it(monkeypatch):
    """The check above can fail: a Trainer whose ``_determine_best_metric`` grew a parameter is reported."""
    entry = next(e for e in TRAINER_INTERNALS if e.name == "_determine_best_metric")

    def changed(self, metrics, trial, extra=None):  # what an upgrade could look like
        return False

    monkeypatch.setattr(Trainer, "_determine_best_metric", changed)
    with pytest.raises(AssertionError, match=r"_determine_best_metric changed its parameters: \(self, metrics, trial, extra=None\)"):
        test_private_trainer_methods_keep_their_signature(entry)
    monkeypatch.delattr(Trainer, "_determine_best_metric")
    with pytest.raises(AssertionError, match=r"_determine_best_metric \(override\) is gone from transformers"):
        test_private_trainer_methods_keep_their_signature(entry)
