"""The closed set of events a session emits.

Frozen, slotted dataclasses; no torch. Audio travels as float32 mono numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Mono float32 PCM in [-1, 1].

    ``turn_id`` ties agent audio to the turn that produced it (stale audio is dropped by id after an
    interrupt); user audio carries the id of the user turn it belongs to, or -1 when unknown.
    ``frame_index`` is the first codec frame of the chunk for agent audio (-1 otherwise).
    """

    pcm: FloatArray
    sample_rate: int
    turn_id: int = -1
    frame_index: int = -1

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Text produced for a turn: LLM output (``role='assistant'``) or a transcript (``role='user'``)."""

    text: str
    turn_id: int
    role: str = "assistant"
    final: bool = False


@dataclass(frozen=True, slots=True)
class UserStartedSpeaking:
    at_s: float


@dataclass(frozen=True, slots=True)
class UserStoppedSpeaking:
    at_s: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class TurnStarted:
    turn_id: int


@dataclass(frozen=True, slots=True)
class TurnEnded:
    """An agent turn finished normally; ``text`` is what was spoken."""

    turn_id: int
    text: str
    audio_s: float


@dataclass(frozen=True, slots=True)
class Interrupted:
    """An agent turn was cut; the user heard ``heard_s`` seconds, i.e. ``heard_text``."""

    turn_id: int
    heard_s: float
    heard_text: str = ""


@dataclass(frozen=True, slots=True)
class WordTiming:
    """When a word of an agent turn is spoken: seconds from the turn's first audio sample."""

    word: str  # as written in the text, punctuation attached, no spaces
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class WordTimes:
    """Words of an agent turn and when they are spoken (``moss_agent.streaming.word_timing``).

    While the turn speaks, each event carries the words newly settled (each word once, in order);
    the ``final`` one, after its speech ended, carries every word's final timing.
    """

    turn_id: int
    words: tuple[WordTiming, ...]
    final: bool = False


@dataclass(frozen=True, slots=True)
class Metrics:
    """Per-turn figures in seconds; None where a stage did not run."""

    turn_id: int
    values: dict[str, float | int | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """Something failed; the session stays usable unless ``fatal``."""

    message: str
    turn_id: int = -1
    fatal: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


Event = (
    AudioChunk
    | TextDelta
    | UserStartedSpeaking
    | UserStoppedSpeaking
    | TurnStarted
    | TurnEnded
    | Interrupted
    | WordTimes
    | Metrics
    | ErrorEvent
)
