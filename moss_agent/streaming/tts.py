"""The seam between the asyncio pipeline and whatever makes speech (the engine, or a fake).

A ``SpeechBackend`` opens ``Conversation``s; a conversation is one engine slot that keeps the
model context (KV cache) across turns. Each agent turn is a ``SpeechStream``: text goes in as it
arrives from the LLM, audio comes out as ``AudioChunk``s tagged with the turn id and frame index.
When the turn ends, the stream is settled at what the listener heard, so the next turn continues
from there.

The contract (both ``moss_agent.engine.RealtimeEngine`` and ``moss_agent.testing.FakeSpeechBackend``
keep it; ``tests/models/test_speech_contract.py`` runs the same tests against each):

- **One open turn per conversation.** ``start_turn`` raises ``EngineError`` while the previous
  stream is open. A stream is open until its audio iteration has ended (last frame, failure) or
  ``interrupt()`` / ``aclose()`` returned. Nothing is closed behind the caller's back.
- **Text blocks its producer.** Each stream has a budget of text the model has not read yet (the
  fake: ``text_buffer_chars`` characters not yet spoken; the engine:
  ``RealtimeEngineConfig.text_buffer_chars`` characters its model has not read). ``push_text``
  returns once the stream is back within it, so a fast LLM waits for speech instead of filling
  memory. It never waits while the model is still short of the text it needs to start.
- **Misuse raises, endings do not.** ``push_text`` after ``end_input()`` or ``aclose()`` raises
  ``SessionClosedError`` (the caller said it was done). ``push_text`` after the turn ended on its
  own (the model's stop, the frame cap, a failure) or after ``interrupt()`` returns at once and the
  text is dropped: the producer cannot see that coming, and the dropped text was never spoken.
  ``end_input`` and ``aclose`` are idempotent.
- **Speech starts when the model has enough text.** The engine waits for a prefill's worth of
  tokens (about a dozen) or ``end_input()`` before its first frame; the fake starts at once.
- **A turn ends when its speech ends.** Audio iteration stops at the model's stop or the frame
  cap, whatever text is still arriving.
- **Heard is what was played, rounded up to whole frames.** ``interrupt(heard_s)`` keeps the first
  ``ceil(heard_s / frame_s)`` frames (a frame the listener started hearing counts as heard; a
  millionth of a frame of float error is ignored), never more than were made. ``HeardResult.text``
  is the text those frames covered (the engine: what its model had read when it made the last
  kept frame; the fake: one character per frame). The same call settles a turn that ended by
  itself (the listener may still be hearing its last audio) and one whose audio failed (the
  frames made before the failure stay). It is valid until the next ``start_turn``, which it must
  precede; a second call returns the first result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from moss_agent.errors import ConfigError
from moss_agent.events import AudioChunk, FloatArray


@dataclass(frozen=True, slots=True)
class UserTurn:
    """What the user said: transcript and, optionally, their audio (float32 mono at ``sample_rate``)."""

    text: str
    audio: FloatArray | None = None
    sample_rate: int = 24000


@dataclass(frozen=True, slots=True)
class PastTurn:
    """An earlier turn of a conversation, to open it with (``open_conversation(history=[...])``).

    ``role``: "user" or "assistant"; ``text``: what was said; ``audio``: the speech (float32 mono at
    ``sample_rate``), optional for the user, required for the assistant (MOSS-TTS-Realtime has a
    layout for user text alone, but none for assistant text without its speech: see
    ``check_history``). For an assistant turn that was cut short, give the words and the audio the
    listener heard.
    """

    role: Literal["user", "assistant"]
    text: str
    audio: FloatArray | None = None
    sample_rate: int = 24000

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ConfigError(f"a past turn's role must be 'user' or 'assistant', got {self.role!r}")
        if not isinstance(self.text, str):
            raise ConfigError(f"a past turn's text must be a string, got {type(self.text).__name__}")
        if not (isinstance(self.sample_rate, int) and self.sample_rate > 0):
            raise ConfigError(f"a past turn's sample_rate must be a positive integer, got {self.sample_rate!r}")

    @property
    def has_audio(self) -> bool:
        return self.audio is not None and np.size(self.audio) > 0


def check_history(history: Sequence[PastTurn] | None) -> list[PastTurn]:
    """The turns of ``history`` as a list, or ConfigError naming the first one no backend can take.

    Every turn must be a ``PastTurn``; an assistant turn needs its audio. Why: the model was trained
    on assistant turns only as text with its speech (reference section 6.2), and an assistant turn
    of text alone has no layout it knows; text rows there could teach it, in context, that assistant
    turns may be silent. A chat that turns into a call can leave the assistant's text turns out of
    the engine's history (the LLM's history keeps them) or synthesize their audio first.
    """
    if history is None:
        return []
    if isinstance(history, str | bytes) or not isinstance(history, Sequence):
        raise ConfigError("history must be a list of PastTurn")
    turns = list(history)
    for index, turn in enumerate(turns):
        if not isinstance(turn, PastTurn):
            raise ConfigError(f"history[{index}] must be a PastTurn, got {type(turn).__name__}")
        if turn.role == "assistant" and not turn.has_audio:
            raise ConfigError(
                f"history[{index}] is an assistant turn without audio; the model has no layout for "
                "assistant text without its speech. Give the audio the listener heard, or leave the "
                "turn out of the engine's history"
            )
    return turns


@dataclass(frozen=True, slots=True)
class HeardResult:
    """What the listener heard of a turn: whole frames, the text they covered, their duration."""

    frames: int
    text: str
    audio_s: float


@runtime_checkable
class SpeechStream(Protocol):
    """One agent turn; see the module docstring for the contract."""

    turn_id: int

    async def push_text(self, delta: str) -> None:
        """Append LLM text; waits while the stream's unread text is over its budget.

        Raises ``SessionClosedError`` after ``end_input()`` or ``aclose()``; returns at once (text
        dropped) once the turn has ended on its own or was interrupted.
        """

    async def end_input(self) -> None:
        """No more text: the model speaks the rest and stops. Idempotent."""

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        """Audio of this turn in order; ends after the last frame (model stop or frame cap) or after
        ``interrupt()``; raises the backend's error if generation failed."""

    async def interrupt(self, heard_s: float | None = None) -> HeardResult:
        """Settle the turn at ``heard_s`` seconds heard (None: everything made): stop generating,
        drop unplayed audio, cut the context to ``ceil(heard_s / frame_s)`` frames."""

    async def aclose(self) -> None:
        """Release the stream; a turn still running is settled as heard in full. Idempotent."""


@runtime_checkable
class Conversation(Protocol):
    sample_rate: int

    async def start_turn(self, user: UserTurn | None, turn_id: int) -> SpeechStream:
        """Begin an agent turn, after the user's turn (text and audio) when given.

        Raises ``EngineError`` while the previous turn's stream is open, ``SessionClosedError``
        after ``aclose()``.
        """

    async def aclose(self) -> None:
        """Free the slot and its context; an open stream ends. Idempotent."""


@runtime_checkable
class SpeechBackend(Protocol):
    sample_rate: int

    async def open_conversation(
        self,
        *,
        system_prompt: str | None = None,
        voice_prompt: FloatArray | None = None,
        history: Sequence[PastTurn] | None = None,
    ) -> Conversation:
        """Claim a slot; may wait in a bounded queue or raise OverloadError when all are busy.

        ``history``: earlier turns the conversation starts with, oldest first (``check_history``
        says what is accepted); the first ``start_turn`` continues after them. A history that does
        not fit the backend's context raises ConfigError.
        """
