"""Frozen settings for a voice-agent session.

Every field has a default that works for a local demo; each dataclass validates itself on
construction so a bad value fails where it was written, with a message that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from moss_agent.errors import ConfigError

EchoMode = Literal["half_duplex", "aec", "none"]
DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer briefly, in plain spoken sentences."


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, Ollama, llama.cpp).

    Only the endpoint and its sampling: the system prompt is the session's
    (``SessionConfig.system_prompt``), so every LLM gets the same one. ``request_timeout_s`` bounds connecting and each network read; ``idle_timeout_s`` bounds the
    wait for the first and every following streamed delta, so a stalled server ends the turn.
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    api_key: str = "not-needed"
    temperature: float | None = 0.7
    top_p: float | None = None
    max_tokens: int | None = 400
    request_timeout_s: float = 30.0
    idle_timeout_s: float = 15.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.base_url), "LLMConfig.base_url is empty; give the endpoint, e.g. http://host:8000/v1")
        _check(bool(self.model), "LLMConfig.model is empty; give the served model name")
        _check(self.request_timeout_s > 0, "LLMConfig.request_timeout_s must be > 0 seconds")
        _check(self.idle_timeout_s > 0, "LLMConfig.idle_timeout_s must be > 0 seconds")
        _check(self.max_tokens is None or self.max_tokens > 0, "LLMConfig.max_tokens must be > 0 or None")


@dataclass(frozen=True, slots=True)
class TurnTakingConfig:
    """VAD turn-taking and barge-in thresholds (seconds of input audio, probabilities in [0, 1]).

    - ``min_speech_s``: speech this long starts a user turn (shorter blips are ignored).
    - ``hang_s``: silence this long ends the user turn.
    - ``min_interrupt_s``: the user must speak over the agent this long to interrupt it, so coughs
      and "mhm" do not; shorter overlaps are backchannels and start no turn.
    - ``echo_mode``: ``half_duplex`` ignores the microphone while the agent speaks and for
      ``echo_tail_s`` after (no barge-in, safe on open speakers); ``aec`` runs an echo canceller and
      ignores barge-in during the first ``aec_warmup_s`` of agent speech while it converges;
      ``none`` trusts the input to be echo-free (browser WebRTC, headsets).
    """

    speech_threshold: float = 0.5
    silence_threshold: float = 0.35
    min_speech_s: float = 0.15
    hang_s: float = 0.6
    min_interrupt_s: float = 0.5
    echo_mode: EchoMode = "none"
    echo_tail_s: float = 0.3
    aec_warmup_s: float = 1.0
    pre_roll_s: float = 0.3
    max_utterance_s: float = 30.0

    def __post_init__(self) -> None:
        _check(0.0 < self.speech_threshold <= 1.0, "speech_threshold must be in (0, 1]")
        _check(
            0.0 <= self.silence_threshold <= self.speech_threshold,
            "silence_threshold must be in [0, speech_threshold]",
        )
        for name in ("min_speech_s", "hang_s", "min_interrupt_s", "echo_tail_s", "aec_warmup_s", "pre_roll_s"):
            _check(getattr(self, name) >= 0.0, f"TurnTakingConfig.{name} must be >= 0 seconds")
        _check(self.max_utterance_s > 0, "TurnTakingConfig.max_utterance_s must be > 0 seconds")
        _check(
            self.echo_mode in ("half_duplex", "aec", "none"),
            f"echo_mode {self.echo_mode!r} is not one of 'half_duplex', 'aec', 'none'",
        )


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """Text history sent to the LLM: the system prompt is always kept; the oldest turns go first.

    ``max_chars`` approximates a token budget (about 4 characters per token in English).
    """

    max_messages: int = 40
    max_chars: int = 16000

    def __post_init__(self) -> None:
        _check(self.max_messages >= 1, "HistoryConfig.max_messages must be >= 1")
        _check(self.max_chars >= 1, "HistoryConfig.max_chars must be >= 1")


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """One conversation's settings.

    - ``system_prompt``: the LLM's system prompt; the session puts it first in the messages it
      passes to ``llm.stream`` (any LLM, not only the OpenAI one). None: no system message.
    - ``auto_respond``: answer with the LLM when the user stops speaking (needs ``llm``).
    - ``speech_system_prompt``: the TTS model's own system prompt (voice/style), not the LLM's.
    - ``event_queue_size``: per ``events()`` subscriber; when a subscriber lags, its oldest
      non-audio events are dropped (counted) so the pipeline never waits on a slow observer.
    - ``turn_queue_size``: turns waiting behind the one speaking; ``say``/``respond`` beyond it
      raise OverloadError.
    - ``audio_stall_timeout_s``: a turn whose audio stops coming (engine) or leaving (output) for
      this long ends with an ErrorEvent instead of staying "speaking" in silence; keep it above
      the LLM's own idle timeout (``LLMConfig.idle_timeout_s``).
    """

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    turns: TurnTakingConfig = field(default_factory=TurnTakingConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    auto_respond: bool = True
    speech_system_prompt: str | None = None
    event_queue_size: int = 256
    turn_queue_size: int = 8
    vad_sample_rate: int = 16000
    user_audio_sample_rate: int = 24000
    audio_stall_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        _check(self.event_queue_size >= 1, "SessionConfig.event_queue_size must be >= 1")
        _check(self.turn_queue_size >= 1, "SessionConfig.turn_queue_size must be >= 1")
        _check(self.vad_sample_rate in (8000, 16000), "SessionConfig.vad_sample_rate must be 8000 or 16000")
        _check(self.user_audio_sample_rate > 0, "SessionConfig.user_audio_sample_rate must be > 0")
        _check(self.audio_stall_timeout_s > 0, "SessionConfig.audio_stall_timeout_s must be > 0 seconds")
