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

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from moss_agent.events import AudioChunk, FloatArray


@dataclass(frozen=True, slots=True)
class UserTurn:
    """What the user said: transcript and, optionally, their audio (float32 mono at ``sample_rate``)."""

    text: str
    audio: FloatArray | None = None
    sample_rate: int = 24000


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
        self, *, system_prompt: str | None = None, voice_prompt: FloatArray | None = None
    ) -> Conversation:
        """Claim a slot; may wait in a bounded queue or raise OverloadError when all are busy."""
