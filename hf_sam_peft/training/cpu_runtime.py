"""Deprecated location of the process-wide CPU settings: they are :mod:`hf_sam_peft.speed.cpu_runtime` now."""

from __future__ import annotations

from hf_sam_peft.deprecation import moved_names

__getattr__ = moved_names(__name__, {
    name: f"hf_sam_peft.speed.cpu_runtime.{name}" for name in ("flush_denormals", "retain_freed_memory")})
