"""Make intelligible test speech offline with the espeak-ng synthesizer (Debian package ``espeak-ng``).

Used by tests of voice activity detection and speech recognition, and by users who want to feed
their own agents a known utterance without a microphone.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from moss_agent.audio import load_audio
from moss_agent.errors import ConfigError

__all__ = ["ESPEAK_MISSING_REASON", "espeak_ng_path", "silence", "synthesize_speech"]

ESPEAK_MISSING_REASON = "espeak-ng is not installed (apt-get install espeak-ng) to synthesize test speech"


def espeak_ng_path() -> str | None:
    """Path of the espeak-ng binary, or None when it is not installed."""
    return shutil.which("espeak-ng")


def synthesize_speech(
    text: str,
    sample_rate: int = 24000,
    voice: str = "en-us",
    rate: int = 150,
    *,
    timeout_s: float = 30.0,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng: returns float32 mono [T] at ``sample_rate``.

    ``rate`` is in words per minute (espeak-ng's ``-s``; 80-450). Raises ConfigError when espeak-ng
    is missing or rejects the arguments (e.g. an unknown voice).
    """
    binary = espeak_ng_path()
    if binary is None:
        raise ConfigError(ESPEAK_MISSING_REASON)
    if not text.strip():
        raise ConfigError("synthesize_speech needs some text to speak")
    with tempfile.TemporaryDirectory(prefix="moss_espeak_") as folder:
        wav = Path(folder) / "speech.wav"
        # "--" keeps text that starts with a dash from being read as an option.
        command = [binary, "-v", voice, "-s", str(int(rate)), "-w", str(wav), "--", text]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ConfigError(f"espeak-ng did not finish within {timeout_s} s") from exc
        if result.returncode != 0 or not wav.exists() or wav.stat().st_size <= 44:
            raise ConfigError(
                f"espeak-ng failed for voice {voice!r} (exit {result.returncode}): {result.stderr.strip()}"
            )
        return load_audio(wav, sample_rate)


def silence(seconds: float, sample_rate: int = 24000) -> np.ndarray:
    """float32 zeros [round(seconds * sample_rate)], for padding speech."""
    return np.zeros(round(seconds * sample_rate), dtype=np.float32)
