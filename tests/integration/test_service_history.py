"""Opening a conversation with earlier turns over the session protocol, on real sockets.

The ``turns`` of an ``open`` reach the engine as the same history an in-process open gives (their
audio in one upload after the voice's); hostile ``turns`` get typed errors, cost no slot and leave
the socket usable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from moss_agent import speech_protocol as sp
from moss_agent.client import RemoteSpeechBackend
from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.errors import ConfigError
from moss_agent.models.realtime import SamplingConfig
from moss_agent.service.sessions import SessionLimits, session_server
from moss_agent.streaming.tts import PastTurn, UserTurn
from moss_agent.testing import FakeSpeechBackend

pytestmark = pytest.mark.asyncio(loop_scope="module")

RNG = np.random.default_rng(9)
LIMITS = SessionLimits(max_history_turns=4, max_history_audio_s=6.0, max_text_chars=400, max_upload_s=4.0)


def speech(seconds: float, rate: int = 24000) -> np.ndarray:
    return (0.1 * RNG.standard_normal(int(seconds * rate))).astype(np.float32)


VOICE = speech(0.5)
HISTORY = [
    PastTurn("user", "Can you hear me?", speech(0.4, 16000), 16000),  # resampled by the engine
    PastTurn("assistant", "Yes, I can hear you well.", speech(0.9)),
    PastTurn("user", "Good. Then tell me more."),  # text only
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_realtime_endless_dir: Path, tiny_codec_dir: Path) -> AsyncIterator[RealtimeEngine]:
    config = RealtimeEngineConfig(
        num_slots=2, max_context=512, max_frames_per_turn=16, sampling=SamplingConfig(greedy=True),
        call_timeout_s=5.0,
    )  # fmt: skip
    loaded = await asyncio.to_thread(
        RealtimeEngine.load, tiny_realtime_endless_dir, tiny_codec_dir, device="cpu", config=config
    )
    async with loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url(engine: RealtimeEngine) -> AsyncIterator[str]:
    async with session_server(engine, limits=LIMITS) as address:
        yield address


def active_rows(engine: RealtimeEngine) -> Any:
    """The context rows of the one open conversation."""
    slots = [slot for slot, record in enumerate(engine.generator.state.slots) if record.active]
    assert len(slots) == 1, slots
    return engine.generator.context_rows(slots[0]).clone()  # context_rows is a view on the CPU


async def test_remote_history_is_the_in_process_history(engine: RealtimeEngine, url: str) -> None:
    async with RemoteSpeechBackend(url, encoding="pcm_f32le") as remote:  # f32: the samples exactly
        conversation = await remote.open_conversation(
            system_prompt="Be brief.", voice_prompt=VOICE, history=HISTORY
        )
        remote_rows = active_rows(engine)
        stream = await conversation.start_turn(None, 1)  # the history ends with the user: answer it
        await stream.push_text("Here is more.")
        await stream.end_input()
        remote_audio = [chunk.pcm async for chunk in stream]
        await conversation.aclose()
    local = await engine.open_conversation(system_prompt="Be brief.", voice_prompt=VOICE, history=HISTORY)
    try:
        assert np.array_equal(active_rows(engine), remote_rows)
        stream = await local.start_turn(None, 1)
        await stream.push_text("Here is more.")
        await stream.end_input()
        local_audio = [chunk.pcm async for chunk in stream]
    finally:
        await local.aclose()
    assert len(local_audio) == len(remote_audio) > 0
    np.testing.assert_allclose(np.concatenate(local_audio), np.concatenate(remote_audio), atol=1e-4)


async def test_the_fake_backend_behind_the_server_keeps_the_history() -> None:
    fake = FakeSpeechBackend()
    async with session_server(fake, limits=LIMITS) as address, RemoteSpeechBackend(address) as remote:
        conversation = await remote.open_conversation(history=HISTORY)
        (opened,) = fake.active
        assert opened.context == [(turn.role, turn.text) for turn in HISTORY]
        assert [turn.audio is not None for turn in opened.history] == [True, True, False]
        assert opened.history[0].sample_rate == 16000 and opened.history[0].audio.size == 6400
        stream = await conversation.start_turn(UserTurn("Next?"), 1)
        await stream.aclose()
        await conversation.aclose()


async def test_hostile_turns_get_typed_errors_and_cost_nothing(engine: RealtimeEngine, url: str) -> None:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url + sp.PATH)
    hello = json.loads((await ws.receive()).data)
    assert hello["limits"]["max_history_turns"] == 4 and hello["limits"]["max_history_audio_s"] == 6.0

    async def reply(turns: Any, rid: int) -> dict[str, Any]:
        await ws.send_str(json.dumps({"type": "open", "id": rid, "turns": turns}))
        return json.loads((await asyncio.wait_for(ws.receive(), 5)).data)  # type: ignore[no-any-return]

    audio = {"samples": 2400, "sample_rate": 24000}
    cases: list[tuple[Any, str, str]] = [
        ("hello", "bad_message", "must be a list"),
        ([{"role": "system", "text": "x"}], "bad_message", "role"),
        ([{"role": "user"}], "bad_message", "text must be a string"),
        (["user: hi"], "bad_message", "must be an object"),
        ([{"role": "user", "text": "x", "audio": {"samples": -1, "sample_rate": 24000}}], "bad_message", "samples"),
        ([{"role": "user", "text": "hi"}] * 5, "invalid", "at most 4"),
        ([{"role": "user", "text": "x" * 401}], "invalid", "at most 400"),
        ([{"role": "assistant", "text": "Hello!"}], "invalid", "without audio"),
        ([{"role": "user", "text": "x", "audio": {"samples": 24000 * 5, "sample_rate": 24000}}], "invalid", "4 s"),
        ([{"role": "assistant", "text": "x", "audio": {"samples": 24000 * 4, "sample_rate": 24000}}] * 2,
         "invalid", "at most 6 s"),
    ]  # fmt: skip
    for rid, (turns, code, words) in enumerate(cases, start=1):
        got = await reply(turns, rid)
        assert (got["type"], got["id"], got["code"]) == ("error", rid, code), got
        assert words in got["message"], got
    # a history the engine's context cannot hold: refused by the engine, as invalid
    long = [{"role": "user", "text": "word " * 79}] * 4
    got = await reply(long, 50)
    assert (got["type"], got["code"]) == ("error", "invalid") and "oldest turns" in got["message"], got
    # a declared upload that never completes holds no slot; a good open on the same socket still works
    await ws.send_str(json.dumps({"type": "open", "id": 60, "turns": [{"role": "assistant", "text": "Hi.",
                                                                        "audio": audio}]}))  # fmt: skip
    assert engine.free_slots == 2
    await ws.send_bytes(sp.pack_frame(sp.KIND_UPLOAD, "pcm_s16le", 60, 0, 0, bytes(2 * 2400)))
    opened = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
    assert (opened["type"], opened["id"]) == ("opened", 60), opened
    await ws.close()
    await http.close()
    for _ in range(100):
        if engine.free_slots == 2:
            break
        await asyncio.sleep(0.01)
    assert engine.free_slots == 2


async def test_client_checks_the_history_before_sending(url: str) -> None:
    async with RemoteSpeechBackend(url) as remote:
        with pytest.raises(ConfigError, match="without audio"):
            await remote.open_conversation(history=[PastTurn("assistant", "Hello!")])
        with pytest.raises(ConfigError, match="at most 4"):
            await remote.open_conversation(history=[PastTurn("user", "hi")] * 5)
