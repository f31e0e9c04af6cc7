"""The speech session protocol over real sockets: one tiny engine (greedy) and its server for the module.

``Session`` on ``RemoteSpeechBackend`` gives exactly what it gives on the engine in-process; hostile
and unlucky clients (malformed, oversize, too fast, unauthorised, vanished, slow) cost the server
nothing it does not get back; engine faults arrive as the errors the engine raises.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from subprocess import PIPE
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web
from service_engine import endless_engine

from moss_agent import speech_protocol as sp
from moss_agent.client import RemoteSpeechBackend
from moss_agent.config import SessionConfig
from moss_agent.engine.realtime import RealtimeEngine
from moss_agent.errors import ConfigError, EngineError, OverloadError, SessionClosedError, TransportError
from moss_agent.events import AudioChunk
from moss_agent.service import ServiceConfig, VoiceRegistry, create_app
from moss_agent.service.app import METRICS, serve
from moss_agent.service.sessions import SessionLimits, add_session_routes, session_server
from moss_agent.streaming.session import Session
from moss_agent.streaming.tts import UserTurn

pytestmark = pytest.mark.asyncio(loop_scope="module")

FRAME_S = 0.08
CAP = 24
TOKEN = "test-token"
LIMITS = SessionLimits(heartbeat_s=0.3, max_message_bytes=256 * 1024, max_json_bytes=8 * 1024)
RNG = np.random.default_rng(5)
VOICE = (0.1 * RNG.standard_normal(12000)).astype(np.float32)  # half a second of "reference speech"
USER_AUDIO = (0.1 * RNG.standard_normal(9600)).astype(np.float32)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_realtime_endless_dir: Path, tiny_codec_dir: Path) -> AsyncIterator[RealtimeEngine]:
    async with endless_engine(tiny_realtime_endless_dir, tiny_codec_dir, CAP) as loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(engine: RealtimeEngine) -> web.Application:
    """The speech server (auth, metrics, voices), with this module's session limits."""
    voices = VoiceRegistry(engine.sample_rate)
    voices.add("alice", VOICE)
    service = create_app(engine, ServiceConfig(token=TOKEN), voices=voices, sessions=False)
    add_session_routes(service, limits=LIMITS)
    return service


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url(app: web.Application) -> AsyncIterator[str]:
    async with serve(app) as address:
        yield address


async def wait_free(engine: RealtimeEngine, slots: int, within_s: float = 1.0) -> float:
    """Seconds until ``slots`` engine slots are free (fails after ``within_s``)."""
    started = time.monotonic()
    while engine.free_slots < slots:
        assert time.monotonic() - started < within_s, (
            f"only {engine.free_slots} slots free after {within_s} s"
        )
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def raw(url: str, **kwargs: Any) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    """A bare WebSocket client (no library help); the hello is read already."""
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(
        url.replace("http", "ws") + sp.PATH, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs
    )
    assert json.loads((await ws.receive()).data)["type"] == "hello"
    return http, ws


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    while True:
        msg = await asyncio.wait_for(ws.receive(), 5)
        if msg.type == aiohttp.WSMsgType.TEXT:
            return json.loads(msg.data)  # type: ignore[no-any-return]
        assert msg.type == aiohttp.WSMsgType.BINARY, msg


# -- Session over the network equals Session in-process --------------------------------------------


class GatedOutput:
    """A speaker that plays instantly, but stops taking audio of a turn after ``stop_after[turn]``
    frames (the listener barges in there), so what was heard does not depend on timing."""

    sample_rate = 24000

    def __init__(self, stop_after: dict[int, int]) -> None:
        self.stop_after = stop_after
        self.played: dict[int, list[np.ndarray]] = {}
        self.blocked = asyncio.Event()
        self._gate = asyncio.Event()

    async def write(self, chunk: AudioChunk) -> None:
        played = self.played.setdefault(chunk.turn_id, [])
        if len(played) >= self.stop_after.get(chunk.turn_id, 10**9):
            self.blocked.set()
            await self._gate.wait()
            return
        played.append(chunk.pcm.copy())

    async def flush(self) -> None:
        return None

    def clear(self) -> None:
        self._gate.set()

    def played_s(self, turn_id: int) -> float:
        return sum(len(p) for p in self.played.get(turn_id, [])) / self.sample_rate

    def on_progress(self, callback: Any) -> None:
        return None


async def two_turns(
    backend: Any, voice: np.ndarray, user_audio: np.ndarray
) -> tuple[list[Any], dict[int, np.ndarray]]:
    """Turn 1 is cut after 5 frames were heard; turn 2 (after the user's audio) plays to its end."""
    output = GatedOutput({1: 5})
    config = SessionConfig(system_prompt="You are terse.")
    async with Session(backend, output=output, config=config, voice_prompt=voice) as session:
        first = session.say("A long first answer that the listener will cut short, halfway through it.")
        await asyncio.wait_for(output.blocked.wait(), 10)
        cut = await session.interrupt()
        assert cut is not None and cut.interrupted
        second = session.respond(["And the ", "second answer ", "plays to its end."],
                                 user_text="Go on.", user_audio=user_audio)  # fmt: skip
        results = [await first, await asyncio.wait_for(second, 20)]
    audio = {turn: np.concatenate(chunks) for turn, chunks in output.played.items()}
    return results, audio


async def test_a_session_over_the_network_equals_the_session_in_process(
    engine: RealtimeEngine, app: web.Application, url: str
) -> None:
    metrics = app[METRICS]
    first_audio = metrics.value("moss_first_audio_seconds_count")
    local_results, local_audio = await two_turns(engine, VOICE, USER_AUDIO)
    async with RemoteSpeechBackend(url, token=TOKEN, encoding="pcm_f32le") as remote:
        remote_results, remote_audio = await two_turns(remote, VOICE, USER_AUDIO)

    for local, over in zip(local_results, remote_results, strict=True):
        assert over.error is None and local.error is None
        assert (over.text, over.heard_text, over.heard_s, over.audio_s, over.interrupted) == (
            local.text, local.heard_text, local.heard_s, local.audio_s, local.interrupted
        )  # fmt: skip
    assert remote_results[0].interrupted and remote_results[0].heard_s == pytest.approx(5 * FRAME_S, abs=0.01)
    assert remote_results[0].heard_text and not remote_results[1].interrupted
    assert sorted(remote_audio) == sorted(local_audio) == [1, 2]
    for turn, pcm in local_audio.items():
        assert np.array_equal(remote_audio[turn], pcm), f"turn {turn} differs"
    await wait_free(engine, 2)
    assert metrics.value("moss_first_audio_seconds_count") == first_audio + 2  # one per turn
    assert (
        metrics.value("moss_chunk_gap_seconds_count") > 0 and metrics.value("moss_conversations_active") == 0
    )


async def one_turn(backend: Any, voice: np.ndarray, user_audio: np.ndarray) -> tuple[list[np.ndarray], Any]:
    conversation = await backend.open_conversation(system_prompt="Be brief.", voice_prompt=voice)
    stream = await conversation.start_turn(UserTurn("Hello?", user_audio), turn_id=3)
    for delta in ["Sixteen ", "bits ", "each."]:
        await stream.push_text(delta)
    await stream.end_input()
    chunks = [chunk async for chunk in stream]
    assert all(c.turn_id == 3 for c in chunks)
    heard = await stream.interrupt(7.5 * FRAME_S)
    await conversation.aclose()
    return [chunk.pcm for chunk in chunks], heard


async def test_pcm16_carries_the_engine_frames_rounded_to_16_bits(engine: RealtimeEngine, url: str) -> None:
    # pcm_s16le also rounds the uploads (voice, user audio): the in-process reference gets them rounded
    voice, user_audio = sp.quantize(VOICE, "pcm_s16le"), sp.quantize(USER_AUDIO, "pcm_s16le")
    local, local_heard = await one_turn(engine, voice, user_audio)
    async with RemoteSpeechBackend(url, token=TOKEN) as remote:
        over, heard = await one_turn(remote, VOICE, USER_AUDIO)
    assert heard == local_heard and heard.frames == 8
    assert len(over) == len(local) == CAP
    for a, b in zip(over, local, strict=True):
        assert np.array_equal(a, sp.quantize(b, "pcm_s16le"))


async def test_registered_and_unknown_voices(url: str) -> None:
    async with RemoteSpeechBackend(url, token=TOKEN, voice="alice") as remote:
        assert remote.voices == ["alice", "default"] and remote.sample_rate == 24000
        conversation = await remote.open_conversation()
        await conversation.aclose()
        await (await remote.open_conversation(voice="default")).aclose()
        with pytest.raises(ConfigError, match="unknown voice 'bob'; this server has: alice, default"):
            await remote.open_conversation(voice="bob")


# -- admission and limits ----------------------------------------------------------------------


async def test_a_full_engine_answers_busy_and_a_closed_conversation_frees_its_slot(
    engine: RealtimeEngine, app: web.Application, url: str
) -> None:
    metrics = app[METRICS]
    busy = metrics.value("moss_rejected_total", {"reason": "busy"})
    async with RemoteSpeechBackend(url, token=TOKEN) as remote:
        held = [await remote.open_conversation() for _ in range(2)]
        with pytest.raises(OverloadError, match="busy") as caught:
            await remote.open_conversation()
        assert caught.value.retry_after_s == LIMITS.retry_after_s  # type: ignore[attr-defined]
        assert metrics.value("moss_rejected_total", {"reason": "busy"}) == busy + 1
        assert metrics.value("moss_conversations_active") == 2
        await held[0].aclose()
        again = await remote.open_conversation()
        for conversation in (again, held[1]):
            await conversation.aclose()
    await wait_free(engine, 2)


async def test_a_vanished_client_frees_its_slots_within_a_second(engine: RealtimeEngine, url: str) -> None:
    # reset: the client's socket is torn down without a close frame
    http, ws = await raw(url)
    await ws.send_json({"type": "open", "id": 1})
    assert (await next_json(ws))["type"] == "opened"
    await ws.send_json({"type": "turn.start", "id": 2, "conversation": 1, "turn": 1, "window": 4})
    assert (await next_json(ws))["type"] == "turn.started"
    assert engine.free_slots == 1
    ws._response.connection.transport.abort()  # type: ignore[union-attr]
    assert await wait_free(engine, 2) < 1.0
    await http.close()

    # silent: the client stops answering pings (and reading) but keeps its socket open
    http, ws = await raw(url, autoping=False)
    await ws.send_json({"type": "open", "id": 1})
    assert (await next_json(ws))["type"] == "opened"
    assert engine.free_slots == 1
    assert await wait_free(engine, 2) < 1.0  # heartbeat 0.3 s: a pong is missed within 0.45 s
    await http.close()


async def test_a_start_turn_given_up_on_is_settled_before_the_next_turn(
    engine: RealtimeEngine, url: str
) -> None:
    async with RemoteSpeechBackend(url, token=TOKEN) as remote:
        conversation = await remote.open_conversation()
        # given up on at once (still queued on the server), then later: while the server starts it,
        # or once it started (the reply may even have arrived; then the caller closes it as usual)
        for turn_id, wait_s in enumerate([0.0, 0.002, 0.01], start=1):
            starting = asyncio.create_task(conversation.start_turn(UserTurn("Hi"), turn_id=10 * turn_id))
            await asyncio.sleep(0)  # the request is on its way
            await asyncio.sleep(wait_s)
            starting.cancel()
            await asyncio.wait([starting])
            if not starting.cancelled():
                await starting.result().aclose()
            stream = await conversation.start_turn(None, turn_id=10 * turn_id + 1)  # not "still open"
            await stream.push_text("The turn after the one given up on.")
            await stream.end_input()
            assert (await anext(aiter(stream))).turn_id == 10 * turn_id + 1
            await stream.aclose()
        await conversation.aclose()


async def test_word_timings_stream_with_the_audio_and_heard_lists_the_words_heard(url: str) -> None:
    text = "one two three, four five six. seven eight nine ten eleven twelve"
    http, ws = await raw(url)
    await ws.send_json({"type": "open", "id": 1})
    conversation = (await next_json(ws))["conversation"]
    turn = {"conversation": conversation, "turn": 1}
    await ws.send_json({"type": "turn.start", "id": 2, **turn, "window": CAP})
    assert (await next_json(ws))["type"] == "turn.started"
    await ws.send_json({"type": "text", "id": 3, **turn, "delta": text})
    await ws.send_json({"type": "end_input", "id": 4, **turn})
    streamed, frames = [], 0
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type == aiohttp.WSMsgType.BINARY:
            frames += 1
            await ws.send_json({"type": "credit", **turn, "frames": 1})
            continue
        message = json.loads(msg.data)
        if message["type"] == "words":
            assert not message["final"] and message["turn"] == 1
            streamed += message["words"]
        elif message["type"] == "turn.end":
            break
    # this tiny model never stops by itself: the frame cap ends the turn, with no final timings
    assert frames == CAP and streamed, "no word was settled while the turn played"
    assert [w["text"] for w in streamed] == text.split()[: len(streamed)]
    assert all(w["end_s"] <= frames * FRAME_S for w in streamed)
    heard_s = 1.0
    await ws.send_json({"type": "interrupt", "id": 5, **turn, "heard_s": heard_s})
    heard = await next_json(ws)
    while heard["type"] != "heard":
        heard = await next_json(ws)
    words = [w["text"] for w in heard["words"]]
    assert words and words == text.split()[: len(words)] and all(w["end_s"] <= heard_s for w in heard["words"])
    assert len(" ".join(words)) < len(heard["text"])  # the model had read further than it spoke
    await http.close()


async def test_a_slow_reader_holds_the_engine_and_nothing_piles_up(engine: RealtimeEngine, url: str) -> None:
    async with RemoteSpeechBackend(url, token=TOKEN, audio_window=4) as remote:
        conversation = await remote.open_conversation()
        stream = await conversation.start_turn(None, turn_id=1)
        await stream.push_text("Nobody reads this audio for a while.")
        await stream.end_input()
        await asyncio.sleep(0.6)  # 7 frames of time, far more on this engine: it would finish the turn
        engine_stream = next(s for s in engine._streams if s is not None)
        ahead = round(engine.config.max_ahead_s / FRAME_S)
        assert engine_stream.produced_frames <= 4 + ahead  # the window, then the engine's own hold
        assert len(stream._queue) <= 4
        assert len([chunk async for chunk in stream]) == CAP  # reading lets it go on to the end
        await conversation.aclose()


async def test_malformed_messages_get_typed_errors_and_the_socket_stays_usable(url: str) -> None:
    http, ws = await raw(url)
    cases = [
        ("[" * 2000 + "]" * 2000, "levels deep"),
        ('{"type": "open", "id": 1, "id": 2}', "duplicate key"),
        ("not json at all", "not valid JSON"),
        ('["open"]', "must be a JSON object"),
        ('{"type": "teleport", "id": 3}', "unknown message type"),
        ('{"type": "open"}', "needs an 'id'"),
        ('{"type": "open", "id": 4, "encoding": "mp3"}', "'encoding' must be one of"),
        ('{"type": "open", "id": 5, "system_prompt": 7}', "'system_prompt' must be a string"),
        ('{"type": "text", "id": 6, "conversation": 99, "turn": 1, "delta": "hi"}', "not open"),
        (
            '{"type": "open", "id": 7, "voice_audio": {"samples": 99999999, "sample_rate": 24000}}',
            "at most 120 s",
        ),
        ('{"type": "interrupt", "id": 8, "conversation": 1, "turn": 1, "heard_s": -1}', "not open"),
        ('{"type": "open", "id": 9, "padding": "' + "x" * 9000 + '"}', "larger than 8192 bytes"),
    ]
    for data, words in cases:
        await ws.send_str(data)
        reply = await next_json(ws)
        assert reply["type"] == "error" and words in reply["message"], (data[:40], reply)
        assert reply["code"] in {"bad_message", "closed", "invalid"}
    await ws.send_bytes(b"\x01\x02")  # a binary message shorter than a header
    assert (await next_json(ws))["code"] == "bad_message"
    await ws.send_json({"type": "open", "id": 10})
    assert (await next_json(ws))["type"] == "opened"  # still usable
    await ws.close()
    await http.close()


async def test_an_oversize_message_closes_the_socket_with_1009(engine: RealtimeEngine, url: str) -> None:
    http, ws = await raw(url)
    await ws.send_json({"type": "open", "id": 1})
    assert (await next_json(ws))["type"] == "opened"
    await ws.send_bytes(bytes(LIMITS.max_message_bytes + 1))
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == sp.CLOSE_TOO_BIG
    await http.close()
    await wait_free(engine, 2)


async def test_unauthorised_clients_are_refused(url: str) -> None:
    for token in ("wrong", None):
        with pytest.raises(TransportError, match="refused the token"):
            await RemoteSpeechBackend(url, token=token).start()


async def test_limits_of_a_strict_server(engine: RealtimeEngine) -> None:
    strict = SessionLimits(max_sockets=1, messages_per_s=20, message_burst=10, max_conversations_per_socket=1)
    async with session_server(engine, limits=strict) as strict_url:
        first = await RemoteSpeechBackend(strict_url).start()
        with pytest.raises(OverloadError, match="is full"):
            await RemoteSpeechBackend(strict_url).start()  # close code 1013
        conversation = await first.open_conversation()
        conn = first._connections[0]
        with pytest.raises(OverloadError, match="already has 1 conversations") as caught:
            await conn.request({"type": "open"})
        assert caught.value.code == "too_many"  # type: ignore[attr-defined]
        for _ in range(30):  # a flood of pings: over the rate, the server closes with 1008
            conn.post({"type": "ping"})
        with pytest.raises(TransportError, match="broke a limit"):
            await asyncio.wait_for(conversation.start_turn(None, turn_id=1), 5)
        await first.aclose()
        await wait_free(engine, 2)


async def test_a_server_shutting_down_ends_its_conversations_with_a_clear_error(
    engine: RealtimeEngine,
) -> None:
    async with session_server(engine) as plain_url:
        remote = await RemoteSpeechBackend(plain_url).start()
        conversation = await remote.open_conversation()
    await wait_free(engine, 2)
    with pytest.raises(EngineError, match="shutting down"):
        await conversation.start_turn(None, turn_id=1)
    await conversation.aclose()
    await remote.aclose()


# -- engine faults -----------------------------------------------------------------------------


class FailingStep:
    """The generator, except that ``step`` raises once on its ``at``-th call (a CUDA error, say)."""

    def __init__(self, target: Any, at: int) -> None:
        self.target, self.at, self.calls = target, at, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("injected fault in step")
        return self.target.step(*args, **kwargs)


async def test_an_engine_fault_ends_the_turn_with_engine_error_and_the_conversation_goes_on(
    engine: RealtimeEngine, app: web.Application, url: str
) -> None:
    errors = app[METRICS].value("moss_errors_total", {"kind": "engine"})
    async with RemoteSpeechBackend(url, token=TOKEN) as remote:
        conversation = await remote.open_conversation()
        real = engine.generator
        engine.generator = FailingStep(real, at=6)  # type: ignore[assignment]
        try:
            stream = await conversation.start_turn(UserTurn("Hi"), turn_id=1)
            await stream.push_text("This turn meets a fault on the device.")
            await stream.end_input()
            got = []
            with pytest.raises(EngineError, match="injected fault in step"):
                async for chunk in stream:
                    got.append(chunk)
        finally:
            engine.generator = real
        heard = await stream.interrupt(len(got) * FRAME_S)  # the frames made before the fault stay
        assert heard.frames == len(got)
        after = await conversation.start_turn(None, turn_id=2)
        await after.push_text("And the next turn works.")
        await after.end_input()
        assert len([chunk async for chunk in after]) == CAP
        await conversation.aclose()
        with pytest.raises(SessionClosedError):
            await conversation.start_turn(None, turn_id=3)
    assert engine.healthy
    assert app[METRICS].value("moss_errors_total", {"kind": "engine"}) == errors + 1


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_the_client_imports_no_torch() -> None:
    code = "import sys, moss_agent.client, moss_agent.speech_protocol; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_the_cli_speaks_through_engine_url_without_loading_a_model(url: str, tmp_path: Path) -> None:
    import soundfile as sf

    text = "Spoken by the server's engine."
    wav = tmp_path / "say.wav"
    command = [sys.executable, "-m", "moss_agent.cli", "say", text, "-o", str(wav), "--engine-url", url]
    env = {**os.environ, "MOSS_ENGINE_TOKEN": TOKEN}
    proc = await asyncio.create_subprocess_exec(*command, env=env, stdout=PIPE, stderr=PIPE)
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    written, rate = sf.read(wav, dtype="float32")
    assert rate == 24000 and len(written) == CAP * 1920 and np.abs(written).max() > 0.01
    # (pcm_s16le clips the tiny model's loud noise before the output limiter: bit-equality with the
    # in-process run holds for pcm_f32le, tested above)
