"""Settings of one speech server (``moss-agent speech-server``); the CLI builds them from its options."""

from __future__ import annotations

from dataclasses import dataclass

from moss_agent.errors import ConfigError

REALTIME_MODEL = "moss-tts-realtime"
# OpenAI's own speech model names, accepted for the realtime model so that code written for OpenAI
# runs unchanged against this server.
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


@dataclass(frozen=True)
class ServiceConfig:
    """What the server accepts and how it answers.

    ``token``: the bearer token every route but ``/healthz`` requires (``Authorization: Bearer
    TOKEN``); None serves without authentication (only for a trusted network or loopback).
    ``model`` / ``model_aliases``: the names ``/v1/audio/speech`` accepts for the realtime engine.
    ``max_input_chars``: longest ``input`` of one speech request (OpenAI's limit, 4096).
    ``max_body_bytes``: largest JSON body; ``max_voice_bytes`` / ``max_voice_seconds``: largest
    uploaded voice sample; ``max_uploaded_voices``: voices uploaded while the server runs (those
    given at start do not count).
    ``retry_after_s``: the ``Retry-After`` a full engine answers with.
    ``metrics_interval_s``: how often the engine's tick statistics are sampled into ``/metrics``.
    """

    token: str | None = None
    model: str = REALTIME_MODEL
    model_aliases: tuple[str, ...] = OPENAI_MODEL_ALIASES
    max_input_chars: int = 4096
    max_body_bytes: int = 64 * 1024
    max_voice_bytes: int = 16 * 1024 * 1024
    max_voice_seconds: float = 30.0  # a voice prompt stays in every turn's context
    max_uploaded_voices: int = 64
    retry_after_s: int = 1
    metrics_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.strip():
            raise ConfigError("ServiceConfig.token is empty; pass a real token, or None to serve without one")
        for name in ("max_input_chars", "max_body_bytes", "max_voice_bytes", "max_uploaded_voices"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServiceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.retry_after_s < 0:
            raise ConfigError(f"ServiceConfig.retry_after_s must be >= 0, got {self.retry_after_s}")
        if not (self.max_voice_seconds > 0 and self.metrics_interval_s > 0):
            raise ConfigError("ServiceConfig.max_voice_seconds and metrics_interval_s must be > 0")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model, *[alias for alias in self.model_aliases if alias != self.model])
