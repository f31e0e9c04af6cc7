"""Long texts for the batch engine: split at sentence ends into bounded pieces, join their audio.

Pieces are generated independently (and batched), so each boundary is joined with a short
equal-power crossfade; the models end and start pieces near silence, and the fade hides the
remaining waveform step.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from moss_agent.errors import ConfigError

# Sentence ends: ASCII .!?; (followed by space or the end) and their full-width / CJK forms.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|(?<=[。！？；…])\s*|\n+")
# Weaker breaks for sentences that are still too long on their own.
_CLAUSE_END = re.compile(r"(?<=[,:])\s+|(?<=[，、：])\s*")
_TURN_START = re.compile(r"(?=\[S\d+\])")
_TAG = re.compile(r"(\[S\d+\])\s*")


def split_text(text: str, max_chars: int = 300) -> list[str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters, breaking at sentence ends
    (then clause ends, then spaces, then anywhere) and packing whole sentences greedily.

    Joined with single spaces the pieces give back the text up to whitespace.
    """
    if max_chars < 8:
        raise ConfigError(f"max_chars must be at least 8, got {max_chars}")
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    units: list[str] = []
    for sentence in _parts(_SENTENCE_END, text):
        if len(sentence) <= max_chars:
            units.append(sentence)
            continue
        for clause in _parts(_CLAUSE_END, sentence):
            units.extend(_hard_split(clause, max_chars) if len(clause) > max_chars else [clause])
    return _pack(units, max_chars, _joiner)


def split_dialogue(script: str, max_chars: int = 300) -> list[str]:
    """Split a ``[S1] ... [S2] ...`` script into pieces of whole turns (at most ``max_chars`` each
    where a turn allows); an over-long turn is split by sentences, each part keeping its tag."""
    turns = [t.strip() for t in _TURN_START.split(script.strip()) if t.strip()]
    units: list[str] = []
    for turn in turns:
        if len(turn) <= max_chars:
            units.append(turn)
            continue
        match = _TAG.match(turn)
        tag, body = (match.group(1), turn[match.end() :]) if match else ("", turn)
        units.extend(f"{tag} {part}".strip() for part in split_text(body, max(8, max_chars - len(tag) - 1)))
    return _pack(units, max_chars, lambda left, right: " ")


def _pack(units: list[str], max_chars: int, joiner: Callable[[str, str], str]) -> list[str]:
    """Greedily join consecutive units while a piece stays within ``max_chars``."""
    pieces: list[str] = []
    for unit in units:
        if pieces and len(pieces[-1]) + 1 + len(unit) <= max_chars:
            pieces[-1] = f"{pieces[-1]}{joiner(pieces[-1], unit)}{unit}"
        else:
            pieces.append(unit)
    return pieces


def _parts(pattern: re.Pattern[str], text: str) -> list[str]:
    return [p.strip() for p in pattern.split(text) if p.strip()]


def _joiner(left: str, right: str) -> str:
    # CJK text carries no spaces between sentences.
    return "" if _is_cjk(left[-1]) or _is_cjk(right[0]) else " "


def _is_cjk(char: str) -> bool:
    return "\u2e80" <= char <= "\u9fff" or "\u3000" <= char <= "\u303f" or "\uff00" <= char <= "\uffef"


def _hard_split(text: str, max_chars: int) -> list[str]:
    out: list[str] = []
    while len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        cut = cut if cut > max_chars // 2 else max_chars
        out.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        out.append(text)
    return out


def stitch(pieces: list[np.ndarray], sample_rate: int, *, crossfade_s: float = 0.02) -> np.ndarray:
    """Join float32 waveforms [T_i] -> [sum T_i - (n-1) * crossfade].

    Each boundary overlaps the last ``crossfade`` samples of the left piece with the first of the
    right one under equal-power (sine / cosine) gains, so neither a level step nor a loudness dip
    is heard. Empty pieces are skipped; pieces shorter than the crossfade are butt-joined.
    """
    parts = [np.asarray(p, dtype=np.float32).reshape(-1) for p in pieces]
    parts = [p for p in parts if p.size]
    if not parts:
        return np.zeros(0, np.float32)
    fade = max(1, round(crossfade_s * sample_rate))
    ramp = (np.arange(fade, dtype=np.float64) + 0.5) / fade
    fade_in = np.sin(0.5 * np.pi * ramp).astype(np.float32)
    fade_out = np.cos(0.5 * np.pi * ramp).astype(np.float32)
    chunks = [parts[0]]
    for right in parts[1:]:
        left = chunks[-1]
        if len(left) < fade or len(right) < fade:
            chunks.append(right)
            continue
        chunks[-1] = left[:-fade]
        chunks.append(left[-fade:] * fade_out + right[:fade] * fade_in)
        chunks.append(right[fade:])
    return np.concatenate(chunks)
