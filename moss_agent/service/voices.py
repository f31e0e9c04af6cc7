"""Voices a speech server offers: reference speech by name, given at start or uploaded.

The registry is a read-only ``Mapping`` of name -> float32 mono reference speech at the engine's
rate (what ``open_conversation(voice_prompt=...)`` takes), shared by the OpenAI endpoint and the
session protocol. ``DEFAULT_VOICE`` ("default") is always there and means no reference: the model's
own voice. Names are 1-64 letters, digits, ``_``, ``-`` or ``.``; a voice's id is its name.

A server whose uploaded voices must be seen by other servers (the replicas of a Ray Serve
deployment) is given a :class:`SharedVoices`: uploads and deletes then go through it, and it mirrors
every server's uploads into this registry. Without one (the plain server) an upload stays here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from moss_agent.errors import ConfigError

DEFAULT_VOICE = "default"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class VoiceEntry:
    name: str
    pcm: np.ndarray | None  # None: the model's own voice
    created_at: int
    uploaded: bool

    def describe(self, sample_rate: int) -> dict[str, object]:
        """OpenAI's voice object, plus how long the reference is and whether it was uploaded."""
        seconds = 0.0 if self.pcm is None else round(self.pcm.shape[0] / sample_rate, 3)
        return {
            "id": self.name, "object": "audio.voice", "name": self.name, "type": "audio_sample",
            "created_at": self.created_at, "uploaded": self.uploaded, "seconds": seconds,
        }  # fmt: skip


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"voice name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.'")
    return name


class VoiceRegistry(Mapping[str, np.ndarray]):
    """Name -> reference speech (float32 mono at ``sample_rate``); "default" maps to no reference
    and is left out of iteration by the Mapping view (``entries()`` lists it)."""

    def __init__(self, sample_rate: int, *, max_uploaded: int = 64) -> None:
        self.sample_rate = sample_rate
        self.max_uploaded = max_uploaded
        self._entries: dict[str, VoiceEntry] = {
            DEFAULT_VOICE: VoiceEntry(DEFAULT_VOICE, None, int(time.time()), uploaded=False)
        }

    # -- Mapping: the voices that carry reference speech ------------------------------------------

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if entry.pcm is None:
            raise KeyError(name)
        return entry.pcm

    def __iter__(self) -> Iterator[str]:
        return (name for name, entry in self._entries.items() if entry.pcm is not None)

    def __len__(self) -> int:
        return sum(entry.pcm is not None for entry in self._entries.values())

    # -- the server's view ----------------------------------------------------------------------

    def entries(self) -> list[VoiceEntry]:
        return list(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def lookup(self, name: str) -> VoiceEntry | None:
        return self._entries.get(name)

    @property
    def uploaded(self) -> int:
        return sum(entry.uploaded for entry in self._entries.values())

    def check_upload(self, name: str) -> None:
        """ConfigError unless an upload may take ``name`` (a count limit aside): not the reserved
        name, nor that of a voice given at start."""
        check_name(name)
        if name == DEFAULT_VOICE:
            raise ConfigError(f"the voice name {DEFAULT_VOICE!r} is reserved for the model's own voice")
        old = self._entries.get(name)
        if old is not None and not old.uploaded:
            raise ConfigError(f"voice {name!r} was given at start and cannot be replaced")

    def add(
        self, name: str, pcm: np.ndarray, *, uploaded: bool = False, created_at: int | None = None
    ) -> VoiceEntry:
        """Register ``pcm`` (float32 mono at ``sample_rate``) as ``name``; an uploaded voice may
        replace an uploaded one, never one given at start. ``created_at``: its Unix time (default now)."""
        check_name(name)
        if name == DEFAULT_VOICE:
            raise ConfigError(f"the voice name {DEFAULT_VOICE!r} is reserved for the model's own voice")
        old = self._entries.get(name)
        if uploaded:
            self.check_upload(name)
            if old is None and self.uploaded >= self.max_uploaded:
                raise ConfigError(
                    f"this server already holds {self.max_uploaded} uploaded voices; delete one first"
                )
        samples = np.ascontiguousarray(pcm, dtype=np.float32)
        if samples.ndim != 1 or samples.size == 0:
            raise ConfigError(f"voice {name!r}: expected non-empty mono audio, got shape {samples.shape}")
        entry = VoiceEntry(name, samples, int(time.time()) if created_at is None else created_at, uploaded)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> bool:
        """Forget an uploaded voice; False when there is none by that name."""
        entry = self._entries.get(name)
        if entry is None or not entry.uploaded:
            return False
        del self._entries[name]
        return True

    def load_file(self, name: str, path: str | Path, *, max_seconds: float | None = None) -> VoiceEntry:
        """Register the reference speech in the audio file ``path`` (any format moss_agent.audio reads)."""
        from moss_agent.audio import load_audio

        return self.add(name, load_audio(path, self.sample_rate, max_seconds=max_seconds))


class SharedVoices(Protocol):
    """Uploaded voices kept where every server of a deployment sees them, mirrored into each
    server's registry (``moss_agent.service.ray_voices`` is the Ray Serve one). The app calls it
    instead of changing its registry on an upload or a delete, and lets it catch up when a request
    names a voice the registry lacks."""

    async def publish(self, name: str, pcm: np.ndarray) -> VoiceEntry:
        """Upload ``pcm`` as ``name`` for every server; returns this registry's new entry.
        ConfigError when the voices are full (or too long); EngineError when the store is unreachable."""
        ...

    async def unpublish(self, name: str) -> bool:
        """Forget the uploaded voice ``name`` everywhere; False when there is none."""
        ...

    async def sync(self) -> None:
        """Bring the registry's uploaded voices up to date with the store's (EngineError when unreachable)."""
        ...


def parse_voice_option(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` from ``--voice`` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ConfigError(f"--voice {text!r}: expected NAME=PATH, e.g. --voice alice=alice.wav")
    return check_name(name), Path(path)
