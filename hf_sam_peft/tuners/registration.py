"""Registering our tuner types with peft's own registry.

peft's `register_peft_method` only accepts names that exist in its `PeftType` enum. We add our names to that
enum (the least fragile hook: every lookup in peft goes through it or through the mappings that
`register_peft_method` fills), then call `register_peft_method` like peft's own tuners do.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Add `name.upper()` to peft's `PeftType` enum (idempotent) and return the member."""
    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    # built the way Enum builds a member of a `str` mixin enum: a str instance carrying _name_/_value_
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    member.__init__(key)
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13 keeps members through this helper
        PeftType._add_member_(key, member)
    else:
        PeftType._member_map_[key] = member
        # type.__setattr__: EnumType.__setattr__ refuses to (re)assign a name that is in _member_map_
        type.__setattr__(PeftType, key, member)
    # register_peft_method tests `name.upper() in list(PeftType)`, which iterates _member_names_;
    # _value2member_map_ makes `PeftType("FACT")` find the member, as it finds peft's own
    PeftType._member_names_.append(key)
    PeftType._value2member_map_[key] = member
    return member


def register_tuner(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register a tuner under `name` with peft (no-op when this exact tuner is already registered)."""
    peft_type = add_peft_type(name)
    # register_peft_method raises KeyError for a name it already holds, so a second import must stop here
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
