"""Lazy import of optional extras with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from moss_agent.errors import MissingExtraError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise MissingExtraError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra) from exc
