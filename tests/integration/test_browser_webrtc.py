"""Headless Chromium opens the voice page: its fake microphone (an espeak-ng WAV) reaches the server
as speech-level audio, and the page hears the agent's audio and shows its events.

Flags and loopback-only ICE follow shared/reference/chromium-webrtc-recipe.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from system_requirements import CHROMIUM, ESPEAK_NG, requires

pytest.importorskip("aiortc")

from transport_signals import RATE, rms, tone_chunks

from moss_agent.audio import load_audio
from moss_agent.transports.connection import Connection
from moss_agent.transports.webrtc import WebRTCServer

pytestmark = requires(CHROMIUM, ESPEAK_NG)
TOKEN = "browser-token"
GREETING = "hello from the agent"


class BrowserProbe:
    """The handler: speaks a tone, sends a transcript event, and measures the page's microphone."""

    def __init__(self) -> None:
        self.voiced_chunks = 0
        self.voiced_rms: list[float] = []
        self.done = asyncio.Event()
        self.stats: dict = {}
        self.received: list[np.ndarray] = []

    async def __call__(self, conn: Connection) -> None:
        await conn.send_event({"type": "turn_started", "turn_id": 1})
        # Streamed like a session does: deltas, then an empty final one.
        for piece in ("hello from", " the ", "agent", ""):
            await conn.send_event(
                {"type": "text_delta", "text": piece, "turn_id": 1, "role": "assistant", "final": not piece}
            )
        speaker = asyncio.create_task(self._speak(conn))
        try:
            async for chunk in conn.input:
                self.received.append(chunk.pcm)
                level = rms(chunk.pcm)
                if level > 0.01:  # -40 dBFS: speech, not the silence between words
                    self.voiced_chunks += 1
                    self.voiced_rms.append(level)
                self.stats = conn.info.get("client_stats", {})
                if (
                    self.voiced_chunks >= 50
                    and self.stats.get("totalAudioEnergy", 0) > 0.01
                    and self.stats.get("agentRmsPeak", 0) > 0.01
                    and GREETING in self.stats.get("transcriptTail", "")
                ):
                    self.done.set()
        finally:
            speaker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await speaker

    async def _speak(self, conn: Connection) -> None:
        for chunk in tone_chunks(440.0, 30.0, RATE, turn_id=1):
            await conn.output.write(chunk)


def envelope(pcm: np.ndarray, frame: int) -> np.ndarray:
    """20 ms RMS envelope [frames]."""
    frames = pcm[: len(pcm) // frame * frame].reshape(-1, frame)
    return np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))


def best_envelope_correlation(received: np.ndarray, source: np.ndarray, rate: int) -> float:
    """How well the received audio's envelope matches the (looping) source's at the best lag."""
    frame = rate // 50
    got = envelope(received, frame)[-150:]  # the last 3 s
    loop = envelope(source, frame)
    tiled = np.tile(loop, int(np.ceil(len(got) / len(loop))) + 2)
    return max(float(np.corrcoef(got, tiled[lag : lag + len(got)])[0, 1]) for lag in range(len(loop)))


def chromium_flags(profile: Path, wav: Path) -> list[str]:
    return [
        "--headless=new",
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns,NetworkTimeServiceQuerying",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--autoplay-policy=no-user-gesture-required",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-gpu",
    ]


def stop_browser(proc: subprocess.Popen[bytes]) -> None:
    # SIGTERM the browser alone first (it shuts its helpers down), then sweep its process group.
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=8)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


async def test_browser_page_sends_speech_and_plays_agent_audio(tmp_path: Path) -> None:
    wav = tmp_path / "speech.wav"
    text = "Hello there. I would like to know the weather in Paris tomorrow, and whether I need an umbrella."
    assert ESPEAK_NG.path is not None and CHROMIUM.path is not None
    subprocess.run([ESPEAK_NG.path, "-w", str(wav), "--", text], check=True, capture_output=True, timeout=30)
    probe = BrowserProbe()
    async with WebRTCServer(probe, token=TOKEN, loopback_only=True, input_rate=RATE) as server:
        url = f"{server.url}?token={TOKEN}&client=browser&autostart=1&processing=0"
        browser = subprocess.Popen(
            [CHROMIUM.path, *chromium_flags(tmp_path / "profile", wav), url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            await asyncio.wait_for(probe.done.wait(), 60)
        finally:
            await asyncio.to_thread(stop_browser, browser)
    # Speech level at the server (espeak-ng's WAV is about -20 dBFS), and the page heard the agent.
    assert probe.voiced_chunks >= 50
    assert float(np.median(probe.voiced_rms)) > 0.03
    assert probe.stats["packetsReceived"] > 0
    assert probe.stats["totalAudioEnergy"] > 0.01
    assert probe.stats["agentRmsPeak"] > 0.01
    assert GREETING in probe.stats["transcriptTail"]
    # It is the WAV's speech that arrived (not Chromium's fallback beeps): its envelope matches.
    source = load_audio(wav, RATE)
    assert best_envelope_correlation(np.concatenate(probe.received), source, RATE) > 0.6
