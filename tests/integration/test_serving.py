"""session_handler behind a real WebRTCServer with the real RealtimeEngine on tiny checkpoints.

A Python WebRTC peer on 127.0.0.1 plays espeak-ng speech as its microphone; the server side hears it
(Silero VAD), recognises it (PocketSphinx with a grammar), answers through the LLM seam (the echo
responder) and speaks through the engine; the client gets the audio and the JSON events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from system_requirements import ESPEAK_NG, requires

pytest.importorskip("aiortc")

from moss_agent.config import SessionConfig, TurnTakingConfig
from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.events import AudioChunk
from moss_agent.models.realtime import SamplingConfig
from moss_agent.serving import session_handler
from moss_agent.streaming.llm import EchoResponder
from moss_agent.testing.speech import silence, synthesize_speech
from moss_agent.transports.webrtc import WebRTCServer
from moss_agent.transports.webrtc_client import WebRTCClient

TOKEN = "serving-token"
RATE = 24_000
TIMEOUT_S = 40


async def load_engine(model: Path, codec: Path, *, slots: int, max_frames: int) -> RealtimeEngine:
    config = RealtimeEngineConfig(
        num_slots=slots, max_waiting=0, max_context=2048, max_frames_per_turn=max_frames,
        sampling=SamplingConfig(greedy=True),
    )  # fmt: skip
    return await asyncio.to_thread(RealtimeEngine.load, model, codec, device="cpu", config=config)


def energy_vad() -> Any:
    from moss_agent.testing.vad import EnergyVad

    return EnergyVad()


async def serve(engine: RealtimeEngine, *, vad_factory: Callable[[], Any], stt: Any) -> WebRTCServer:
    config = SessionConfig(turns=TurnTakingConfig(hang_s=0.5))
    handler = session_handler(engine, llm_factory=EchoResponder, vad_factory=vad_factory, stt=stt, config=config)
    server = WebRTCServer(
        handler, token=TOKEN, loopback_only=True, input_rate=RATE, output_rate=engine.sample_rate, handler_grace_s=5.0
    )
    await server.start()
    return server


async def until(client: WebRTCClient, kind: str, seen: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The next event of ``kind`` whose fields equal ``match``; every event read goes to ``seen``."""
    try:
        async with asyncio.timeout(20):
            async for event in client.events():
                seen.append(event)
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
    except TimeoutError:
        raise AssertionError(f"no {kind!r} event {match} within 20 s; saw {seen}") from None
    raise AssertionError(f"the connection closed before a {kind!r} event {match}; saw {seen}")


async def agent_audio(client: WebRTCClient, seconds: float) -> np.ndarray:
    """Read the agent's track until ``seconds`` of non-silent audio have arrived."""
    heard: list[np.ndarray] = []
    async for chunk in client.input:
        if float(np.sqrt(np.mean(chunk.pcm**2))) > 1e-3:
            heard.append(chunk.pcm)
            if sum(len(p) for p in heard) >= seconds * chunk.sample_rate:
                break
    return np.concatenate(heard)


async def speak_into(client: WebRTCClient, pcm: np.ndarray) -> None:
    """Play ``pcm`` as the client's microphone (paced in real time by the client's track)."""
    for start in range(0, len(pcm), 2400):
        await client.output.write(AudioChunk(pcm[start : start + 2400], RATE, turn_id=-1))


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(15):
        while not condition():
            await asyncio.sleep(0.05)


@pytest.fixture
async def connected() -> AsyncIterator[Callable[..., Any]]:
    clients: list[WebRTCClient] = []

    async def connect(server: WebRTCServer, client_id: str) -> WebRTCClient:
        client = WebRTCClient(server.url, token=TOKEN, client_id=client_id, loopback_only=True)
        await client.connect()
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.close()


@requires(ESPEAK_NG)
async def test_a_spoken_question_gets_a_spoken_answer(
    tiny_realtime_dir: Path, tiny_codec_dir: Path, connected: Callable[..., Any]
) -> None:
    from moss_agent.speech.stt import PocketSphinxRecognizer
    from moss_agent.speech.vad import SileroVad

    stt = await asyncio.to_thread(PocketSphinxRecognizer, grammar=["hello there", "good morning", "thank you"])
    engine = await load_engine(tiny_realtime_dir, tiny_codec_dir, slots=1, max_frames=30)
    speech = np.concatenate([silence(0.3, RATE), synthesize_speech("good morning", RATE), silence(1.2, RATE)])
    async with engine, asyncio.timeout(TIMEOUT_S):
        server = await serve(engine, vad_factory=SileroVad, stt=stt)
        try:
            client = await connected(server, "mic")
            seen: list[dict[str, Any]] = []
            await until(client, "ready", seen)
            await speak_into(client, speech)
            user = await until(client, "text_delta", seen, role="user")
            assert user["text"] == "good morning" and user["final"]
            started = await until(client, "turn_started", seen)
            turn = started["turn_id"]
            heard = await agent_audio(client, 0.2)  # the engine's voice reaches the peer
            assert float(np.sqrt(np.mean(heard**2))) > 1e-3
            metrics = await until(client, "metrics", seen, turn_id=turn)
            # The echo responder answered the transcript, streamed as text deltas of this turn.
            said = "".join(e["text"] for e in seen if e["type"] == "text_delta" and e.get("turn_id") == turn)
            assert said == "You said: good morning"
            assert any(e["type"] == "turn_ended" and e["turn_id"] == turn for e in seen)
            assert metrics["values"]["audio_s"] > 0 and metrics["values"]["stt_s"] is not None
        finally:
            await server.stop()


async def test_interrupt_control_message_stops_the_agent(connected: Callable[..., Any]) -> None:
    from moss_agent.testing.backend import FakeSpeechBackend

    backend = FakeSpeechBackend(sample_rate=RATE)  # one 80 ms tone frame per character: a 6 s answer
    async with asyncio.timeout(TIMEOUT_S):
        server = await serve(backend, vad_factory=energy_vad, stt=None)  # type: ignore[arg-type]
        try:
            client = await connected(server, "talker")
            seen: list[dict[str, Any]] = []
            await until(client, "ready", seen)
            await client.send_control({"type": "text", "text": "please tell me a long story about the sea"})
            turn = (await until(client, "turn_started", seen))["turn_id"]
            await agent_audio(client, 0.3)
            await client.send_control({"type": "interrupt"})
            interrupted = await until(client, "interrupted", seen, turn_id=turn)
            assert 0 < interrupted["heard_s"] < 3.0
            assert (await until(client, "metrics", seen, turn_id=turn))["values"]["interrupted"]
            assert not any(e["type"] == "turn_ended" for e in seen)
            # The conversation goes on after the interrupt.
            await client.send_control({"type": "text", "text": "ok"})
            second = (await until(client, "turn_started", seen))["turn_id"]
            ended = await until(client, "turn_ended", seen, turn_id=second)
            assert ended["text"] == "You said: ok"
        finally:
            await server.stop()
        assert not backend.active  # the session closed with the server and released its slot


async def test_two_clients_get_their_own_sessions_and_a_leaving_client_frees_its_slot(
    tiny_realtime_dir: Path, tiny_codec_dir: Path, connected: Callable[..., Any]
) -> None:
    engine = await load_engine(tiny_realtime_dir, tiny_codec_dir, slots=2, max_frames=8)
    async with engine, asyncio.timeout(TIMEOUT_S):
        server = await serve(engine, vad_factory=energy_vad, stt=None)
        try:
            alice, bob = await asyncio.gather(connected(server, "alice"), connected(server, "bob"))
            logs: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}
            for client, name in ((alice, "alice"), (bob, "bob")):
                await until(client, "ready", logs[name])
                await client.send_control({"type": "text", "text": f"this is {name}"})

            async def answer(client: WebRTCClient, name: str) -> str:
                started = await until(client, "turn_started", logs[name])
                await until(client, "metrics", logs[name], turn_id=started["turn_id"])
                return "".join(e["text"] for e in logs[name] if e["type"] == "text_delta" and e.get("role") != "user")

            said = await asyncio.gather(answer(alice, "alice"), answer(bob, "bob"))
            assert said == ["You said: this is alice", "You said: this is bob"]
            assert engine.free_slots == 0

            # Both slots are held: a third client is told so instead of hanging.
            carol = await connected(server, "carol")
            refused = await until(carol, "error", [])
            assert refused["code"] == "unavailable" and refused["fatal"]

            # Alice vanishes without a goodbye: her session closes and her slot comes back.
            await alice.close()
            await wait_until(lambda: engine.free_slots == 1, "alice's slot to be freed")
            dave = await connected(server, "dave")
            dave_log: list[dict[str, Any]] = []
            await until(dave, "ready", dave_log)
            await dave.send_control({"type": "text", "text": "hi"})
            started = await until(dave, "turn_started", dave_log)
            await until(dave, "metrics", dave_log, turn_id=started["turn_id"])
            await dave.send_control({"type": "close"})
            await wait_until(lambda: engine.free_slots == 1, "dave's slot to be freed")
        finally:
            await server.stop()
        assert engine.free_slots == 2
