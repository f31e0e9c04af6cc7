"""Speech input: voice activity detection (Silero, torch) and speech recognition (no torch).

Names are loaded on first use so that importing the recognizers never pulls in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moss_agent._lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _HOMES)
