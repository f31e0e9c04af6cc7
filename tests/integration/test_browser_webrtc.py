"""Headless Chromium opens the voice page, the way a person uses it, against a real WebRTCServer.

One browser, driven over DevTools (``moss_agent.testing.chromium``): its fake microphone (an
espeak-ng WAV) reaches the server as speech-level audio; a scripted agent speaks turns the way a
session does (events, then audio written at an engine's pace), with one tab and then two; the page
reports the samples it concealed per turn (printed, not asserted: they depend on the machine), shows
server figures in ms and RTF as a ratio, puts an interruption on its reply's line, shows a generic
message for an LLM failure, can hang up and call again, and says what to do when the call cannot
connect (ICE fails; the server has no network address).

Flags and loopback-only ICE follow shared/reference/chromium-webrtc-recipe.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from system_requirements import CHROMIUM, ESPEAK_NG, requires

pytest.importorskip("aiortc")

import aioice.ice
from transport_signals import RATE, rms, tone

from moss_agent.audio import load_audio
from moss_agent.events import AudioChunk, ErrorEvent
from moss_agent.testing.chromium import Chromium, Tab
from moss_agent.transports.connection import Connection, error_event, event_to_json
from moss_agent.transports.webrtc import WebRTCServer

pytestmark = requires(CHROMIUM, ESPEAK_NG)
TOKEN = "browser-token"
LLM_URL = "http://10.9.8.7:8000/v1"
CHUNK_S = 0.08  # one codec frame of the realtime engine
ENGINE_PACE_S = 0.05  # how long the fake engine takes per frame: faster than real time, like a GPU


class ScriptedAgent:
    """The handler: keeps each connection for the test to speak on, and measures the microphone."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[Connection] = asyncio.Queue()
        self.voiced_chunks = 0
        self.voiced_rms: list[float] = []
        self.received: list[np.ndarray] = []

    async def __call__(self, conn: Connection) -> None:
        if conn.client_id == "full":  # what session_handler does when no engine slot is free
            await conn.send_event(error_event("the agent could not start: every slot is busy", code="unavailable", fatal=True))
            return
        await self.connections.put(conn)
        async for chunk in conn.input:
            if conn.client_id == "one":
                self.received.append(chunk.pcm)
                level = rms(chunk.pcm)
                if level > 0.01:  # -40 dBFS: speech, not the silence between words
                    self.voiced_chunks += 1
                    self.voiced_rms.append(level)


async def speak_turn(
    conn: Connection, turn_id: int, *, seconds: float = 0.8, interrupt_after_s: float | None = None
) -> None:
    """One agent turn as a session sends it: events, audio at the engine's pace, metrics."""
    await conn.send_event({"type": "turn_started", "turn_id": turn_id})
    for piece in (f"reply {turn_id}", " from the agent", ""):
        await conn.send_event(
            {"type": "text_delta", "text": piece, "turn_id": turn_id, "role": "assistant", "final": not piece}
        )
    pcm = tone(330.0 + 20 * turn_id, seconds, RATE)
    step = round(CHUNK_S * RATE)
    for start in range(0, len(pcm), step):
        await conn.output.write(AudioChunk(pcm[start : start + step], RATE, turn_id))
        await asyncio.sleep(ENGINE_PACE_S)
    if interrupt_after_s is not None:
        while conn.output.played_s(turn_id) < interrupt_after_s:
            await asyncio.sleep(0.02)
        conn.output.clear()
        await conn.send_event(
            {"type": "interrupted", "turn_id": turn_id, "heard_s": conn.output.played_s(turn_id)}
        )
    else:
        await conn.output.flush()
    values = {"e2e_s": 0.512, "tts_ttfa_s": 0.104, "rtf": 0.682, "frames": round(seconds / CHUNK_S)}
    await conn.send_event({"type": "metrics", "turn_id": turn_id, "values": values})
    await asyncio.sleep(0.3)  # the silence between turns


async def page_turns(conn: Connection, turn_ids: list[int]) -> dict[str, Any]:
    """The page's per-turn report (sent with its stats), once it covers ``turn_ids``."""
    async with asyncio.timeout(20):
        while True:
            turns = conn.info.get("client_stats", {}).get("turns", {})
            if (
                all(isinstance(turns.get(str(t), {}).get("concealedSamples"), int) for t in turn_ids[:-1])
                and str(turn_ids[-1]) in turns
            ):
                return turns
            await asyncio.sleep(0.1)


def report(label: str, conns: list[Connection], turn_ids: list[int]) -> None:
    for conn in conns:
        turns = conn.info.get("client_stats", {}).get("turns", {})
        outbound = conn.info["outbound"]
        for turn_id in turn_ids:
            page = turns.get(str(turn_id), {})
            server = outbound["turns"].get(turn_id, {})
            print(
                f"{label} {conn.client_id} turn {turn_id}: concealed {page.get('concealedSamples')} samples"
                f" ({page.get('silentConcealedSamples')} silent, {page.get('concealmentEvents')} events),"
                f" heard after {page.get('heardMs') or 0:.0f} ms; server: gaps {server.get('gaps', 0)},"
                f" held {1000 * server.get('held_s', 0.0):.0f} ms"
            )
        print(
            f"{label} {conn.client_id} outbound: {json.dumps({k: v for k, v in outbound.items() if k != 'turns'})}"
        )


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


BUTTONS = (
    "['start','interrupt','hangup'].map((id) => document.getElementById(id).disabled ? '-' : id).join(' ')"
)
TRANSCRIPT = "document.getElementById('transcript').textContent"


async def connected(tab: Tab) -> None:
    await tab.wait_for("document.getElementById('status').textContent === 'connected'"
                       " && !document.getElementById('interrupt').disabled")  # fmt: skip


async def next_connection(agent: ScriptedAgent, client_id: str) -> Connection:
    async with asyncio.timeout(30):
        conn = await agent.connections.get()
    assert conn.client_id == client_id
    return conn


async def test_the_page_in_chromium(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    wav = tmp_path / "speech.wav"
    text = "Hello there. I would like to know the weather in Paris tomorrow, and whether I need an umbrella."
    assert ESPEAK_NG.path is not None and CHROMIUM.path is not None
    subprocess.run([ESPEAK_NG.path, "-w", str(wav), "--", text], check=True, capture_output=True, timeout=30)
    agent = ScriptedAgent()
    caplog.set_level(logging.WARNING, logger="moss_agent.transports.webrtc")
    server = WebRTCServer(agent, token=TOKEN, loopback_only=True, input_rate=RATE, connect_timeout_s=10)
    async with server, Chromium(CHROMIUM.path, tmp_path / "profile", fake_audio=wav) as browser:
        page = f"{server.url}?token={TOKEN}&autostart=1&processing=0"
        one = await browser.open(f"{page}&client=one")
        conn = await next_connection(agent, "one")
        await connected(one)

        # One tab: three turns; the second is interrupted, the third fails at the LLM.
        await speak_turn(conn, 1)
        await speak_turn(conn, 2, seconds=2.0, interrupt_after_s=0.4)
        await speak_turn(conn, 3)
        failure = f"turn 3: text failed: LLM request to {LLM_URL} failed (connection): error: refused"
        await conn.send_event(event_to_json(ErrorEvent(failure, 3, detail={"kind": "connection"})))
        turns = await page_turns(conn, [1, 2, 3])
        report("one tab", [conn], [1, 2, 3])
        assert all(turns[str(t)]["concealedSamples"] >= 0 for t in (1, 2, 3))

        # Two tabs speaking at once.
        two = await browser.open(f"{page}&client=two")
        conn_two = await next_connection(agent, "two")
        await connected(two)
        await asyncio.gather(speak_turn(conn, 11), speak_turn(conn_two, 11))
        await asyncio.gather(speak_turn(conn, 12), speak_turn(conn_two, 12))
        await asyncio.gather(page_turns(conn, [11, 12]), page_turns(conn_two, [11, 12]))
        report("two tabs", [conn, conn_two], [11, 12])
        await two.close()

        # The microphone's speech arrived (espeak-ng's WAV is about -20 dBFS), and it is the WAV's.
        assert agent.voiced_chunks >= 50
        assert float(np.median(agent.voiced_rms)) > 0.03
        source = load_audio(wav, RATE)
        assert best_envelope_correlation(np.concatenate(agent.received), source, RATE) > 0.6
        stats = conn.info["client_stats"]
        assert (
            stats["packetsReceived"] > 0 and stats["totalAudioEnergy"] > 0.01 and stats["agentRmsPeak"] > 0.01
        )

        # What the page shows: figures in ms and RTF as a ratio, the interruption on its reply's
        # line, and a generic message for the LLM failure (its address stays on the server).
        figures = await one.evaluate(
            "[...document.querySelectorAll('#turns tr')].map((r) => r.cells[3].textContent)"
        )
        assert "e2e 512 ms" in figures[0] and "rtf 0.68" in figures[0] and "rtf 682" not in figures[0], (
            figures
        )
        gaps = await one.evaluate(
            "[...document.querySelectorAll('#turns tr')].map((r) => r.cells[2].textContent)"
        )
        assert all(cell.isdigit() for cell in gaps[:3]), gaps
        reply = await one.evaluate("document.querySelector('p.assistant[data-turn=\"2\"]').textContent")
        assert re.fullmatch(r"reply 2 from the agent \[interrupted after \d+\.\d s\]", reply), reply
        transcript = await one.evaluate(TRANSCRIPT)
        assert "language model did not answer" in transcript
        assert "10.9.8.7" not in transcript and "error: error" not in transcript, transcript
        assert any(LLM_URL in record.getMessage() for record in caplog.records)

        # Hang up, then call again from the same page.
        await one.evaluate("document.getElementById('hangup').click()")
        assert await one.evaluate(BUTTONS) == "start - -"
        await asyncio.wait_for(conn.closed.wait(), 10)
        await one.evaluate("document.getElementById('start').click()")
        again = await next_connection(agent, "one")
        await connected(one)
        assert await one.evaluate(BUTTONS) == "- interrupt hangup"
        await speak_turn(again, 21)
        await one.wait_for("document.querySelector('p.assistant[data-turn=\"21\"]')")
        await one.evaluate("document.getElementById('hangup').click()")

        # The agent refuses the call (no free slot) and hangs up: the page says why and can call again.
        full = await browser.open(f"{page}&client=full")
        await full.wait_for(f"{TRANSCRIPT}.includes('every slot is busy') && document.getElementById('status')"
                            ".textContent === 'the agent ended the call'")  # fmt: skip
        assert await full.evaluate(BUTTONS) == "start - -"

        # A call whose ICE cannot work (relay only, no TURN server: the browser offers no address):
        # the page says so within its connect timeout and can call again; the server logs it.
        relay = await browser.open(f"{page}&client=relay&relay=1&connect_timeout=3")
        shown = await relay.wait_for(
            f"{TRANSCRIPT}.includes('could not be set up') && {TRANSCRIPT}", timeout_s=20
        )
        assert "--loopback-only" in shown and "offered no" in shown, shown
        assert await relay.evaluate(BUTTONS) == "start - -"
        assert any("offer has no ICE candidate" in record.getMessage() for record in caplog.records)

        # A host whose only interface is loopback (aioice offers no address): the offer is refused
        # at once, the page says to use --loopback-only, and the server logs the same advice.
        monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: [])
        caplog.clear()
        async with WebRTCServer(agent, token=TOKEN, input_rate=RATE) as bare:
            assert "no network interface" in caplog.text  # at start, before any browser calls
            tab = await browser.open(f"{bare.url}?token={TOKEN}&autostart=1&client=bare")
            shown = await tab.wait_for(f"{TRANSCRIPT}.includes('refused') && {TRANSCRIPT}", timeout_s=20)
            assert "(503)" in shown and "--loopback-only" in shown, shown
            assert await tab.evaluate(BUTTONS) == "start - -"
    assert any("--loopback-only" in record.getMessage() and "no network interface" in record.getMessage()
               for record in caplog.records)  # fmt: skip
