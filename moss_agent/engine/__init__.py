"""Where torch meets asyncio: device threads that batch many sessions or requests on one device.

- ``RealtimeEngine``: MOSS-TTS-Realtime conversations in fixed slots, one batched forward per tick.
- ``BatchEngine``: MOSS-TTS / TTSD / VoiceGenerator / SoundEffect requests to audio.
- ``ModelRegistry``: loads each component once, so every engine in a process shares one codec.
"""

from __future__ import annotations

from moss_agent._lazy import lazy_exports

_EXPORTS = {
    "RealtimeEngine": "realtime",
    "RealtimeEngineConfig": "realtime",
    "BatchEngine": "batch",
    "AudioResult": "batch",
    "Waveform": "batch",
    "ModelRegistry": "registry",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
