"""Validated requests for the batch TTS models, one type per use, turned into prompt messages.

Audio (voices to clone, audio to continue) is given as codec codes [T, n_vq]; the engine encodes
waveforms with the shared codec first. Texts may mix languages, Pinyin with tone numbers
(``ni3 hao3``) and IPA between slashes (``/həˈloʊ/``): the models read them as plain text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moss_agent.errors import ConfigError
from moss_agent.models.delay.dialogue import normalize_dialogue
from moss_agent.models.delay.processor import BatchPrompt, Message, Mode, TTSProcessor

FRAMES_PER_SECOND = 12.5
MAX_SPEAKERS = 5
_SPEAKER_TAG = re.compile(r"\[S(\d+)\]")


def _text(value: object, name: str, *, required: bool = True) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{name} is empty; give some text")


def _codes(value: object, name: str) -> None:
    if value is not None and not isinstance(value, torch.Tensor):
        raise ConfigError(
            f"{name} must be codec codes (a tensor [T, n_vq]) or None, got {type(value).__name__}"
        )


def _positive_int(value: object, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of 12.5 Hz frames, got {value!r}")


@dataclass(frozen=True)
class TTSRequest:
    """Speech for ``text`` (MOSS-TTS, Delay or Local).

    reference: codes of a voice to clone. tokens: target length in 12.5 Hz frames (a hint the
    model was trained with, not enforced). language: e.g. "English", "Chinese". continuation:
    codes of audio to continue; ``text`` must then start with that audio's transcript.
    """

    text: str
    reference: torch.Tensor | None = None
    tokens: int | None = None
    language: str | None = None
    continuation: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _text(self.text, "TTSRequest.text")
        _codes(self.reference, "TTSRequest.reference")
        _codes(self.continuation, "TTSRequest.continuation")
        _positive_int(self.tokens, "TTSRequest.tokens")
        _text(self.language, "TTSRequest.language", required=False)

    def messages(self, processor: TTSProcessor) -> tuple[list[Message], Mode]:
        user = processor.user_message(
            text=self.text,
            reference=None if self.reference is None else [self.reference],
            tokens=self.tokens,
            language=self.language,
        )
        if self.continuation is None:
            return [user], "generation"
        return [user, processor.assistant_message([self.continuation])], "continuation"


@dataclass(frozen=True)
class DialogueRequest:
    """A multi-speaker dialogue (MOSS-TTSD): ``script`` uses ``[S1]``..``[S5]`` speaker tags.

    references[i] are codes of speaker S{i+1}'s voice (None: not cloned). With references and
    ``continue_from_references`` (the upstream app layout) the references are also the start of the
    assistant audio, so the script must begin with their transcripts (``[S1] ref text [S2] ...``).
    ``normalize`` applies the TTSD app's script clean-up (``normalize_dialogue``) first.
    """

    script: str
    references: Sequence[torch.Tensor | None] = ()
    continue_from_references: bool = True
    normalize: bool = False

    def __post_init__(self) -> None:
        _text(self.script, "DialogueRequest.script")
        script = normalize_dialogue(self.script) if self.normalize else self.script
        speakers = [int(k) for k in _SPEAKER_TAG.findall(script)]
        if not speakers:
            raise ConfigError("DialogueRequest.script has no speaker tags; mark turns with [S1], [S2], ...")
        if min(speakers) < 1 or max(speakers) > MAX_SPEAKERS:
            raise ConfigError(f"speaker tags must be [S1]..[S{MAX_SPEAKERS}], got [S{max(speakers)}]")
        if len(self.references) > MAX_SPEAKERS:
            raise ConfigError(f"at most {MAX_SPEAKERS} speaker references, got {len(self.references)}")
        for index, codes in enumerate(self.references):
            _codes(codes, f"DialogueRequest.references[{index}]")

    def messages(self, processor: TTSProcessor) -> tuple[list[Message], Mode]:
        given = [c for c in self.references if c is not None]
        script = normalize_dialogue(self.script) if self.normalize else self.script
        user = processor.user_message(text=script, reference=list(self.references) if given else None)
        if not given or not self.continue_from_references:
            return [user], "generation"
        prompt_audio = torch.cat([processor.assistant_message([c]).audio[0] for c in given])
        return [user, processor.assistant_message([prompt_audio])], "continuation"


@dataclass(frozen=True)
class VoiceDesignRequest:
    """Speech for ``text`` in a voice described by ``instruction`` (MOSS-VoiceGenerator)."""

    instruction: str
    text: str

    def __post_init__(self) -> None:
        _text(self.instruction, "VoiceDesignRequest.instruction")
        _text(self.text, "VoiceDesignRequest.text")

    def messages(self, processor: TTSProcessor) -> tuple[list[Message], Mode]:
        return [processor.user_message(text=self.text, instruction=self.instruction)], "generation"


@dataclass(frozen=True)
class SoundEffectRequest:
    """An ambient sound from a ``description`` (MOSS-SoundEffect), optionally of ``duration_s`` seconds."""

    description: str
    duration_s: float | None = None

    def __post_init__(self) -> None:
        _text(self.description, "SoundEffectRequest.description")
        if self.duration_s is not None:
            if isinstance(self.duration_s, bool) or not isinstance(self.duration_s, int | float):
                raise ConfigError(f"SoundEffectRequest.duration_s must be seconds, got {self.duration_s!r}")
            if not 0 < self.duration_s <= 600:
                raise ConfigError(
                    f"SoundEffectRequest.duration_s must be in (0, 600] seconds, got {self.duration_s}"
                )

    @property
    def tokens(self) -> int | None:
        return None if self.duration_s is None else max(1, round(self.duration_s * FRAMES_PER_SECOND))

    def messages(self, processor: TTSProcessor) -> tuple[list[Message], Mode]:
        return [processor.user_message(ambient_sound=self.description, tokens=self.tokens)], "generation"


Request = TTSRequest | DialogueRequest | VoiceDesignRequest | SoundEffectRequest


def prepare_batch(processor: TTSProcessor, requests: Sequence[Request]) -> BatchPrompt:
    """Requests -> one left-padded prompt batch (generation and continuation may be mixed)."""
    if isinstance(requests, TTSRequest | DialogueRequest | VoiceDesignRequest | SoundEffectRequest):
        raise ConfigError(f"expected a list of requests, got one {type(requests).__name__}: pass [request]")
    if not requests:
        raise ConfigError("no requests given")
    conversations: list[list[Message]] = []
    modes: list[Mode] = []
    for request in requests:
        if not isinstance(request, TTSRequest | DialogueRequest | VoiceDesignRequest | SoundEffectRequest):
            raise ConfigError(f"unsupported request type {type(request).__name__}")
        messages, mode = request.messages(processor)
        conversations.append(messages)
        modes.append(mode)
    return processor(conversations, modes)
