"""Signal helpers shared by the transport tests: tones to send, and what a received signal contains."""

from __future__ import annotations

import asyncio
import contextlib
import re

import numpy as np

from moss_agent.events import AudioChunk
from moss_agent.transports.connection import Connection

RATE = 24_000


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


def _number(client_id: str) -> int:
    return int(re.sub(r"\D", "", client_id) or 0)


def agent_tone_hz(client_id: str) -> float:
    """The agent answers each client with its own tone, so cross-talk would show."""
    return 300.0 + 100.0 * _number(client_id)


def mic_tone_hz(client_id: str) -> float:
    return 1000.0 + 200.0 * _number(client_id)


async def tone_agent(conn: Connection) -> None:
    """A real handler: speaks a per-client tone (turn 1), reports what it hears, and on ``interrupt``
    clears the output and answers with turn 2 at twice the frequency while turn 1 keeps writing."""
    freq = agent_tone_hz(conn.client_id)
    heard: list[np.ndarray] = []
    await conn.send_event({"type": "hello", "client": conn.client_id, "connection": conn.id, **conn.info})

    async def listen() -> None:
        async for chunk in conn.input:
            heard.append(chunk.pcm)

    async def speak(turn_id: int, hz: float, seconds: float) -> None:
        for chunk in tone_chunks(hz, seconds, RATE, turn_id):
            await conn.output.write(chunk)

    tasks = [asyncio.create_task(listen()), asyncio.create_task(speak(1, freq, 8.0))]
    try:
        async for message in conn.control:
            if message["type"] == "text" and message["text"] == "report":
                pcm = np.concatenate(heard) if heard else np.zeros(0, np.float32)
                tail = pcm[-RATE // 2 :]
                await conn.send_event(
                    {"type": "report", "seconds": len(pcm) / RATE, "hz": dominant_hz(tail, RATE), "rms": rms(tail)}
                )
            elif message["type"] == "interrupt":
                conn.output.clear()
                await conn.send_event({"type": "interrupted", "heard_s": conn.output.played_s(1)})
                tasks.append(asyncio.create_task(speak(2, 2 * freq, 1.5)))
            elif message["type"] == "close":
                break
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
