"""moss_agent: realtime voice agents and batch speech generation on the MOSS-TTS model family."""

from __future__ import annotations

from moss_agent.errors import (
    AudioError,
    CheckpointError,
    ConfigError,
    EngineError,
    LLMError,
    MissingExtraError,
    ModelError,
    MossError,
    OverloadError,
    SessionClosedError,
    STTError,
    TransportError,
)
from moss_agent.events import (
    AudioChunk,
    ErrorEvent,
    Event,
    Interrupted,
    Metrics,
    TextDelta,
    TurnEnded,
    TurnStarted,
    UserStartedSpeaking,
    UserStoppedSpeaking,
)

__version__ = "0.1.0"

__all__ = [
    "AudioChunk",
    "AudioError",
    "CheckpointError",
    "ConfigError",
    "EngineError",
    "ErrorEvent",
    "Event",
    "Interrupted",
    "LLMError",
    "Metrics",
    "MissingExtraError",
    "ModelError",
    "MossError",
    "OverloadError",
    "STTError",
    "SessionClosedError",
    "TextDelta",
    "TransportError",
    "TurnEnded",
    "TurnStarted",
    "UserStartedSpeaking",
    "UserStoppedSpeaking",
    "__version__",
]
