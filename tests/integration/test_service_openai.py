"""The speech server's OpenAI-compatible API, auth, health and metrics over real sockets.

One tiny engine (greedy, one slot, no waiting queue, turns capped at CAP frames) and one server on
an ephemeral port serve the whole module; the official ``openai`` client talks to it unchanged.
The engine's generator is wrapped so that the last test can break its device for good.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from moss_agent.audio import decode_audio_bytes, pcm16_to_float, wav_bytes
from moss_agent.client import RemoteSpeechBackend
from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.engine.stitch import split_text
from moss_agent.errors import TransportError
from moss_agent.models.realtime import SamplingConfig
from moss_agent.service import ServiceConfig, VoiceRegistry, create_app, serve
from moss_agent.service.batch_speech import BATCH_MODELS, CHUNK_SECONDS
from moss_agent.service.openai_speech import TURN_CHARS

pytestmark = pytest.mark.asyncio(loop_scope="module")

BATCH_MODEL = "moss-tts-tiny"
CAP = 10  # frames per turn: the endless tiny model always speaks exactly this many
FRAME = 1920  # samples per frame at 24 kHz
TOKEN = "s3cret-token"
TEXT = "Hello from the speech server."
RNG = np.random.default_rng(11)
ALICE = (0.1 * RNG.standard_normal(12000)).astype(np.float32)


class Breakable:
    """The engine's generator, but after ``fail_after_frames(n)`` the tick after the next n frames
    raises once (the engine ends that turn and goes on), and once ``broken`` every ``has_work``
    raises (a dead device)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.broken = False
        self._frames_left: int | None = None

    def fail_after_frames(self, frames: int) -> None:
        self._frames_left = frames

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.target, name)
        if name == "has_work":

            def has_work(*args: Any, **kwargs: Any) -> Any:
                if self.broken:
                    raise RuntimeError("injected device fault")
                return attr(*args, **kwargs)

            return has_work
        if name == "step":

            def step(*args: Any, **kwargs: Any) -> Any:
                if self._frames_left is not None and self._frames_left <= 0:
                    self._frames_left = None
                    raise RuntimeError("injected tick fault")
                out = attr(*args, **kwargs)
                if self._frames_left is not None:
                    self._frames_left -= int(out.produced.sum())
                return out

            return step
        return attr


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_realtime_endless_dir: Path, tiny_codec_dir: Path) -> AsyncIterator[RealtimeEngine]:
    config = RealtimeEngineConfig(
        num_slots=1, max_waiting=0, max_context=512, max_frames_per_turn=CAP,
        sampling=SamplingConfig(greedy=True), max_ahead_s=0.24, call_timeout_s=5.0,
    )  # fmt: skip
    loaded = await asyncio.to_thread(
        RealtimeEngine.load, tiny_realtime_endless_dir, tiny_codec_dir, device="cpu", config=config
    )
    real = RealtimeEngine(Breakable(loaded.generator), loaded.codec, config)
    async with real:
        yield real


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine: RealtimeEngine, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, Any]]:
    from moss_agent.engine.batch import BatchEngine
    from moss_agent.models.tts_loading import load_tts
    from moss_agent.options import ensure_tiny_batch_checkpoint
    from moss_agent.service.batch_speech import add_batch_engines

    voices = VoiceRegistry(engine.sample_rate, max_uploaded=2)
    voices.add("alice", ALICE)
    app = create_app(engine, ServiceConfig(token=TOKEN, max_voice_bytes=200_000, max_voice_seconds=5.0),
                     voices=voices)  # fmt: skip
    # The tiny Delay model on the realtime engine's codec and device thread, as speech-server --batch-model does.
    tts = await asyncio.to_thread(load_tts, ensure_tiny_batch_checkpoint(tmp_path_factory.mktemp("batch")), "cpu")
    # the tiny random Delay may end at once: every answer gets at least 12 frames, as with --tiny
    engines = {BATCH_MODEL: BatchEngine(tts, engine.codec, device_thread=engine.device_thread)}
    add_batch_engines(app, engines, min_frames=12)
    async with serve(app) as url:
        yield url, app


@pytest.fixture
def url(server: tuple[str, Any]) -> str:
    return server[0]


def client(url: str, token: str = TOKEN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)


async def wait_free(engine: RealtimeEngine, within_s: float = 1.0) -> None:
    started = time.monotonic()
    while engine.free_slots < 1:
        assert time.monotonic() - started < within_s, f"the slot is still taken after {within_s} s"
        await asyncio.sleep(0.01)


async def get(
    url: str, path: str, token: str | None = TOKEN, **headers: str
) -> tuple[int, dict[str, str], str]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http, http.get(url + path, headers=headers) as response:
        return response.status, dict(response.headers), await response.text()


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, text = await get(url, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- speech through the official client ------------------------------------------------------------


async def test_the_openai_client_streams_pcm_speech(url: str, engine: RealtimeEngine) -> None:
    chunks: list[bytes] = []
    async with client(url).audio.speech.with_streaming_response.create(
        model="moss-tts-realtime", voice="alice", input=TEXT, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        assert response.headers["x-request-id"]
        async for chunk in response.iter_bytes():
            chunks.append(chunk)
    data = b"".join(chunks)
    assert len(data) == CAP * FRAME * 2  # PCM16, 24 kHz: every frame the engine made, nothing else
    audio = pcm16_to_float(data)
    assert np.abs(audio).max() <= 0.9 and np.abs(audio).max() > 0.01  # limited to -1 dBFS, not silent
    await wait_free(engine)


async def test_wav_and_mp3_decode_to_the_same_length_at_24_khz(url: str) -> None:
    speech = client(url).audio.speech
    long_text = " ".join(f"This is sentence number {k} of a text too long for one turn." for k in range(5))
    turns = len(split_text(long_text, TURN_CHARS))
    assert turns == 2
    async with speech.with_streaming_response.create(
        model="tts-1", voice={"id": "alice"}, input=long_text, response_format="wav"
    ) as response:
        wav = await response.read()
    with wave.open(io.BytesIO(wav)) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (24000, 1, 2)
    assert decode_audio_bytes(wav, 24000).shape[0] == turns * CAP * FRAME  # one stream, turn after turn
    async with speech.with_streaming_response.create(
        model="moss-tts-realtime", voice="default", input=TEXT, response_format="mp3"
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        mp3 = await response.read()
    decoded = decode_audio_bytes(mp3, 24000)
    # an mp3 encoder adds its delay and pads the last frame (1152 samples)
    assert CAP * FRAME <= decoded.shape[0] <= CAP * FRAME + 3 * 1152


async def test_sse_sends_audio_deltas_and_one_done_event(url: str) -> None:
    events: list[dict[str, Any]] = []
    async with client(url).audio.speech.with_streaming_response.create(
        model="moss-tts-realtime", voice="alice", input=TEXT, response_format="pcm", stream_format="sse"
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    kinds = [event["type"] for event in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(event["audio"]) for event in events[:-1])
    assert len(audio) == CAP * FRAME * 2
    assert events[-1]["usage"]["output_frames"] == CAP


async def test_speed_changes_the_tempo(url: str) -> None:
    async with client(url).audio.speech.with_streaming_response.create(
        model="moss-tts-realtime", voice="alice", input=TEXT, response_format="pcm", speed=2.0
    ) as response:
        samples = len(await response.read()) // 2
    # half the samples, give or take the time stretch's window at the ends (atempo, WSOLA)
    assert abs(samples - CAP * FRAME / 2) <= 0.05 * CAP * FRAME


async def test_models_and_voices_are_listed(url: str) -> None:
    models = await client(url).models.list()
    ids = [model.id for model in models.data]
    assert ids[0] == "moss-tts-realtime" and "tts-1" in ids
    extra = models.data[0].model_extra or {}
    assert {"pcm", "wav", "mp3"} <= set(extra["response_formats"]) and extra["sample_rate"] == 24000
    status, _, text = await get(url, "/v1/audio/voices")
    assert status == 200
    assert {voice["id"] for voice in json.loads(text)["data"]} == {"default", "alice"}


async def test_a_batch_model_is_listed_and_streams_its_audio_once_made(url: str, server: tuple[str, Any]) -> None:
    models = await client(url).models.list()
    batch = [model for model in models.data if (model.model_extra or {}).get("engine") == "batch"]
    assert [model.id for model in batch] == [BATCH_MODEL]
    async with client(url).audio.speech.with_streaming_response.create(
        model=BATCH_MODEL, voice="alice", input=TEXT, response_format="wav"
    ) as response:
        assert response.headers["content-type"] == "audio/wav"
        audio = decode_audio_bytes(await response.read(), 24000)
    assert audio.size >= FRAME  # whole codec frames of the tiny Delay model
    body = {"model": BATCH_MODEL, "voice": "default", "input": TEXT, "response_format": "pcm", "stream_format": "sse"}
    async with aiohttp.ClientSession() as http, http.post(
        url + "/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        status, text = response.status, await response.text()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1]["type"] == "speech.audio.done" and len(events) >= 2
    sizes = [len(base64.b64decode(event["audio"])) for event in events[:-1]]
    assert max(sizes) < 2 * round(2 * CHUNK_SECONDS * 24000)  # in chunks (give or take the limiter), not one body
    assert sum(sizes) == 2 * round(events[-1]["usage"]["audio_seconds"] * 24000)

    # Batch requests in flight are bounded: one more is answered 503 busy with Retry-After.
    models = server[1][BATCH_MODELS]
    models.pending = models.max_pending  # as if that many were being made
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            await client(url).audio.speech.create(model=BATCH_MODEL, voice="default", input=TEXT)
    finally:
        models.pending = 0
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "1"
    assert refused.value.code == "engine_busy"


async def test_an_uploaded_voice_speaks_and_can_be_deleted(url: str, engine: RealtimeEngine) -> None:
    api = client(url)
    sample = wav_bytes((0.1 * RNG.standard_normal(16000)).astype(np.float32), 16000)
    voice = await api.audio.voices.create(
        name="bob", audio_sample=("bob.wav", sample, "audio/wav"), consent="none"
    )
    assert voice.id == "bob" and voice.object == "audio.voice"
    async with api.audio.speech.with_streaming_response.create(
        model="moss-tts-realtime", voice="bob", input=TEXT, response_format="pcm"
    ) as response:
        assert len(await response.read()) == CAP * FRAME * 2
    deleted = await api.audio.voices.delete("bob")
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await api.audio.voices.delete("alice")  # given at start: stays
    with pytest.raises(openai.APIStatusError) as too_big:
        await api.audio.voices.create(
            name="huge", audio_sample=("x.wav", b"\0" * 300_000, "audio/wav"), consent="x"
        )
    assert too_big.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="cannot decode"):
        await api.audio.voices.create(
            name="junk", audio_sample=("x.wav", b"not audio" * 10, "audio/wav"), consent="x"
        )
    await wait_free(engine)


async def test_the_session_websocket_shares_the_token_voices_and_metrics(url: str, engine: RealtimeEngine) -> None:
    before = await scrape(url)
    with pytest.raises(TransportError):
        async with RemoteSpeechBackend(url.replace("http", "ws"), token="wrong"):
            pass
    async with RemoteSpeechBackend(url.replace("http", "ws"), token=TOKEN, voice="alice") as remote:
        conversation = await remote.open_conversation()
        assert (await scrape(url))[("moss_conversations_active", ())] == 1
        stream = await conversation.start_turn(None, 1)
        await stream.push_text(TEXT)
        await stream.end_input()
        frames = [chunk async for chunk in stream]
        await conversation.aclose()
    assert len(frames) == CAP
    after = await scrape(url)
    assert after[("moss_conversations_active", ())] == 0
    first_audio = ("moss_first_audio_seconds_count", ())
    assert after[first_audio] == before[first_audio] + 1
    await wait_free(engine)


# -- bad requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "param", "code"),
    [
        ({"voice": "nobody"}, openai.BadRequestError, "voice", "voice_not_found"),
        ({"input": "   "}, openai.BadRequestError, "input", "empty_input"),
        ({"input": "x" * 4097}, openai.BadRequestError, "input", "string_above_max_length"),
        ({"response_format": "ogg"}, openai.BadRequestError, "response_format", "unsupported_value"),
        ({"stream_format": "chunks"}, openai.BadRequestError, "stream_format", "unsupported_value"),
        ({"speed": 5.0}, openai.BadRequestError, "speed", "invalid_value"),
        ({"speed": "fast"}, openai.BadRequestError, "speed", "invalid_value"),
        ({"instructions": "whisper"}, openai.BadRequestError, "instructions", "unsupported_parameter"),
        ({"model": "tts-2"}, openai.NotFoundError, "model", "model_not_found"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors(
    url: str, fields: dict[str, Any], error: type[openai.APIStatusError], param: str, code: str
) -> None:
    request: dict[str, Any] = {
        "model": "moss-tts-realtime",
        "voice": "alice",
        "input": TEXT,
        "response_format": "pcm",
    }
    request.update(fields)
    with pytest.raises(error) as raised:
        await client(url).audio.speech.create(**request)
    body = raised.value.body
    assert isinstance(body, dict) and body["param"] == param and body["code"] == code
    assert body["type"] == "invalid_request_error" and body["message"]


async def test_wrong_or_missing_tokens_are_refused(url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        await client(url, token="wrong").audio.speech.create(model="tts-1", voice="alice", input=TEXT)
    assert raised.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    status, headers, text = await get(url, "/v1/models", token=None)
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == "Bearer"
    assert (await get(url, "/healthz", token=None))[0] == 200  # liveness needs no token


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"model": "tts-1", "input": ', "application/json", 400, "invalid_json"),
        (b'{"model": "tts-1", "model": "tts-1"}', "application/json", 400, "invalid_json"),
        (b"[1, 2]", "application/json", 400, "invalid_json"),
        (b'{"input": "' + b"x" * 70_000 + b'"}', "application/json", 413, "body_too_large"),
        (b"model=tts-1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
async def test_malformed_bodies_are_refused(
    url: str, body: bytes, content_type: str, status: int, code: str
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type, "X-Request-Id": "req-42"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/audio/speech", data=body, headers=headers) as got,
    ):
        assert got.status == status
        assert got.headers["X-Request-Id"] == "req-42"
        error = (await got.json())["error"]
    assert error["code"] == code and error["message"]


# -- admission and vanishing clients ---------------------------------------------------------------


async def test_a_full_engine_answers_503_with_retry_after(url: str, engine: RealtimeEngine) -> None:
    held = await engine.open_conversation()  # the only slot; no waiting queue
    try:
        with pytest.raises(openai.InternalServerError) as raised:
            await client(url).audio.speech.create(
                model="tts-1", voice="alice", input=TEXT, response_format="pcm"
            )
        assert raised.value.status_code == 503
        assert raised.value.response.headers["Retry-After"] == "1"
        assert raised.value.body["code"] == "engine_busy"  # type: ignore[index]
    finally:
        await held.aclose()


async def test_a_client_that_disconnects_mid_stream_frees_its_slot(url: str, engine: RealtimeEngine) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "tts-1", "voice": "alice", "input": TEXT, "response_format": "pcm"}
    before = await scrape(url)
    async with aiohttp.ClientSession() as http:
        response = await http.post(url + "/v1/audio/speech", json=body, headers=headers)
        assert response.status == 200
        assert await response.content.readexactly(FRAME * 2)  # the first frame arrived: the turn is running
        assert engine.free_slots == 0
        response.connection.transport.abort()  # type: ignore[union-attr]
        response.release()
    await wait_free(engine, within_s=1.0)
    after = await scrape(url)
    cancelled = ("moss_requests_total", (("route", "/v1/audio/speech"), ("status", "499")))
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1  # the server saw it go mid-stream


async def test_metrics_count_what_happened(url: str) -> None:
    metrics = await scrape(url)
    ok = ("moss_requests_total", (("route", "/v1/audio/speech"), ("status", "200")))
    assert metrics[ok] >= 5
    assert metrics[("moss_rejected_total", (("reason", "busy"),))] >= 1
    assert metrics[("moss_rejected_total", (("reason", "auth"),))] >= 2
    assert metrics[("moss_first_audio_seconds_count", ())] >= 7
    assert metrics[("moss_chunk_gap_seconds_count", ())] >= 5 * (CAP - 1)
    assert metrics[("moss_rtf_count", ())] >= 5
    assert metrics[("moss_engine_frames_total", ())] >= 5 * CAP
    assert metrics[("moss_engine_tick_seconds_count", ())] >= 1
    assert metrics[("moss_conversations_active", ())] == 0
    assert metrics[("moss_engine_healthy", ())] == 1


# -- engine faults (the last test breaks the module's engine) ---------------------------------------------


async def test_a_turn_failing_mid_stream_cuts_the_audio_or_ends_the_sse_with_an_error(
    url: str, engine: RealtimeEngine
) -> None:
    api = client(url)
    engine.generator.fail_after_frames(CAP // 2)  # type: ignore[attr-defined]
    got = bytearray()
    with pytest.raises(Exception) as cut:  # the body ends without its last chunk: not a complete file
        async with api.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alice", input=TEXT, response_format="pcm"
        ) as response:
            async for chunk in response.iter_bytes():
                got += chunk
    assert "incomplete" in str(cut.value).lower() or "closed" in str(cut.value).lower(), repr(cut.value)
    assert 0 < len(got) < CAP * FRAME * 2
    await wait_free(engine)  # the server frees the cut request's slot just after the cut: no racing it
    engine.generator.fail_after_frames(CAP // 2)  # type: ignore[attr-defined]
    events: list[dict[str, Any]] = []
    async with api.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alice", input=TEXT, response_format="pcm", stream_format="sse"
    ) as response:
        async for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error" and "injected tick fault" in events[-1]["error"]["message"]
    await wait_free(engine)
    assert engine.healthy and (await get(url, "/readyz"))[0] == 200  # the engine went on


async def test_an_engine_fault_makes_readyz_unready_and_speech_unavailable(
    url: str, engine: RealtimeEngine
) -> None:
    status, _, text = await get(url, "/readyz")
    assert status == 200 and json.loads(text)["status"] == "ready"
    engine.generator.broken = True  # type: ignore[attr-defined]
    api = client(url)
    with pytest.raises(openai.APIStatusError):  # the device fails under this request
        async with api.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alice", input=TEXT, response_format="pcm"
        ) as response:
            await response.read()
    for _ in range(100):  # the device thread reports its failure to the event loop
        if engine.failure is not None:
            break
        await asyncio.sleep(0.01)
    assert engine.failure is not None
    status, _, text = await get(url, "/readyz")
    assert status == 503 and "injected device fault" in json.loads(text)["error"]["message"]
    with pytest.raises(openai.InternalServerError) as raised:
        await api.audio.speech.create(model="tts-1", voice="alice", input=TEXT, response_format="pcm")
    assert raised.value.status_code == 503 and raised.value.body["code"] == "engine_unavailable"  # type: ignore[index]
    metrics = await scrape(url)
    assert metrics[("moss_engine_healthy", ())] == 0
    assert metrics[("moss_errors_total", (("kind", "engine_failure"),))] == 1
