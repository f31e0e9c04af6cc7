"""The user's audio as an AudioInput: a bounded queue the transport feeds from its receive path.

The network or sound-card side calls ``feed(pcm, rate)`` (from the loop, or ``feed_threadsafe``
from a device thread); the consumer iterates ``AudioChunk``s at ``sample_rate``. The receive path
must never block, so when the consumer falls behind the oldest chunks are dropped (and counted):
stale microphone audio is worth less than fresh audio in a live conversation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from moss_agent.audio import StreamResampler, pcm16_to_float
from moss_agent.errors import AudioError, ConfigError
from moss_agent.events import AudioChunk, FloatArray

logger = logging.getLogger(__name__)


class QueueAudioInput:
    """AudioInput fed by a transport; resamples to ``sample_rate``; ends after ``close()``."""

    def __init__(self, sample_rate: int = 24_000, *, max_queue_s: float = 2.0, chunk_s: float = 0.02) -> None:
        if sample_rate <= 0:
            raise ConfigError(f"sample_rate must be positive, got {sample_rate}")
        self.sample_rate = sample_rate
        self._queue: asyncio.Queue[AudioChunk | None] = asyncio.Queue(max(1, round(max_queue_s / chunk_s)))
        self._resampler: StreamResampler | None = None
        self._source_rate: int | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped_chunks = 0
        self.received_s = 0.0
        """Seconds of audio fed so far (at the source rate), for transport statistics."""

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Remember the loop the consumer runs on (needed before ``feed_threadsafe``)."""
        self._loop = loop or asyncio.get_running_loop()

    def feed(self, pcm: FloatArray, sample_rate: int, turn_id: int = -1) -> None:
        """Queue mono float32 ``pcm`` [samples] recorded at ``sample_rate``; never blocks."""
        if self._closed:
            return
        if pcm.ndim != 1:
            raise AudioError(f"input audio must be mono [samples], got shape {pcm.shape}")
        self.received_s += len(pcm) / sample_rate
        if sample_rate != self.sample_rate:
            if self._source_rate != sample_rate:
                self._resampler = StreamResampler(sample_rate, self.sample_rate)
                self._source_rate = sample_rate
            assert self._resampler is not None
            pcm = self._resampler.process(pcm)
        if len(pcm) == 0:
            return
        chunk = AudioChunk(np.asarray(pcm, dtype=np.float32), self.sample_rate, turn_id)
        while True:
            try:
                self._queue.put_nowait(chunk)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()
                self.dropped_chunks += 1
                if self.dropped_chunks == 1 or self.dropped_chunks % 100 == 0:
                    logger.warning("input consumer is behind; dropping old audio", extra={"dropped": self.dropped_chunks})

    def feed_threadsafe(self, pcm: FloatArray, sample_rate: int) -> None:
        """``feed`` from a thread that is not the event loop's (a sound-card callback)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("call bind_loop() on the event loop before feed_threadsafe()")
        if not loop.is_closed():
            loop.call_soon_threadsafe(self.feed, pcm, sample_rate)

    def close(self) -> None:
        """End the stream: the iterator stops after the chunks already queued."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()
                self.dropped_chunks += 1

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[AudioChunk]:
        while True:
            chunk = await self._queue.get()
            if chunk is None:
                # Leave the sentinel for any other reader of the same input.
                self._queue.put_nowait(None)
                return
            yield chunk


def av_frame_to_mono(frame: Any) -> FloatArray:
    """A decoded PyAV AudioFrame (any sample format and layout) as mono float32 [samples]."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    samples = pcm16_to_float(data) if data.dtype == np.int16 else data.astype(np.float32)
    # Planar frames are [channels, samples]; packed ones [1, samples * channels] interleaved.
    if frame.format.is_planar:
        return np.asarray(samples.reshape(channels, -1).mean(axis=0), dtype=np.float32)
    return np.asarray(samples.reshape(-1, channels).mean(axis=1), dtype=np.float32)
