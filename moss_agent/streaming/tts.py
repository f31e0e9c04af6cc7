"""The seam between the asyncio pipeline and whatever makes speech (the engine, or a fake).

A ``SpeechBackend`` opens ``Conversation``s; a conversation is one engine slot that keeps the
model context (KV cache) across turns. Each agent turn is a ``SpeechStream``: text goes in as it
arrives from the LLM, audio comes out as ``AudioChunk``s tagged with the turn id and frame index.
After an interruption the stream is cut back to what the listener heard, so the next turn
continues from there.
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
    """What the listener heard of an interrupted turn."""

    frames: int
    text: str
    audio_s: float


@runtime_checkable
class SpeechStream(Protocol):
    turn_id: int

    async def push_text(self, delta: str) -> None:
        """Append LLM text; may wait while the stream's text buffer is full (text blocks its producer)."""

    async def end_input(self) -> None:
        """No more text: the model speaks the rest and stops."""

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        """Audio of this turn in order; ends after the last frame or after interrupt()."""

    async def interrupt(self, heard_s: float | None = None) -> HeardResult:
        """Stop now; cut the conversation context back to ``heard_s`` seconds (None: all generated)."""

    async def aclose(self) -> None:
        """Release the stream; interrupts it if still running."""


@runtime_checkable
class Conversation(Protocol):
    sample_rate: int

    async def start_turn(self, user: UserTurn | None, turn_id: int) -> SpeechStream:
        """Begin an agent turn, after the user's turn (text and audio) when given."""

    async def aclose(self) -> None:
        """Free the slot and its context."""


@runtime_checkable
class SpeechBackend(Protocol):
    sample_rate: int

    async def open_conversation(
        self, *, system_prompt: str | None = None, voice_prompt: FloatArray | None = None
    ) -> Conversation:
        """Claim a slot; may wait in a bounded queue or raise OverloadError when all are busy."""
