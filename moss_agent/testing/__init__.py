"""Fakes for testing voice agents without a GPU, a model, a microphone or an LLM server.

- ``FakeSpeechBackend``: the speech-engine protocols with paced, per-conversation tone "speech".
- ``FakeOpenAIServer`` / ``ScriptedReply``: a real local HTTP server speaking the OpenAI API
  (streamed chat completions with scripted failures, audio transcriptions).
- ``FakeAudioInput`` / ``FakeAudioOutput``: a pushable microphone and a clock-paced speaker.
- ``EnergyVad``: a torch-free voice-activity model for synthetic signals.
- ``synthesize_speech``: intelligible speech from espeak-ng.

Names are imported on first use (the HTTP server needs aiohttp).
"""

from __future__ import annotations

from moss_agent._lazy import lazy_exports

_EXPORTS = {
    "FakeSpeechBackend": "backend",
    "FakeConversation": "backend",
    "FakeSpeechStream": "backend",
    "FakeOpenAIServer": "openai_server",
    "ScriptedReply": "openai_server",
    "FakeAudioInput": "audio_io",
    "FakeAudioOutput": "audio_io",
    "EnergyVad": "vad",
    "synthesize_speech": "speech",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
