"""Many sessions on one backend: no audio crosses between sessions, and closing sessions under load
(mid-turn, mid-interrupt) leaves no task, engine slot or growing memory behind."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import pytest
from pipeline_harness import BACKENDS, backend_maker, dominant_hz

from moss_agent.streaming.clock import ScaledClock
from moss_agent.streaming.session import Session
from moss_agent.testing.audio_io import FakeAudioOutput

make_backend = pytest.fixture(params=sorted(BACKENDS))(backend_maker)


async def test_eight_sessions_at_once_keep_their_own_audio(make_backend: Any) -> None:
    clock = ScaledClock(20.0)
    backend = await make_backend(clock)
    speakers = [FakeAudioOutput(backend.sample_rate, clock=clock) for _ in range(8)]
    sessions = [Session(backend, output=s, clock=clock, name=f"s{i}") for i, s in enumerate(speakers)]
    texts = [f"Session {i} says {'la ' * (i + 2)}" for i in range(8)]
    await asyncio.gather(*(s.start() for s in sessions))
    try:
        async def converse(session: Session, text: str) -> list[Any]:
            first = session.respond(list(text.split(" ")))  # token lists, as an LLM would stream
            second = session.say(text.upper())
            return [await first, await second]

        results = await asyncio.gather(*(converse(s, t) for s, t in zip(sessions, texts, strict=True)))
        for session, speaker, text, turns in zip(sessions, speakers, texts, results, strict=True):
            assert [r.heard_text for r in turns] == ["".join(text.split(" ")), text.upper()]
            assert speaker.played_turns == [r.turn_id for r in turns]
            conversation = session.conversation
            assert conversation is not None
            for result in turns:
                audio = speaker.played_audio(result.turn_id)
                assert len(audio) / speaker.sample_rate == pytest.approx(result.audio_s)
                if hasattr(conversation, "tone_hz"):
                    assert dominant_hz(audio, speaker.sample_rate) == pytest.approx(conversation.tone_hz, abs=15)
        if hasattr(backend, "tone_hz"):
            tones = {s.conversation.tone_hz for s in sessions if s.conversation is not None}
            assert len(tones) == 8
    finally:
        await asyncio.gather(*(s.aclose() for s in sessions))
        await asyncio.gather(*(s.aclose() for s in speakers))
    if hasattr(backend, "active"):
        assert not backend.active
    if hasattr(backend, "free_slots"):  # the real engine: every slot came back
        assert backend.free_slots == backend.config.num_slots and backend.waiting == 0


async def _churn(backend: Any, clock: ScaledClock, rounds: int) -> int:
    """Open 4 sessions, run turns, interrupt some, close the rest mid-speech; returns turns run."""
    turns = 0
    for round_index in range(rounds):
        speakers = [FakeAudioOutput(backend.sample_rate, clock=clock) for _ in range(4)]
        sessions = [Session(backend, output=s, clock=clock, name=f"churn{i}") for i, s in enumerate(speakers)]
        await asyncio.gather(*(s.start() for s in sessions))
        handles = [s.say(f"round {round_index} turn") for s in sessions]
        handles += [s.respond(["and ", "more ", "words ", "to ", "cut"]) for s in sessions]
        turns += len(handles)
        await handles[0]
        await handles[4].interrupt()
        await asyncio.sleep(0.01)
        await asyncio.gather(*(s.aclose() for s in sessions))  # the others close mid-turn
        assert all(h.done() for h in handles)
        await asyncio.gather(*(s.aclose() for s in speakers))
    return turns


async def test_closing_sessions_under_load_leaks_nothing(make_backend: Any) -> None:
    clock = ScaledClock(50.0)
    backend = await make_backend(clock)
    baseline_tasks = asyncio.all_tasks()
    engine = hasattr(backend, "free_slots")
    await _churn(backend, clock, 2 if engine else 5)  # warm up caches and lazy imports
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    # The real engine runs every turn to its frame cap under tracemalloc (~8 s a round on 2 cores):
    # 5 rounds (40 turns) of it, 25 (200 turns) of the fake; benchmarks/soak.py runs thousands.
    rounds = 5 if engine else 25
    turns = await _churn(backend, clock, rounds)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert turns == 8 * rounds
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 1_000_000, f"memory grew by {grown} bytes over {turns} turns"
    leftover = {t for t in asyncio.all_tasks() - baseline_tasks if not t.done()}
    assert not leftover, [t.get_name() for t in leftover]
    if hasattr(backend, "active"):
        assert not backend.active
    if hasattr(backend, "free_slots"):  # the real engine: every slot came back
        assert backend.free_slots == backend.config.num_slots and backend.waiting == 0
