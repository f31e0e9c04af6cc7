"""`async for event in turn`: one turn's events, in order, ending when the turn ends."""

from __future__ import annotations

import pytest

from moss_agent import (
    AudioChunk,
    Interrupted,
    Metrics,
    Session,
    SessionConfig,
    TextDelta,
    TurnEnded,
    TurnStarted,
)
from moss_agent.streaming.clock import ScaledClock
from moss_agent.testing import FakeSpeechBackend


@pytest.fixture
def clock() -> ScaledClock:
    return ScaledClock(50.0)


@pytest.fixture
def backend(clock: ScaledClock) -> FakeSpeechBackend:
    return FakeSpeechBackend(clock=clock)


async def test_a_turn_yields_its_events_in_order_and_ends(backend: FakeSpeechBackend, clock: ScaledClock) -> None:
    async with Session(backend, clock=clock) as session:
        turn = session.respond(["Hello ", "there."])
        events = [event async for event in turn]
        result = await turn
    kinds = [type(event) for event in events]
    assert kinds[0] is TurnStarted and kinds[-1] is Metrics
    assert TurnEnded in kinds and AudioChunk in kinds
    assert all(getattr(event, "turn_id", turn.id) == turn.id for event in events)
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    assert text == result.text == "Hello there."
    audio_s = sum(event.duration_s for event in events if isinstance(event, AudioChunk))
    assert audio_s == pytest.approx(result.audio_s)


async def test_turns_do_not_see_each_others_events(backend: FakeSpeechBackend, clock: ScaledClock) -> None:
    async with Session(backend, clock=clock) as session:
        first, second = session.say("One."), session.say("Two, three.")
        first_events = [event async for event in first]
        second_events = [event async for event in second]
    assert {event.turn_id for event in first_events} == {first.id}  # type: ignore[union-attr]
    assert {event.turn_id for event in second_events} == {second.id}  # type: ignore[union-attr]
    assert isinstance(second_events[0], TurnStarted) and isinstance(second_events[-1], Metrics)


async def test_a_turn_iterated_after_it_ended_replays_its_events(
    backend: FakeSpeechBackend, clock: ScaledClock
) -> None:
    async with Session(backend, clock=clock) as session:
        turn = session.say("Done.")
        result = await turn
        events = [event async for event in turn]
    assert isinstance(events[0], TurnStarted) and isinstance(events[-1], Metrics)
    assert sum(e.duration_s for e in events if isinstance(e, AudioChunk)) == pytest.approx(result.audio_s)


async def test_a_turn_nobody_iterates_never_holds_the_session_back(
    backend: FakeSpeechBackend, clock: ScaledClock
) -> None:
    """Far more audio chunks than the turn's event buffer holds: unread, its oldest are dropped."""
    config = SessionConfig(event_queue_size=4)
    async with Session(backend, clock=clock, config=config) as session:
        long_turn = session.say("A reply long enough to make many more audio chunks than four.")
        result = await long_turn
        assert result.audio_s > 1.0 and not result.interrupted
        kept = [event async for event in long_turn]
    assert len(kept) == 4 and isinstance(kept[-1], Metrics)


async def test_an_interrupted_turn_ends_its_iteration(backend: FakeSpeechBackend, clock: ScaledClock) -> None:
    async with Session(backend, clock=clock) as session:
        turn = session.say("A long reply that the user talks over before it is finished.")
        seen = []
        async for event in turn:
            seen.append(event)
            if isinstance(event, AudioChunk):
                await turn.interrupt()
        assert any(isinstance(event, Interrupted) for event in seen)
        assert isinstance(seen[-1], Metrics)


async def test_a_dropped_queued_turn_ends_its_iteration(backend: FakeSpeechBackend, clock: ScaledClock) -> None:
    async with Session(backend, clock=clock) as session:
        session.say("First, speaking now.")
        queued = session.say("Never spoken.")
        iterator = queued.__aiter__()
        await session.interrupt()  # drops the queued turn too
        assert [event async for event in iterator] == []
        assert (await queued).interrupted
