"""The torch-free realtime pipeline: sessions, turn-taking, LLM text sources, metrics.

Typical wiring::

    from moss_agent.config import LLMConfig, SessionConfig
    from moss_agent.streaming import OpenAIChatLLM, Session

    llm = OpenAIChatLLM(LLMConfig(base_url="http://localhost:8000/v1", model="qwen"))
    config = SessionConfig(system_prompt="You are a terse assistant.")
    async with Session(backend, llm=llm, output=speaker, input=mic,
                       vad=SileroVad(), stt=recognizer, config=config) as session:
        async for event in session.events():
            ...

Names are imported on first use, so ``import moss_agent.streaming.tts`` stays light for engines.
"""

from __future__ import annotations

from moss_agent._lazy import lazy_exports

_EXPORTS = {
    "Session": "session",
    "TurnHandle": "session",
    "TurnResult": "session",
    "EventStream": "session",
    "LLM": "llm",
    "OpenAIChatLLM": "llm",
    "EchoResponder": "llm",
    "History": "history",
    "TurnDetector": "turns",
    "SpeechStart": "turns",
    "SpeechEnd": "turns",
    "BargeIn": "turns",
    "SessionSummary": "metrics",
    "TurnTimeline": "metrics",
    "format_breakdown": "metrics",
    "Channel": "channels",
    "Clock": "clock",
    "MonotonicClock": "clock",
    "ScaledClock": "clock",
    "ManualClock": "clock",
    "VoiceActivityModel": "listen",
    "Transcriber": "listen",
    "EchoCanceller": "listen",
    "WebRtcEchoCanceller": "echo",
    "SpeechBackend": "tts",
    "Conversation": "tts",
    "SpeechStream": "tts",
    "UserTurn": "tts",
    "HeardResult": "tts",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
