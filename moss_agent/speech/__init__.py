"""Speech input: voice activity detection (Silero, torch) and speech recognition (no torch).

Names are loaded on first use so that importing the recognizers never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moss_agent.speech.stt import OpenAITranscriber, PocketSphinxRecognizer, SpeechRecognizer
    from moss_agent.speech.vad import SileroVad

__all__ = ["OpenAITranscriber", "PocketSphinxRecognizer", "SileroVad", "SpeechRecognizer"]

_HOMES = {
    "SileroVad": "moss_agent.speech.vad",
    "SpeechRecognizer": "moss_agent.speech.stt",
    "OpenAITranscriber": "moss_agent.speech.stt",
    "PocketSphinxRecognizer": "moss_agent.speech.stt",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
