"""One exception tree for the whole package.

Every error says what was wrong and, where there is one, what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class MossError(Exception):
    """Base class of every error raised on purpose by moss_agent."""


class ConfigError(MossError, ValueError):
    """A setting or argument is invalid."""


class AudioError(MossError, ValueError):
    """Audio could not be read, written or converted (bad file, wrong rate, NaN samples...)."""


class ModelError(MossError):
    """A model could not be built, loaded or run."""


class CheckpointError(ModelError):
    """A checkpoint folder or hub id is missing, incomplete or does not match the architecture.

    ``source`` is the folder or hub id as it was given. ``remedy`` says how to pass a local folder,
    with ``{DIR}`` where the folder goes: the message reads "pass DIR"; a command line that knows
    the option the checkpoint came from sets ``option`` and shows :meth:`worded` ("pass --codec DIR").
    """

    def __init__(self, message: str, *, source: str | Path | None = None, remedy: str | None = None) -> None:
        self.problem = message
        self.source = None if source is None else str(source)
        self.remedy = remedy
        self.option: str | None = None
        super().__init__(self.worded())

    def worded(self, option: str | None = None) -> str:
        """The message; with ``option`` (such as ``--model``) the remedy names it."""
        if self.remedy is None:
            return self.problem
        folder = f"{option} DIR" if option else "DIR"
        return f"{self.problem}; {self.remedy.replace('{DIR}', folder)}"


class EngineError(MossError):
    """The inference engine failed or was used wrongly."""


class OverloadError(EngineError):
    """Every slot is busy and the waiting queue is full; retry later or add capacity."""


class SessionClosedError(MossError):
    """The session or stream was already closed."""


class TransportError(MossError):
    """A transport (sounddevice, WebRTC, MQTT) failed or received a malformed message."""


class LLMError(MossError):
    """The language model endpoint failed or returned something unusable."""


class STTError(MossError):
    """Speech recognition failed."""


class MissingExtraError(MossError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f'{module} is not installed; install it with: pip install "moss-agent[{extra}]"')
        self.module = module
        self.extra = extra
