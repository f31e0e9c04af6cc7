"""A fake speech engine implementing the ``moss_agent.streaming.tts`` protocols without any model.

Each text character becomes one codec frame (80 ms by default) of a sine tone whose pitch is
unique to the conversation, so tests can tell sessions apart by ear (FFT) as well as by turn id.
Frames are paced like a real engine: a time to first audio after the first text, then
``frame_s * rtf`` of compute per frame on the given clock. The conversation keeps a text context
that is cut back to what was heard, like the real engine's KV cache. The streams keep the speech
contract of ``moss_agent.streaming.tts`` (the same tests run against this fake and the engine).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence

import numpy as np

from moss_agent.errors import ConfigError, EngineError, OverloadError, SessionClosedError
from moss_agent.events import AudioChunk, FloatArray
from moss_agent.streaming.clock import Clock, MonotonicClock
from moss_agent.streaming.tts import HeardResult, PastTurn, UserTurn, check_history


class FakeSpeechBackend:
    """Deterministic tone "speech"; ``max_slots`` conversations at once (more raise OverloadError)."""

    def __init__(
        self,
        *,
        sample_rate: int = 24000,
        frame_s: float = 0.08,
        frames_per_chunk: int = 1,
        rtf: float = 0.25,
        ttfa_s: float = 0.05,
        max_slots: int = 64,
        text_buffer_chars: int = 64,
        base_hz: float = 200.0,
        step_hz: float = 50.0,
        clock: Clock | None = None,
        fail_at_frame: int | None = None,
        max_frames_per_turn: int | None = None,
        model_stop_after: str | None = None,
        max_history_chars: int | None = None,
    ) -> None:
        """``fail_at_frame``: every stream raises EngineError when it reaches that frame (fault injection).
        ``max_frames_per_turn``: a turn stops after that many frames, whatever text is left (the
        engine's frame cap). ``model_stop_after``: the model ends a turn by itself once it has spoken
        the first occurrence of this text (as the real one stops at EOS, whatever text is left).
        ``max_history_chars``: the most history text ``open_conversation``
        takes (the engine's limit is its context), None: no limit."""
        self.max_history_chars = max_history_chars
        self.sample_rate = sample_rate
        self.fail_at_frame = fail_at_frame
        self.max_frames_per_turn = max_frames_per_turn
        self.model_stop_after = model_stop_after
        self.frame_s = frame_s
        self.frame_samples = round(frame_s * sample_rate)
        self.frames_per_chunk = frames_per_chunk
        self.rtf = rtf
        self.ttfa_s = ttfa_s
        self.max_slots = max_slots
        self.text_buffer_chars = text_buffer_chars
        self.base_hz = base_hz
        self.step_hz = step_hz
        self.clock = clock or MonotonicClock()
        self.active: set[FakeConversation] = set()
        self._slot_ids = itertools.count()

    def tone_hz(self, slot: int) -> float:
        return self.base_hz + self.step_hz * slot

    async def open_conversation(
        self,
        *,
        system_prompt: str | None = None,
        voice_prompt: FloatArray | None = None,
        history: Sequence[PastTurn] | None = None,
    ) -> FakeConversation:
        """``history`` is checked as the engine checks it and starts the conversation's ``context``;
        a history of more than ``max_history_chars`` characters raises ConfigError, as one over the
        engine's context does."""
        turns = check_history(history)
        chars = sum(len(turn.text) for turn in turns)
        if self.max_history_chars is not None and chars > self.max_history_chars:
            raise ConfigError(
                f"the history holds {chars} characters; this fake takes at most {self.max_history_chars}"
            )
        if len(self.active) >= self.max_slots:
            raise OverloadError(f"all {self.max_slots} fake engine slots are busy; close a session first")
        conversation = FakeConversation(self, next(self._slot_ids), system_prompt, voice_prompt)
        conversation.history = turns
        conversation.context.extend((turn.role, turn.text) for turn in turns if turn.text)
        self.active.add(conversation)
        return conversation


class FakeConversation:
    """One slot: keeps ``context`` [(role, text)] (starting with its history's turns), the
    ``history`` it was opened with and every ``UserTurn`` it was given."""

    def __init__(
        self, backend: FakeSpeechBackend, slot: int, system_prompt: str | None, voice_prompt: FloatArray | None
    ) -> None:
        self.backend = backend
        self.sample_rate = backend.sample_rate
        self.slot = slot
        self.tone_hz = backend.tone_hz(slot)
        self.system_prompt = system_prompt
        self.voice_prompt = voice_prompt
        self.context: list[tuple[str, str]] = []
        self.history: list[PastTurn] = []
        self.user_turns: list[UserTurn] = []
        self.turn_ids: list[int] = []
        self.closed = False
        self._stream: FakeSpeechStream | None = None

    async def start_turn(self, user: UserTurn | None, turn_id: int) -> FakeSpeechStream:
        if self.closed:
            raise SessionClosedError("this fake conversation was closed")
        if self._stream is not None and not self._stream.closed:
            raise EngineError(
                f"turn {self._stream.turn_id} is still open on this conversation; aclose() it before starting another"
            )
        if user is not None:
            self.user_turns.append(user)
            if user.text:
                self.context.append(("user", user.text))
        self.turn_ids.append(turn_id)
        self._stream = FakeSpeechStream(self, turn_id)
        return self._stream

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        self.closed = True
        self.backend.active.discard(self)


class FakeSpeechStream:
    """One turn: characters in, one tone frame per character out, paced on the backend's clock.

    ``closed``: no more audio comes (the text was spoken, the frame cap, a failure, or a cut).
    """

    def __init__(self, conversation: FakeConversation, turn_id: int) -> None:
        self.conversation = conversation
        self.turn_id = turn_id
        self.backend = conversation.backend
        self.text = ""  # everything pushed
        self.frames = 0  # frames generated so far = characters spoken
        self.closed = False
        self.ended = False  # end_input() or aclose() was called: pushing more is a mistake
        self.interrupted = False
        self._changed = asyncio.Event()
        self._heard: HeardResult | None = None
        self._context_index: int | None = None

    def _pending(self) -> int:
        return len(self.text) - self.frames

    def _frame_limit(self) -> int | None:
        """The frames this turn can have: the frame cap, or where the model stops by itself."""
        limits = [] if self.backend.max_frames_per_turn is None else [self.backend.max_frames_per_turn]
        stop = self.backend.model_stop_after
        if stop is not None and (at := self.text.find(stop)) >= 0:
            limits.append(at + len(stop))
        return min(limits, default=None)

    def _capped(self) -> bool:
        limit = self._frame_limit()
        return limit is not None and self.frames >= limit

    async def push_text(self, delta: str) -> None:
        if self.ended:
            raise SessionClosedError(f"push_text after end_input() or aclose() on turn {self.turn_id}")
        if self.closed:
            return  # the turn ended on its own or was cut: this text is never spoken
        self.text += delta
        self._changed.set()
        while self._pending() > self.backend.text_buffer_chars and not self.closed:
            self._changed.clear()
            await self._changed.wait()

    async def end_input(self) -> None:
        self.ended = True
        self._changed.set()

    def __aiter__(self) -> FakeSpeechStream:
        return self

    async def __anext__(self) -> AudioChunk:
        backend = self.backend
        while True:
            if self.interrupted or self.closed:
                raise StopAsyncIteration
            if self._capped() or (self.ended and self._pending() == 0):
                self._finish()
                raise StopAsyncIteration
            if self._pending() > 0:
                break
            self._changed.clear()
            await self._changed.wait()
        count = min(self._pending(), backend.frames_per_chunk)
        if (limit := self._frame_limit()) is not None:
            count = min(count, limit - self.frames)
        if self.frames == 0:
            await backend.clock.sleep(backend.ttfa_s)
        await backend.clock.sleep(backend.frame_s * backend.rtf * count)
        if self.interrupted or self.closed:
            raise StopAsyncIteration
        if backend.fail_at_frame is not None and self.frames >= backend.fail_at_frame:
            self._finish()  # the frames made so far stay, as the engine keeps them
            raise EngineError(f"injected engine failure at frame {self.frames} of turn {self.turn_id}")
        first = self.frames
        self.frames += count
        self._changed.set()
        return AudioChunk(self._tone(first, count), backend.sample_rate, self.turn_id, first)

    def _tone(self, first_frame: int, count: int) -> FloatArray:
        n = self.backend.frame_samples
        t = np.arange(first_frame * n, (first_frame + count) * n, dtype=np.float64) / self.backend.sample_rate
        return (0.3 * np.sin(2 * math.pi * self.conversation.tone_hz * t)).astype(np.float32)

    def _finish(self) -> None:
        if not self.closed:
            self._context_index = len(self.conversation.context)
            self.conversation.context.append(("assistant", self.text[: self.frames]))
            self.closed = True
            self._changed.set()

    async def interrupt(self, heard_s: float | None = None) -> HeardResult:
        """Also valid after the last frame was generated: the listener may still be hearing it."""
        if self._heard is not None:
            return self._heard
        if self.conversation.turn_ids[-1] != self.turn_id:
            raise EngineError(f"turn {self.turn_id} was followed by another; settle a turn before the next starts")
        frames = self.frames
        if heard_s is not None:  # a frame the listener started hearing counts as heard
            frames = min(frames, max(0, math.ceil(heard_s / self.backend.frame_s - 1e-6)))
        entry = ("assistant", self.text[:frames])
        if self._context_index is not None:  # generation had finished: cut the context back
            self.conversation.context[self._context_index] = entry
        else:
            self.conversation.context.append(entry)
        self.interrupted = True
        self._heard = HeardResult(frames, self.text[:frames], frames * self.backend.frame_s)
        self.closed = True
        self._changed.set()
        return self._heard

    async def aclose(self) -> None:
        self.ended = True
        if not self.closed:
            await self.interrupt(None)
