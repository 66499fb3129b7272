"""The speed options are declared once (``EfficiencyOptions``) and reach the trainer's arguments, the command
line (``--set``, HfArgumentParser) and the options unchanged; presets build and differ as documented."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_sam_peft.sam_forward.forward import unwrap_sam
from hf_sam_peft.speed import (
    PRESETS,
    EfficiencyOptions,
    arguments_class,
    option,
    options_from_arguments,
    prepare_model,
)
from hf_sam_peft.training.trainer import InteractiveTrainingArguments

OPTION_FIELDS = dataclasses.fields(EfficiencyOptions)
# a valid value other than the default, for each option that is not a bool (bools: the other bool)
OTHER_VALUES = {"autocast_dtype": "bf16", "encoder_attention": "eager", "encoder_key_tile": 16,
                "checkpoint_encoder": True, "encoder_mlp_recompute": "activation", "decoder_attention": "sdpa"}
BOOL_OPTIONS = [f.name for f in OPTION_FIELDS if typing.get_type_hints(EfficiencyOptions)[f.name] is bool]


def other_value(f: dataclasses.Field) -> object:
    return not f.default if f.name in BOOL_OPTIONS else OTHER_VALUES[f.name]


def spelt(value: object) -> str:
    """A value as the command line spells it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def arguments(tmp_path, **values) -> InteractiveTrainingArguments:
    return InteractiveTrainingArguments(output_dir=str(tmp_path), report_to=[], **values)


def test_every_option_is_a_training_argument_with_its_default_and_help():
    assert set(OTHER_VALUES) | set(BOOL_OPTIONS) == {f.name for f in OPTION_FIELDS}  # a new option: add a value here
    trainer_fields = {f.name: f for f in dataclasses.fields(InteractiveTrainingArguments)}
    for f in OPTION_FIELDS:
        generated = trainer_fields[f.name]
        assert generated.default == f.default, f.name
        assert generated.metadata["help"] == f.metadata["help"] and f.metadata["help"], f.name
        assert set(generated.metadata) == {"help"}  # HfArgumentParser hands metadata on to argparse
    assert trainer_fields["speed_preset"].default == "default"
    # positional output_dir still first: the speed fields follow TrainingArguments' own
    assert dataclasses.fields(InteractiveTrainingArguments)[0].name == "output_dir"


def test_defaults_are_unchanged(tmp_path):
    assert arguments(tmp_path).efficiency_options() == EfficiencyOptions() == EfficiencyOptions.default()


@pytest.mark.parametrize("name", [f.name for f in OPTION_FIELDS])
def test_each_option_round_trips_through_arguments_set_and_the_parser(name, tmp_path):
    from hf_sam_peft.train import Recipe, add_arguments, apply_overrides, check_training_settings

    f = next(f for f in OPTION_FIELDS if f.name == name)
    value = other_value(f)
    expected = EfficiencyOptions(**{name: value})
    assert expected != EfficiencyOptions()
    # the dataclass
    assert arguments(tmp_path, **{name: value}).efficiency_options() == expected
    # --set name=value on a recipe, as train_model builds the arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    recipe = apply_overrides(Recipe(name="r", dataset="d"), parser.parse_args(["r", "--set", f"{name}={spelt(value)}"]))
    assert recipe.training == {name: value}
    check_training_settings(recipe.training)
    assert arguments(tmp_path, **recipe.training).efficiency_options() == expected
    # HfArgumentParser (transformers' own command line)
    (parsed,) = HfArgumentParser(InteractiveTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", f"--{name}", spelt(value)])
    assert parsed.efficiency_options() == expected


def test_command_line_spellings_of_none(tmp_path):
    for name in ("autocast_dtype", "encoder_attention", "decoder_attention", "encoder_mlp_recompute"):
        for text in ("none", "off", None):
            assert getattr(arguments(tmp_path, **{name: text}).efficiency_options(), name) is None, (name, text)
    assert arguments(tmp_path, encoder_key_tile=0).efficiency_options().encoder_key_tile is None


def test_a_new_option_needs_no_trainer_change():
    """An option added to the options class alone is a training argument, parsed and carried to the options."""

    @dataclasses.dataclass(frozen=True)
    class MoreOptions(EfficiencyOptions):
        skip_nothing: bool = option(True, False, "A new switch (test).")

    @dataclasses.dataclass
    class MoreArguments(arguments_class(MoreOptions), TrainingArguments):
        pass

    assert "skip_nothing" in {f.name for f in dataclasses.fields(MoreArguments)}
    (parsed,) = HfArgumentParser(MoreArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--report_to", "none", "--skip_nothing", "false"])
    assert options_from_arguments(parsed, MoreOptions) == MoreOptions(skip_nothing=False)
    parsed.speed_preset = "plain"
    assert options_from_arguments(parsed, MoreOptions) == MoreOptions.plain()
    assert MoreOptions.plain().skip_nothing is False and MoreOptions.default().skip_nothing is True
    with pytest.raises(TypeError, match="skip_nothing"):  # bool options are checked as bools
        MoreOptions(skip_nothing="yes")


def test_presets_build_and_differ_as_documented():
    default, plain, low = EfficiencyOptions.default(), EfficiencyOptions.plain(), EfficiencyOptions.low_memory()
    assert {name: EfficiencyOptions.preset(name) for name in PRESETS} == {"plain": plain, "default": default,
                                                                           "low_memory": low}
    # plain: every switch off (cache_embeddings is off by default already)
    assert all(getattr(plain, f.name) in (None, False) for f in OPTION_FIELDS)
    assert {f.name for f in OPTION_FIELDS if getattr(plain, f.name) == getattr(default, f.name)} == {"cache_embeddings"}
    # low_memory: the defaults with the memory side of the two documented time-for-memory trades
    assert {f.name for f in OPTION_FIELDS if getattr(low, f.name) != getattr(default, f.name)} == {
        "checkpoint_encoder", "retain_freed_memory"}
    assert low.checkpoint_encoder is True and low.retain_freed_memory is False
    assert EfficiencyOptions.plain(autocast_dtype="bf16").autocast_dtype == "bf16"  # changes win
    with pytest.raises(ValueError, match="speed_preset"):
        EfficiencyOptions.preset("fast")


def test_low_memory_checkpoints_the_trainable_encoder():
    from tests.training.test_efficiency import tiny_model

    sam = unwrap_sam(prepare_model(tiny_model("lora"), EfficiencyOptions.low_memory(flush_denormals=False), "cpu"))
    assert sam.vision_encoder.gradient_checkpointing
    sam = unwrap_sam(prepare_model(tiny_model("lora"), EfficiencyOptions.plain(), "cpu"))
    assert not sam.vision_encoder.gradient_checkpointing


def test_speed_preset_in_the_arguments_and_explicit_options_over_it(tmp_path):
    assert arguments(tmp_path, speed_preset="plain").efficiency_options() == EfficiencyOptions.plain()
    assert arguments(tmp_path, speed_preset="low_memory").efficiency_options() == EfficiencyOptions.low_memory()
    chosen = arguments(tmp_path, speed_preset="plain", encoder_attention="eager", autocast_dtype="bf16")
    assert chosen.efficiency_options() == EfficiencyOptions.plain(encoder_attention="eager", autocast_dtype="bf16")
    chosen = arguments(tmp_path, speed_preset="low_memory", checkpoint_encoder="false")
    assert chosen.efficiency_options() == EfficiencyOptions.low_memory(checkpoint_encoder=False)
    with pytest.raises(ValueError, match="speed_preset must be one of"):
        arguments(tmp_path, speed_preset="fast")


def test_speed_settings_may_change_on_resume():
    from hf_sam_peft.train import changed_settings, speed_settings

    assert speed_settings() == {f.name for f in OPTION_FIELDS} | {"speed_preset"}
    saved = {"training.autocast_dtype": "auto", "training.learning_rate": 1e-5}
    current = {"training.autocast_dtype": None, "training.speed_preset": "low_memory", "training.learning_rate": 1e-4}
    assert changed_settings(saved, current) == [("training.learning_rate", 1e-5, 1e-4)]


def test_options_from_any_object_with_the_attributes():
    """``options_from_arguments`` reads attributes only: a namespace works, ``speed_preset`` defaulting to "default"."""
    values = {f.name: f.default for f in OPTION_FIELDS}
    assert options_from_arguments(argparse.Namespace(**values)) == EfficiencyOptions()
    values["autocast_dtype"] = "off"
    assert options_from_arguments(argparse.Namespace(**values)).autocast_dtype is None
