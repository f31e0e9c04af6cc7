"""The speech contract of ``moss_agent.streaming.tts``, run unchanged against the fake backend, the
real engine (a tiny random checkpoint whose turns run to their frame cap) and that engine behind the
speech server, through ``RemoteSpeechBackend`` over a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from moss_agent.errors import EngineError, SessionClosedError
from moss_agent.streaming.clock import ScaledClock
from moss_agent.streaming.tts import HeardResult, SpeechBackend, SpeechStream, UserTurn

FRAME_S = 0.08
CAP = 24  # frames per turn
BUDGET = 64  # characters of unread text a stream may hold
WORDS = [f"word{i} " for i in range(200)]  # 1,390 characters: far more than a turn speaks


@pytest.fixture(scope="module")
def codec(tiny_codec_dir: Path) -> Any:
    from moss_agent.models.codec import load_codec

    return load_codec(tiny_codec_dir, device="cpu")


@pytest.fixture(params=["fake", "engine", "remote"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[SpeechBackend]:
    if request.param == "fake":
        from moss_agent.testing import FakeSpeechBackend

        yield FakeSpeechBackend(
            clock=ScaledClock(50.0), frame_s=FRAME_S, text_buffer_chars=BUDGET, max_frames_per_turn=CAP
        )
        return
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.realtime import SamplingConfig

    config = RealtimeEngineConfig(
        num_slots=2, max_context=512, max_frames_per_turn=CAP, sampling=SamplingConfig(greedy=True),
        max_ahead_s=3 * FRAME_S, text_buffer_chars=BUDGET,
    )
    checkpoint = request.getfixturevalue("tiny_realtime_endless_dir")
    engine = RealtimeEngine.load(checkpoint, request.getfixturevalue("codec"), device="cpu", config=config)
    async with engine:
        if request.param == "engine":
            yield engine
            return
        from moss_agent.client import RemoteSpeechBackend
        from moss_agent.service.sessions import session_server

        # the client's audio window adds to the engine's look-ahead: keep both small
        async with session_server(engine) as url, RemoteSpeechBackend(url, audio_window=1) as remote:
            yield remote


async def push_all(stream: SpeechStream, deltas: list[str], pushed: list[str]) -> None:
    for delta in deltas:
        await stream.push_text(delta)
        pushed.append(delta)


async def test_a_turn_streams_ordered_frames_tagged_with_its_id(backend: SpeechBackend) -> None:
    conversation = await backend.open_conversation()
    stream = await conversation.start_turn(UserTurn("Hi?"), turn_id=7)
    await stream.push_text("Hello there.")
    await stream.end_input()
    chunks = [chunk async for chunk in stream]
    assert chunks and all(c.turn_id == 7 and c.sample_rate == backend.sample_rate for c in chunks)
    assert [c.frame_index for c in chunks] == list(range(len(chunks)))
    assert all(c.duration_s == pytest.approx(FRAME_S) for c in chunks)
    await conversation.aclose()


async def test_pushing_after_end_input_or_aclose_raises(backend: SpeechBackend) -> None:
    conversation = await backend.open_conversation()
    stream = await conversation.start_turn(None, turn_id=1)
    await stream.push_text("Some words.")
    await stream.end_input()
    await stream.end_input()  # idempotent
    with pytest.raises(SessionClosedError, match="end_input"):
        await stream.push_text("More.")
    await stream.aclose()
    second = await conversation.start_turn(None, turn_id=2)
    await second.aclose()
    await second.aclose()  # idempotent
    with pytest.raises(SessionClosedError):
        await second.push_text("Too late.")
    await conversation.aclose()


async def test_start_turn_while_a_stream_is_open_raises(backend: SpeechBackend) -> None:
    conversation = await backend.open_conversation()
    first = await conversation.start_turn(None, turn_id=1)
    await first.push_text("Still speaking.")
    with pytest.raises(EngineError, match="still open"):
        await conversation.start_turn(None, turn_id=2)
    await first.aclose()
    second = await conversation.start_turn(None, turn_id=2)
    await second.push_text("Now it is my turn.")
    await second.end_input()
    turn_ids = [c.turn_id async for c in second]
    assert turn_ids and set(turn_ids) == {2}
    await conversation.aclose()
    with pytest.raises(SessionClosedError):
        await conversation.start_turn(None, turn_id=3)


async def test_heard_frames_round_up_and_interrupt_is_settled_once(backend: SpeechBackend) -> None:
    conversation = await backend.open_conversation()
    stream = await conversation.start_turn(None, turn_id=1)
    await stream.push_text("A long answer the listener cuts short.")
    await stream.end_input()
    got = []
    async for chunk in stream:
        got.append(chunk)
        if len(got) == 4:
            break
    heard = await stream.interrupt(heard_s=1.5 * FRAME_S)  # the second frame had started playing
    assert heard.frames == 2 and heard.audio_s == pytest.approx(2 * FRAME_S) and heard.text
    assert await stream.interrupt(heard_s=0.0) == heard
    assert [c async for c in stream] == []  # nothing stale after the cut
    await stream.aclose()

    silent = await conversation.start_turn(None, turn_id=2)
    await silent.push_text("Cut before a sound was heard.")
    await silent.end_input()
    assert (await anext(aiter(silent))).frame_index == 0
    assert await silent.interrupt(heard_s=0.0) == HeardResult(0, "", 0.0)
    await conversation.aclose()


async def test_a_finished_turn_is_settled_at_what_was_heard(backend: SpeechBackend) -> None:
    conversation = await backend.open_conversation()
    stream = await conversation.start_turn(None, turn_id=1)
    await stream.push_text("Generated quickly, heard slowly.")
    await stream.end_input()
    made = [chunk async for chunk in stream]
    assert len(made) > 3
    heard = await stream.interrupt(heard_s=3 * FRAME_S)  # the listener stopped it three frames in
    assert heard.frames == 3
    await stream.aclose()

    late = await conversation.start_turn(None, turn_id=2)
    await late.push_text("Heard in full.")
    await late.end_input()
    assert [chunk async for chunk in late]
    await conversation.start_turn(None, turn_id=3)  # its audio ended, so the next turn may start
    with pytest.raises(EngineError, match="followed by another"):
        await late.interrupt(None)  # too late: settle a turn before the next one starts
    await conversation.aclose()


async def test_a_turn_ends_at_its_frame_cap_while_text_keeps_coming(backend: SpeechBackend) -> None:
    conversation = await backend.open_conversation()
    stream = await conversation.start_turn(None, turn_id=1)
    pushed: list[str] = []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(push_all(stream, WORDS, pushed), name="endless-llm")
        chunks = [chunk async for chunk in stream]
    assert len(chunks) == CAP  # the speech ended; the producer was released, not left waiting
    await stream.push_text("more")  # the turn ended on its own: dropped, no error
    heard = await stream.interrupt(None)
    assert heard.frames == CAP
    # only the text the frames covered is heard, not everything the producer pushed
    assert 0 < len(heard.text) < len("".join(pushed)) // 2
    await conversation.aclose()


async def test_a_producer_waits_while_the_text_buffer_is_full(backend: SpeechBackend) -> None:
    conversation = await backend.open_conversation()
    stream = await conversation.start_turn(None, turn_id=1)
    pushed: list[str] = []
    async with asyncio.TaskGroup() as tg:
        producer = tg.create_task(push_all(stream, WORDS, pushed), name="fast-llm")
        await asyncio.sleep(0.5)  # nobody listens: the model holds, then the producer must wait
        assert not producer.done()
        waiting_at = len("".join(pushed))
        # the budget (less the delta that waits), plus what the model read before it held:
        # its prefill and a few frames
        assert BUDGET - len(WORDS[-1]) <= waiting_at <= BUDGET + 200
        await asyncio.sleep(0.2)
        assert len("".join(pushed)) == waiting_at, "the producer went on while nobody listened"
        frames = [chunk async for chunk in stream]  # listening lets the model read on, to the cap
    assert len(frames) == CAP and len("".join(pushed)) > waiting_at
    await stream.aclose()
    await conversation.aclose()
