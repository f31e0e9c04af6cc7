"""The paced output buffer every transport plays agent audio from.

``PlaybackBuffer`` is an ``AudioOutput``: the session ``write``s chunks (any sample rate, resampled
here to the transport's rate) and the transport's clock ``pull``s fixed-size frames from it: the
sound card callback thread for local audio, aiortc's ``recv()`` for WebRTC, a 20 ms task for MQTT.
The clock, not the model, sets the pace: ``write`` waits while more than ``max_buffer_s`` is queued,
``pull`` plays silence when starved. ``clear()`` drops everything queued and marks every turn
written so far as stale, so late chunks of an interrupted turn are dropped by turn id.

``FramePacer`` is the wall clock for transports without a hardware one (WebRTC, MQTT).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from moss_agent.audio import StreamResampler
from moss_agent.errors import AudioError, ConfigError
from moss_agent.events import AudioChunk, FloatArray
from moss_agent.transports.base import PlaybackCallback

logger = logging.getLogger(__name__)


class PlaybackBuffer:
    """Thread-safe FIFO of agent audio played at ``play_rate``; implements AudioOutput.

    ``sample_rate`` is the rate producers are expected to write (default: ``play_rate``); chunks at
    any rate are accepted and resampled to ``play_rate``, the rate ``pull`` counts samples in.
    ``write``/``flush``/``clear`` run on the event loop; ``pull`` may run on any thread.
    """

    def __init__(self, play_rate: int, *, sample_rate: int | None = None, max_buffer_s: float = 1.0) -> None:
        if play_rate <= 0 or (sample_rate is not None and sample_rate <= 0):
            raise ConfigError(f"sample rates must be positive, got {play_rate} and {sample_rate}")
        if max_buffer_s <= 0:
            raise ConfigError(f"max_buffer_s must be positive, got {max_buffer_s}")
        self.play_rate = play_rate
        self.sample_rate = sample_rate or play_rate
        self._max_samples = int(max_buffer_s * play_rate)
        self._lock = threading.Lock()
        self._segments: collections.deque[tuple[int, FloatArray]] = collections.deque()
        self._queued = 0
        self._played: dict[int, int] = {}
        self._stale: set[int] = set()
        self._seen: set[int] = set()
        self._callbacks: list[PlaybackCallback] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._resampler: StreamResampler | None = None
        self._resampler_key: tuple[int, int] | None = None  # (from_rate, turn_id)
        self._closed = False

    # -- AudioOutput (event loop side) ---------------------------------------------------------------

    async def write(self, chunk: AudioChunk) -> None:
        """Queue ``chunk``; waits while the buffer is full. Chunks of a cleared turn are dropped."""
        self._bind_loop()
        if chunk.turn_id in self._stale or self._closed:
            return
        pcm = np.asarray(chunk.pcm, dtype=np.float32)
        if pcm.ndim != 1:
            raise AudioError(f"AudioChunk.pcm must be mono [samples], got shape {pcm.shape}")
        if not np.all(np.isfinite(pcm)):
            raise AudioError("AudioChunk.pcm contains NaN or infinite samples")
        if chunk.turn_id >= 0:
            self._seen.add(chunk.turn_id)
        pcm = self._resample(pcm, chunk.sample_rate, chunk.turn_id)
        assert self._changed is not None
        while True:
            # Clear before checking: a wake-up from the clock lands on the loop after this check.
            self._changed.clear()
            with self._lock:
                if chunk.turn_id in self._stale or self._closed:
                    return
                if self._queued < self._max_samples or not self._segments:
                    self._append(chunk.turn_id, pcm)
                    return
            await self._changed.wait()

    async def flush(self) -> None:
        """Wait until everything written (or not cleared) has been pulled by the clock."""
        self._bind_loop()
        self._drain_resampler()
        assert self._changed is not None
        while True:
            self._changed.clear()
            with self._lock:
                if self._queued == 0:
                    return
            await self._changed.wait()

    def clear(self) -> None:
        """Drop everything not yet played and every later chunk of the turns written so far."""
        with self._lock:
            self._stale |= self._seen
            self._segments.clear()
            self._queued = 0
            self._resampler = None
            self._resampler_key = None
        self._notify()

    def close(self) -> None:
        """The clock stopped for good (client gone): drop the queue, release writers and flushers."""
        self._closed = True
        self.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    def played_s(self, turn_id: int) -> float:
        with self._lock:
            return self._played.get(turn_id, 0) / self.play_rate

    def on_progress(self, callback: PlaybackCallback) -> None:
        self._callbacks.append(callback)

    @property
    def queued_s(self) -> float:
        """Seconds written but not yet pulled."""
        with self._lock:
            return self._queued / self.play_rate

    # -- clock side (any thread) ---------------------------------------------------------------------

    def pull(self, n: int) -> tuple[FloatArray, int]:
        """Take the next ``n`` samples (silence where starved) and the turn id heard first (-1: none).

        Returns pcm [n] float32.
        """
        out = np.zeros(n, dtype=np.float32)
        progressed: dict[int, int] = {}
        first_turn = -1
        filled = 0
        with self._lock:
            while filled < n and self._segments:
                turn_id, pcm = self._segments[0]
                take = min(n - filled, len(pcm))
                out[filled : filled + take] = pcm[:take]
                if take == len(pcm):
                    self._segments.popleft()
                else:
                    self._segments[0] = (turn_id, pcm[take:])
                filled += take
                self._queued -= take
                if first_turn == -1:
                    first_turn = turn_id
                if turn_id >= 0:
                    self._played[turn_id] = self._played.get(turn_id, 0) + take
                    progressed[turn_id] = self._played[turn_id]
        if filled:
            self._notify(progressed)
        return out, first_turn

    # -- internals -----------------------------------------------------------------------------------

    def _append(self, turn_id: int, pcm: FloatArray) -> None:
        if len(pcm):
            self._segments.append((turn_id, pcm))
            self._queued += len(pcm)

    def _resample(self, pcm: FloatArray, from_rate: int, turn_id: int) -> FloatArray:
        if from_rate == self.play_rate:
            return pcm
        if from_rate <= 0:
            raise AudioError(f"AudioChunk.sample_rate must be positive, got {from_rate}")
        key = (from_rate, turn_id)
        if self._resampler_key != key:
            # A new turn (or rate) starts a fresh stream; the old stream's tail belongs to its turn.
            self._drain_resampler()
            self._resampler = StreamResampler(from_rate, self.play_rate)
            self._resampler_key = key
        assert self._resampler is not None
        return np.asarray(self._resampler.process(pcm), dtype=np.float32)

    def _drain_resampler(self) -> None:
        if self._resampler is None or self._resampler_key is None:
            return
        tail = np.asarray(self._resampler.flush(), dtype=np.float32)
        turn_id = self._resampler_key[1]
        self._resampler = None
        self._resampler_key = None
        with self._lock:
            if turn_id not in self._stale:
                self._append(turn_id, tail)

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._changed = asyncio.Event()

    def _notify(self, progressed: dict[int, int] | None = None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _on_loop_thread(loop):
            self._on_changed(progressed)
        else:
            loop.call_soon_threadsafe(self._on_changed, progressed)

    def _on_changed(self, progressed: dict[int, int] | None) -> None:
        if self._changed is not None:
            self._changed.set()
        if not progressed:
            return
        for turn_id, samples in progressed.items():
            seconds = samples / self.play_rate
            for callback in self._callbacks:
                try:
                    callback(turn_id, seconds)
                except Exception:
                    logger.exception("playback progress callback failed")


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class FramePacer:
    """Yields the timestamps of fixed-size frames at real-time pace from a monotonic clock.

    ``await pacer.next()`` sleeps until the next frame is due and returns its pts in samples. If the
    consumer falls more than ``max_lag_s`` behind (a stalled loop), the schedule jumps forward, so
    the pts jumps too and the receiver hears a gap instead of a burst of fast audio.
    """

    def __init__(
        self,
        frame_samples: int,
        sample_rate: int,
        *,
        max_lag_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if frame_samples <= 0 or sample_rate <= 0:
            raise ConfigError("frame_samples and sample_rate must be positive")
        self.frame_samples = frame_samples
        self.sample_rate = sample_rate
        self._max_lag = max_lag_s
        self._clock = clock
        self._start: float | None = None
        self._pts = 0
        self.resyncs = 0

    async def next(self) -> int:
        now = self._clock()
        if self._start is None:
            self._start = now
            return 0
        self._pts += self.frame_samples
        due = self._start + self._pts / self.sample_rate
        if now - due > self._max_lag:
            skipped = int((now - due) * self.sample_rate) // self.frame_samples * self.frame_samples
            self._pts += skipped
            self.resyncs += 1
            due = self._start + self._pts / self.sample_rate
        if due > now:
            await asyncio.sleep(due - now)
        return self._pts
