"""The two protocols every transport implements.

The transport owns the real-time clock: it pulls or pushes audio at its own pace (20 ms frames for
WebRTC, the sound card's callback for local audio); the model loop never sleeps to pace output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol, runtime_checkable

from moss_agent.events import AudioChunk


@runtime_checkable
class AudioInput(Protocol):
    """The user's audio as an async iterator of mono float32 chunks at ``sample_rate``."""

    sample_rate: int

    def __aiter__(self) -> AsyncIterator[AudioChunk]: ...


PlaybackCallback = Callable[[int, float], None]
"""Called with (turn_id, seconds of that turn played so far) as audio leaves the speaker."""


@runtime_checkable
class AudioOutput(Protocol):
    """Where agent audio goes. ``write`` may wait when the device buffer is full (audio is paced by the sink)."""

    sample_rate: int

    async def write(self, chunk: AudioChunk) -> None: ...

    async def flush(self) -> None:
        """Wait until everything written has been played."""

    def clear(self) -> None:
        """Drop everything not yet played (barge-in); never waits."""

    def played_s(self, turn_id: int) -> float:
        """Seconds of ``turn_id`` that have actually been played."""

    def on_progress(self, callback: PlaybackCallback) -> None: ...
