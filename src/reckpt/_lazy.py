"""Lazy public names for a package: imported on first use, so importing it stays cheap.

``import reckpt`` (and the CLI's ``--help`` and ``ls``) must not pay for importing torch;
every package ``__init__`` therefore lists its public names here instead of importing them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``name`` comes from module ``exports[name]``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the module that defines it.
        submodules: sub-packages reachable as attributes without an explicit import.
    """
    subs = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*exports, *subs})

    return __getattr__, __dir__
