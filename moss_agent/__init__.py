"""moss_agent: realtime voice agents and batch speech generation on the MOSS-TTS model family.

The public API is importable from here::

    from moss_agent import LLMConfig, OpenAIChatLLM, RealtimeEngine, RealtimeEngineConfig, Session

Errors, events and model ids load with the package; everything else (torch, the engines, the LLM
client) is imported on first use, so ``import moss_agent`` stays light and torch-free.
"""

from __future__ import annotations

from moss_agent._lazy import lazy_exports
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
    WordTimes,
    WordTiming,
)
from moss_agent.model_ids import (
    CODEC_MODEL_ID,
    DIALOGUE_MODEL_ID,
    REALTIME_MODEL_ID,
    SOUND_EFFECT_MODEL_ID,
    TTS_LOCAL_MODEL_ID,
    TTS_MODEL_ID,
    VOICE_DESIGN_MODEL_ID,
)

_LAZY_EXPORTS = {
    # conversations (torch-free)
    "Session": "moss_agent.streaming.session",
    "TurnHandle": "moss_agent.streaming.session",
    "TurnResult": "moss_agent.streaming.session",
    "EventStream": "moss_agent.streaming.session",
    "SessionConfig": "moss_agent.config",
    "LLMConfig": "moss_agent.config",
    "TurnTakingConfig": "moss_agent.config",
    "HistoryConfig": "moss_agent.config",
    "LLM": "moss_agent.streaming.llm",
    "OpenAIChatLLM": "moss_agent.streaming.llm",
    "EchoResponder": "moss_agent.streaming.llm",
    "SpeechBackend": "moss_agent.streaming.tts",
    "Conversation": "moss_agent.streaming.tts",
    "SpeechStream": "moss_agent.streaming.tts",
    "UserTurn": "moss_agent.streaming.tts",
    "PastTurn": "moss_agent.streaming.tts",
    "AudioInput": "moss_agent.transports.base",
    "AudioOutput": "moss_agent.transports.base",
    "EchoMode": "moss_agent.config",
    # serving a conversation per client, or on local audio
    "session_handler": "moss_agent.serving",
    "converse": "moss_agent.serving",
    # transports (optional extras: [local], [webrtc], [mqtt])
    "LocalAudio": "moss_agent.transports.local",
    "WebRTCServer": "moss_agent.transports.webrtc",
    "MqttWorker": "moss_agent.transports.mqtt",
    "MqttClient": "moss_agent.transports.mqtt",
    "MqttClientSession": "moss_agent.transports.mqtt",
    "MqttSettings": "moss_agent.transports.mqtt",
    # listening: voice activity ([vad]) and speech recognition ([stt] offline, or a Whisper server)
    "SileroVad": "moss_agent.speech.vad",
    "PocketSphinxRecognizer": "moss_agent.speech.stt",
    "OpenAITranscriber": "moss_agent.speech.stt",
    "WebRtcEchoCanceller": "moss_agent.streaming.echo",
    # a speech server's engine over the network (torch-free; aiohttp)
    "RemoteSpeechBackend": "moss_agent.client",
    # engines and models (torch)
    "RealtimeEngine": "moss_agent.engine.realtime",
    "RealtimeEngineConfig": "moss_agent.engine.realtime",
    "SamplingConfig": "moss_agent.models.realtime",
    "BatchEngine": "moss_agent.engine.batch",
    "ModelRegistry": "moss_agent.engine.registry",
    # audio files
    "load_audio": "moss_agent.audio",
    "write_wav": "moss_agent.audio",
}

__getattr__ = lazy_exports(__name__, _LAZY_EXPORTS)

__version__ = "0.1.0"

__all__ = [
    "CODEC_MODEL_ID",
    "DIALOGUE_MODEL_ID",
    "LLM",
    "REALTIME_MODEL_ID",
    "SOUND_EFFECT_MODEL_ID",
    "TTS_LOCAL_MODEL_ID",
    "TTS_MODEL_ID",
    "VOICE_DESIGN_MODEL_ID",
    "AudioChunk",
    "AudioError",
    "AudioInput",
    "AudioOutput",
    "BatchEngine",
    "CheckpointError",
    "ConfigError",
    "Conversation",
    "EchoMode",
    "EchoResponder",
    "EngineError",
    "ErrorEvent",
    "Event",
    "EventStream",
    "HistoryConfig",
    "Interrupted",
    "LLMConfig",
    "LLMError",
    "LocalAudio",
    "Metrics",
    "MissingExtraError",
    "ModelError",
    "ModelRegistry",
    "MossError",
    "MqttClient",
    "MqttClientSession",
    "MqttSettings",
    "MqttWorker",
    "OpenAIChatLLM",
    "OpenAITranscriber",
    "OverloadError",
    "PastTurn",
    "PocketSphinxRecognizer",
    "RealtimeEngine",
    "RealtimeEngineConfig",
    "RemoteSpeechBackend",
    "STTError",
    "SamplingConfig",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "SileroVad",
    "SpeechBackend",
    "SpeechStream",
    "TextDelta",
    "TransportError",
    "TurnEnded",
    "TurnHandle",
    "TurnResult",
    "TurnStarted",
    "TurnTakingConfig",
    "UserStartedSpeaking",
    "UserStoppedSpeaking",
    "UserTurn",
    "WebRTCServer",
    "WebRtcEchoCanceller",
    "WordTimes",
    "WordTiming",
    "__version__",
    "converse",
    "load_audio",
    "session_handler",
    "write_wav",
]
