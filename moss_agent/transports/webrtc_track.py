"""The WebRTC media tracks: the paced outbound track that plays a PlaybackBuffer, its start buffer and
figures, and the pump that feeds a remote track into a QueueAudioInput.

The outbound track sends a frame every 20 ms whether or not the agent speaks (silence between turns),
so the receiver's jitter buffer never sees a pause in the packet stream. Two things can still break
the audio at the start of a turn, and they are told apart here:

- the sender is late (the event loop stalled, or the machine is overloaded): the receiver has no
  packet when it needs one and conceals (Chromium's ``concealedSamples``); ``OutboundStats`` records
  how late the track's frames were;
- the producer is late (the engine's next frame arrives after the buffer ran dry): the track sends
  silence in the middle of the turn, which the receiver plays as a gap without concealing anything.
  :class:`StartBuffer` holds back the start of each turn's audio by as much as such gaps lasted.

Track pacing follows aiortc's own AudioStreamTrack (wall-clock schedule in ``recv()``).
"""

from __future__ import annotations

import fractions
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from moss_agent._optional import require
from moss_agent.audio import float_to_pcm16
from moss_agent.errors import ConfigError
from moss_agent.transports.capture import QueueAudioInput, av_frame_to_mono
from moss_agent.transports.playback import FramePacer, PlaybackBuffer

RTC_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz: what Opus in WebRTC expects per packet
FRAME_S = FRAME_SAMPLES / RTC_RATE
_TURNS_KEPT = 64


class StartBuffer:
    """How long to hold back the start of a run of agent audio, learned from the producer's lateness.

    When the buffer runs dry in the middle of a turn and the same turn's audio comes back, the dry
    spell measured how late the producer (the engine) was. Later starts wait that long after their
    first audio arrives (unless ``max_s`` is queued already), so the same lateness finds audio
    queued; the hold grows up to ``max_s`` (a longer stall is not jitter, and no small buffer would
    hide it) and shrinks by one frame after each turn that played without a gap, so a quiet machine
    pays no latency. ``hold`` is asked once per frame before pulling; ``played`` is told what each
    pull got.
    """

    def __init__(self, *, initial_s: float = 0.0, max_s: float = 0.3, frame_s: float = FRAME_S) -> None:
        if not 0.0 <= initial_s <= max_s or frame_s <= 0:
            raise ConfigError(
                f"StartBuffer needs 0 <= initial_s <= max_s and frame_s > 0, got {initial_s}, {max_s}, {frame_s}"
            )
        self.initial_s = initial_s
        self.max_s = max_s
        self.frame_s = frame_s
        self.target_s = initial_s
        """The hold now applied to each start."""
        self._running = False
        self._waited_s = 0.0
        self._last_turn = -1
        self._dry_s = 0.0
        self._gap_s: float | None = None
        self._turn_had_gap = False

    def hold(self, queued_s: float) -> bool:
        """True: send silence this frame and leave the queued audio for later."""
        if self._running or queued_s <= 0.0:
            return False
        if self._gap_s is None:
            self._gap_s = self._dry_s  # audio is back: the dry spell is over
        # By time, not by the amount queued: a gap of G after the first chunk means a chunk came G
        # late, however big the first one was. More than max_s queued covers any gap learned here.
        if self._waited_s >= self.target_s or queued_s >= self.max_s:
            self._running = True
            self._waited_s = 0.0
            return False
        self._waited_s += self.frame_s
        return True

    def played(self, turn_id: int, filled_s: float) -> float | None:
        """A pull returned ``filled_s`` seconds of ``turn_id``'s audio (-1: none); returns the gap in
        seconds when this pull ended one inside a turn."""
        gap = None
        if turn_id < 0:
            self._running = False
            self._dry_s += self.frame_s
            return None
        if turn_id == self._last_turn and self._gap_s:
            gap = self._gap_s
            self._turn_had_gap = True
            if gap <= self.max_s:
                self.target_s = min(self.max_s, max(self.target_s, gap))
        elif turn_id != self._last_turn:
            if self._last_turn >= 0 and not self._turn_had_gap:
                self.target_s = max(self.initial_s, self.target_s - self.frame_s)
            self._turn_had_gap = False
        self._last_turn = turn_id
        self._gap_s = None
        self._dry_s = max(0.0, self.frame_s - filled_s)
        if filled_s < self.frame_s - 1e-9:
            self._running = False
        return gap


OutboundStats = dict[str, Any]
"""What the outbound track did (JSON-ready, updated in place): ``frames`` sent, ``held_frames``
(start buffer), ``late_frames`` (left more than a frame period after their due time) and
``max_late_s``, ``gaps`` and ``gap_s`` (dry spells inside turns: the producer was late),
``start_buffer_s`` (the hold now applied) and ``turns``: the most recent turn ids to
``{"gaps", "gap_s", "held_s"}``."""


def outbound_stats() -> OutboundStats:
    """Fresh figures for ``make_paced_track``."""
    return {"frames": 0, "held_frames": 0, "late_frames": 0, "max_late_s": 0.0, "gaps": 0, "gap_s": 0.0,
            "start_buffer_s": 0.0, "turns": {}}  # fmt: skip


def _turn_figures(stats: OutboundStats, turn_id: int) -> dict[str, float]:
    turns: dict[int, dict[str, float]] = stats["turns"]
    figures = turns.get(turn_id)
    if figures is None:
        figures = turns[turn_id] = {"gaps": 0, "gap_s": 0.0, "held_s": 0.0}
        while len(turns) > _TURNS_KEPT:
            del turns[next(iter(turns))]
    return figures


def _track_base() -> type:
    return require("aiortc", "webrtc").MediaStreamTrack  # type: ignore[no-any-return]


def make_paced_track(
    buffer: PlaybackBuffer,
    *,
    pacer: FramePacer | None = None,
    start_buffer: StartBuffer | None = None,
    stats: OutboundStats | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """An aiortc audio track that plays ``buffer`` (48 kHz) in 20 ms stereo s16 frames.

    Silence when the buffer is starved; pts advances by 960 per frame in 1/48000 units. Stereo,
    because aiortc's Opus encoder upmixes mono with a -3 dB gain. With ``start_buffer`` the start of
    each run of audio is held back as it says; ``stats`` (updated in place) gets the figures.
    """
    av = require("av", "webrtc")
    if buffer.play_rate != RTC_RATE:
        raise ConfigError(f"a WebRTC track plays 48 kHz audio; the buffer plays at {buffer.play_rate} Hz")
    paced = pacer or FramePacer(FRAME_SAMPLES, RTC_RATE)
    time_base = fractions.Fraction(1, RTC_RATE)
    figures = stats if stats is not None else outbound_stats()
    silence = np.zeros(FRAME_SAMPLES, np.float32)
    started: list[float] = []
    held = 0  # frames held back before the audio that starts next

    def next_pcm() -> np.ndarray:
        nonlocal held
        queued_s = buffer.queued_s
        if start_buffer is not None and start_buffer.hold(queued_s):
            figures["held_frames"] += 1
            held += 1
            return silence
        pcm, turn_id = buffer.pull(FRAME_SAMPLES)
        if start_buffer is None:
            return pcm
        gap = start_buffer.played(turn_id, min(queued_s, FRAME_S))
        figures["start_buffer_s"] = start_buffer.target_s
        if turn_id >= 0:
            per_turn = _turn_figures(figures, turn_id)
            per_turn["held_s"] += held * FRAME_S
            held = 0
            if gap is not None:
                figures["gaps"] += 1
                figures["gap_s"] += gap
                per_turn["gaps"] += 1
                per_turn["gap_s"] += gap
        return pcm

    class PacedAudioTrack(_track_base()):  # type: ignore[misc]
        kind = "audio"

        async def recv(self) -> Any:
            if self.readyState != "live":
                raise require("aiortc.mediastreams", "webrtc").MediaStreamError
            pts = await paced.next()
            now = clock()
            if not started:
                started.append(now - pts / RTC_RATE)
            late = now - (started[0] + pts / RTC_RATE)
            if late > FRAME_S:
                figures["late_frames"] += 1
                figures["max_late_s"] = max(figures["max_late_s"], late)
            figures["frames"] += 1
            stereo = np.repeat(float_to_pcm16(next_pcm()), 2).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
            frame.sample_rate = RTC_RATE
            frame.pts = pts
            frame.time_base = time_base
            return frame

    return PacedAudioTrack()


async def pump_track(
    track: Any, sink: QueueAudioInput, on_frame: Callable[[Any], None] | None = None
) -> None:
    """Feed every frame of a remote audio track into ``sink`` until the track ends; then close it.

    ``on_frame`` sees each decoded PyAV frame first (statistics: pts, rate, size).
    """
    media_error = require("aiortc.mediastreams", "webrtc").MediaStreamError
    try:
        while True:
            try:
                frame = await track.recv()
            except media_error:
                return
            if on_frame is not None:
                on_frame(frame)
            sink.feed(av_frame_to_mono(frame), frame.sample_rate)
    finally:
        sink.close()
