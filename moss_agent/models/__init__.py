"""Pure PyTorch model code (never imports asyncio). Loaders are imported lazily: torch is heavy."""

from __future__ import annotations

from moss_agent._lazy import lazy_exports

_EXPORTS = {
    "load_codec": "moss_agent.models.codec",
    "load_realtime": "moss_agent.models.realtime",
    "load_tts": "moss_agent.models.tts_loading",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
