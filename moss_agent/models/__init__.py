"""Pure PyTorch model code (never imports asyncio). Loaders are imported lazily: torch is heavy."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_codec": "moss_agent.models.codec",
    "load_realtime": "moss_agent.models.realtime",
    "load_tts": "moss_agent.models.tts_loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
