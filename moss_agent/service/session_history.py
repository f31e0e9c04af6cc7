"""The ``turns`` of a session ``open``: a conversation's earlier turns, read from a hostile client.

An ``open`` may carry ``turns``, a list of ``{"role": "user"|"assistant", "text": "...", "audio":
{"samples": N, "sample_rate": R}}`` (``audio`` optional for a user turn, required for an assistant
turn, as ``moss_agent.streaming.tts.check_history`` says). Their audio, like a ``voice_audio``,
comes as an upload: ONE upload for the request, holding the declared parts one after another
(``voice_audio`` first, then each turn's audio in turn order), chunks numbered on across them.
Everything is checked before anything is accepted: the number of turns, each text, each audio part
(``max_upload_s``) and all turn audio together (``max_history_audio_s``). Structural faults (not a
list, an unknown role) are ``bad_message``; values over a limit or refused are ``invalid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moss_agent import speech_protocol as sp
from moss_agent.errors import ConfigError, TransportError
from moss_agent.events import FloatArray
from moss_agent.streaming.tts import PastTurn

ROLES = ("user", "assistant")


@dataclass(frozen=True)
class AudioPart:
    """One declared piece of audio: its samples and their rate."""

    samples: int
    sample_rate: int


@dataclass(frozen=True)
class TurnSpec:
    role: str
    text: str
    audio: AudioPart | None


def read_audio_part(spec: Any, max_upload_s: float, what: str) -> AudioPart | None:
    """A declared ``{"samples", "sample_rate"}`` -> AudioPart (None for no samples), checked."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise TransportError(f"{what} must be an object")
    rate = sp.field_int(spec, "sample_rate", low=8000, high=192000)
    samples = sp.field_int(spec, "samples")
    if samples > max_upload_s * rate:
        raise ConfigError(f"{what} of {samples / rate:.1f} s; at most {max_upload_s:g} s are accepted")
    return AudioPart(samples, rate) if samples else None


def read_turns(message: dict[str, Any], limits: Any) -> list[TurnSpec]:
    """The checked ``turns`` of an ``open`` (``limits``: the server's SessionLimits)."""
    turns = message.get("turns")
    if turns is None:
        return []
    if not isinstance(turns, list):
        raise TransportError("'turns' must be a list of turns")
    if len(turns) > limits.max_history_turns:
        raise ConfigError(f"'turns' has {len(turns)} turns; at most {limits.max_history_turns} are accepted")
    specs: list[TurnSpec] = []
    seconds = 0.0
    for index, turn in enumerate(turns):
        what = f"turns[{index}]"
        if not isinstance(turn, dict):
            raise TransportError(f"{what} must be an object")
        role = turn.get("role")
        if role not in ROLES:
            raise TransportError(f"{what}.role must be 'user' or 'assistant', got {str(role)[:40]!r}")
        text = turn.get("text")
        if not isinstance(text, str):
            raise TransportError(f"{what}.text must be a string")
        if len(text) > limits.max_text_chars:
            raise ConfigError(f"{what}.text has {len(text)} characters; at most {limits.max_text_chars} are accepted")
        audio = read_audio_part(turn.get("audio"), limits.max_upload_s, f"{what}.audio")
        if role == "assistant" and audio is None:
            raise ConfigError(
                f"{what} is an assistant turn without audio; the model has no layout for assistant text "
                "without its speech: send the audio the listener heard, or leave the turn out"
            )
        if audio is not None:
            seconds += audio.samples / audio.sample_rate
        specs.append(TurnSpec(role, text, audio))
    if seconds > limits.max_history_audio_s:
        raise ConfigError(
            f"the turns hold {seconds:.1f} s of audio; at most {limits.max_history_audio_s:g} s are accepted"
        )
    return specs


class OpenUpload:
    """The audio parts one ``open`` declared, received as one upload and split back into parts."""

    def __init__(self, voice: AudioPart | None, turns: list[TurnSpec]) -> None:
        self.voice = voice
        self.turns = turns
        self.parts = [part for part in (voice, *(turn.audio for turn in turns)) if part is not None]
        self.samples = sum(part.samples for part in self.parts)

    def split(self, pcm: FloatArray | None) -> tuple[tuple[FloatArray, int] | None, list[PastTurn]]:
        """All the uploaded samples (None: nothing was declared) -> (voice audio and its rate, turns)."""
        pieces: list[tuple[FloatArray, int]] = []
        if pcm is not None:
            bounds = np.cumsum([0, *(part.samples for part in self.parts)])
            pieces = [
                (pcm[start:end], part.sample_rate)
                for part, start, end in zip(self.parts, bounds[:-1], bounds[1:], strict=True)
            ]
        at = iter(pieces)
        voice = next(at) if self.voice is not None else None
        turns = []
        for spec in self.turns:
            if spec.audio is None:
                turns.append(PastTurn(spec.role, spec.text))  # type: ignore[arg-type]
            else:
                audio, rate = next(at)
                turns.append(PastTurn(spec.role, spec.text, audio, rate))  # type: ignore[arg-type]
        return voice, turns
