"""Signal helpers shared by the transport tests: tones to send, and what a received signal contains."""

from __future__ import annotations

import numpy as np

from moss_agent.events import AudioChunk


def tone(freq_hz: float, seconds: float, rate: int, amplitude: float = 0.3, phase_s: float = 0.0) -> np.ndarray:
    """A sine [round(seconds * rate)] float32."""
    t = phase_s + np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def tone_chunks(freq_hz: float, seconds: float, rate: int, turn_id: int, chunk_s: float = 0.1) -> list[AudioChunk]:
    """A continuous tone cut into AudioChunks of ``chunk_s`` for turn ``turn_id``."""
    chunks = []
    n = round(seconds / chunk_s)
    for i in range(n):
        pcm = tone(freq_hz, chunk_s, rate, phase_s=i * chunk_s)
        chunks.append(AudioChunk(pcm, rate, turn_id))
    return chunks


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if len(pcm) else 0.0


def dominant_hz(pcm: np.ndarray, rate: int) -> float:
    """Frequency of the strongest FFT bin of ``pcm`` (Hann window)."""
    if len(pcm) < 64:
        return 0.0
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.argmax(spectrum) * rate / len(pcm))


def band_energy(pcm: np.ndarray, rate: int, freq_hz: float, width_hz: float = 40.0) -> float:
    """Share of the signal's spectral energy within ``width_hz`` of ``freq_hz`` (0..1)."""
    if len(pcm) < 64:
        return 0.0
    power = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm)))) ** 2
    freqs = np.fft.rfftfreq(len(pcm), 1 / rate)
    total = float(power.sum())
    if total <= 0:
        return 0.0
    return float(power[np.abs(freqs - freq_hz) <= width_hz].sum() / total)


def windows_dominated_by(pcm: np.ndarray, rate: int, freq_hz: float, window_s: float = 0.1) -> int:
    """How many ``window_s`` windows are audible and mostly a tone at ``freq_hz``."""
    size = round(window_s * rate)
    count = 0
    for start in range(0, len(pcm) - size + 1, size):
        window = pcm[start : start + size]
        if rms(window) > 0.01 and band_energy(window, rate, freq_hz) > 0.5:
            count += 1
    return count
