"""Names that moved: they stay importable from their old module for a while, with a ``DeprecationWarning`` that
names the successor, so no public name disappears without saying where it went."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn_moved(module: str, name: str, successor: str, stacklevel: int = 3) -> None:
    """Warn that ``module.name`` is deprecated in favour of ``successor`` (a dotted path or a short usage).

    ``stacklevel`` 3 points the warning at the caller of the deprecated function that calls this."""
    warnings.warn(f"{module}.{name} is deprecated: use {successor}", DeprecationWarning, stacklevel=stacklevel)


def moved_names(module: str, moves: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module``: each name in ``moves`` resolves to its new dotted path
    (``"package.module.attribute"``) with a ``DeprecationWarning``; any other name is an ``AttributeError``.

    The successor is imported on first access, so the old module need not import the new one (no cycle).
    """

    def __getattr__(name: str) -> Any:
        if name not in moves:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = moves[name]
        owner, _, attribute = target.rpartition(".")
        # stacklevel 3 (warn_moved, this function, the caller): the line that imported or read the name;
        # ``from m import x`` calls a module's __getattr__ straight from the importing frame
        warn_moved(module, name, target, stacklevel=3)
        return getattr(importlib.import_module(owner), attribute)

    return __getattr__
