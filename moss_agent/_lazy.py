"""Lazy package exports: names are imported from their modules on first use (torch and the optional
extras are heavy, and some packages must stay importable without them)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each name to the module that holds
    it, either absolute (``moss_agent.x.y``) or a submodule name of ``package``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        path = module if module.startswith("moss_agent.") else f"{package}.{module}"
        return getattr(importlib.import_module(path), name)

    return __getattr__
