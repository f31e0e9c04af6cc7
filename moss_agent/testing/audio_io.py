"""In-memory AudioInput / AudioOutput for tests: a pushable microphone and a clock-paced speaker.

``FakeAudioOutput`` plays in 20 ms slices on its clock (a ``ScaledClock`` makes a minute of
audio play in a few seconds), keeps exactly what was played per turn, and implements the
``AudioOutput`` protocol (write waits while ``buffer_s`` is queued; clear drops unplayed audio).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import numpy as np

from moss_agent.errors import AudioError
from moss_agent.events import AudioChunk, FloatArray
from moss_agent.streaming.channels import Channel
from moss_agent.streaming.clock import Clock, MonotonicClock
from moss_agent.transports.base import PlaybackCallback


class FakeAudioInput:
    """A microphone fed by the test: ``await push(pcm)`` splits it into ``chunk_s`` chunks.

    With ``clock`` set, chunks are released at real-time pace on that clock, like a sound card.
    """

    def __init__(
        self, sample_rate: int = 16000, *, chunk_s: float = 0.02, clock: Clock | None = None, maxsize: int = 1000
    ) -> None:
        self.sample_rate = sample_rate
        self.chunk = round(chunk_s * sample_rate)
        self.clock = clock
        self._queue: Channel[AudioChunk] = Channel(maxsize, "block", name="fake-mic")
        self.pushed_s = 0.0

    async def push(self, pcm: FloatArray) -> None:
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        for start in range(0, len(samples), self.chunk):
            await self._queue.put(AudioChunk(samples[start : start + self.chunk], self.sample_rate))
        self.pushed_s += len(samples) / self.sample_rate

    async def push_silence(self, seconds: float) -> None:
        await self.push(np.zeros(round(seconds * self.sample_rate), dtype=np.float32))

    def close(self) -> None:
        self._queue.close()

    async def __aiter__(self) -> AsyncIterator[AudioChunk]:
        async for chunk in self._queue:
            if self.clock is not None:
                await self.clock.sleep(chunk.duration_s)
            yield chunk



class FakeAudioOutput:
    """A speaker that plays on ``clock`` and remembers what it played, per turn id."""

    SLICE_S = 0.02

    def __init__(self, sample_rate: int = 24000, *, clock: Clock | None = None, buffer_s: float = 0.24) -> None:
        self.sample_rate = sample_rate
        self.clock = clock or MonotonicClock()
        self.buffer_s = buffer_s
        self.cleared = 0
        self._queue: deque[tuple[int, FloatArray]] = deque()
        self._queued_samples = 0
        self._played: dict[int, list[FloatArray]] = {}
        self._played_samples: dict[int, int] = {}
        self._callbacks: list[PlaybackCallback] = []
        self._changed = asyncio.Event()
        self._player: asyncio.Task[None] | None = None
        self._busy = False
        self._closed = False

    # AudioOutput protocol ------------------------------------------------------------------
    async def write(self, chunk: AudioChunk) -> None:
        if chunk.sample_rate != self.sample_rate:
            raise AudioError(f"chunk at {chunk.sample_rate} Hz written to a {self.sample_rate} Hz output")
        if self._closed:
            raise AudioError("write to a closed FakeAudioOutput")
        if self._player is None:
            self._player = asyncio.create_task(self._play(), name="fake-speaker")
        limit = round(self.buffer_s * self.sample_rate)
        while self._queued_samples >= limit and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        self._queue.append((chunk.turn_id, np.asarray(chunk.pcm, dtype=np.float32)))
        self._queued_samples += len(chunk.pcm)
        self._changed.set()

    async def flush(self) -> None:
        while (self._queue or self._busy) and not self._closed:
            self._changed.clear()
            await self._changed.wait()

    def clear(self) -> None:
        self._queue.clear()
        self._queued_samples = 0
        self.cleared += 1
        self._changed.set()

    def played_s(self, turn_id: int) -> float:
        return self._played_samples.get(turn_id, 0) / self.sample_rate

    def on_progress(self, callback: PlaybackCallback) -> None:
        self._callbacks.append(callback)

    # test helpers ---------------------------------------------------------------------------
    def played_audio(self, turn_id: int | None = None) -> FloatArray:
        """What left the speaker: for one turn, or everything in order of turn id."""
        keys = [turn_id] if turn_id is not None else sorted(self._played)
        parts = [p for k in keys for p in self._played.get(k, [])]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    @property
    def played_turns(self) -> list[int]:
        return sorted(self._played)

    async def aclose(self) -> None:
        self._closed = True
        self.clear()
        if self._player is not None:
            self._player.cancel()
            # wait() never re-raises the player's cancellation, so a cancellation of the caller still propagates
            await asyncio.wait([self._player])
            self._player = None

    async def _play(self) -> None:
        step = round(self.SLICE_S * self.sample_rate)
        while True:
            while not self._queue:
                self._busy = False
                self._changed.set()
                self._changed.clear()
                await self._changed.wait()
            self._busy = True
            turn_id, pcm = self._queue[0]
            piece = pcm[:step]
            if len(piece) == len(pcm):
                self._queue.popleft()
            else:
                self._queue[0] = (turn_id, pcm[step:])
            self._queued_samples -= len(piece)
            self._changed.set()
            await self.clock.sleep(len(piece) / self.sample_rate)
            self._played.setdefault(turn_id, []).append(piece)
            self._played_samples[turn_id] = self._played_samples.get(turn_id, 0) + len(piece)
            for callback in self._callbacks:
                callback(turn_id, self.played_s(turn_id))
