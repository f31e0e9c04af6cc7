"""Session behaviour without any network: turn queueing, interrupts, closing, events, listening.

The fake engine and speaker run on a sped-up clock, so seconds of speech take milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from moss_agent.config import SessionConfig, TurnTakingConfig
from moss_agent.errors import ConfigError, OverloadError, SessionClosedError
from moss_agent.events import AudioChunk, ErrorEvent, UserStartedSpeaking, UserStoppedSpeaking
from moss_agent.streaming.clock import ScaledClock
from moss_agent.streaming.session import Session
from moss_agent.streaming.turn_runner import TurnResult
from moss_agent.testing.audio_io import FakeAudioInput, FakeAudioOutput
from moss_agent.testing.backend import FakeSpeechBackend
from moss_agent.testing.vad import EnergyVad

SPEED = 50.0


@pytest.fixture
def clock() -> ScaledClock:
    return ScaledClock(SPEED)


@pytest.fixture
def backend(clock: ScaledClock) -> FakeSpeechBackend:
    return FakeSpeechBackend(clock=clock)


@pytest.fixture
async def speaker(clock: ScaledClock) -> AsyncIterator[FakeAudioOutput]:
    out = FakeAudioOutput(clock=clock)
    yield out
    await out.aclose()


async def test_turns_play_in_order_and_join_the_history(
    backend: FakeSpeechBackend, speaker: FakeAudioOutput, clock: ScaledClock
) -> None:
    async with Session(backend, output=speaker, clock=clock) as session:
        first, second = session.say("Hello."), session.say("How are you?")
        results = [await first, await second]
        assert [r.heard_text for r in results] == ["Hello.", "How are you?"]
        assert speaker.played_turns == [first.id, second.id]
        assert speaker.played_s(second.id) == pytest.approx(len("How are you?") * 0.08)
        assert first.heard_s == pytest.approx(len("Hello.") * 0.08)
        assert session.history[-1] == {"role": "assistant", "content": "Hello. How are you?"}
        conversation = session.conversation
        assert conversation is not None and conversation.context == [  # type: ignore[attr-defined]
            ("assistant", "Hello."), ("assistant", "How are you?"),
        ]


async def test_turn_queue_rejects_beyond_its_size(backend: FakeSpeechBackend, clock: ScaledClock) -> None:
    config = SessionConfig(turn_queue_size=2)
    async with Session(backend, config=config, clock=clock) as session:
        session.say("one")
        session.say("two")
        with pytest.raises(OverloadError, match="turn"):
            session.say("three")


async def test_a_queued_turn_can_be_dropped_and_never_reaches_the_engine(
    backend: FakeSpeechBackend, speaker: FakeAudioOutput, clock: ScaledClock
) -> None:
    async with Session(backend, output=speaker, clock=clock) as session:
        first, second, third = session.say("first turn"), session.say("second"), session.say("third")
        dropped = await second.interrupt()
        assert dropped.interrupted and dropped.heard_text == "" and dropped.heard_s == 0.0
        await first
        await third
        conversation = session.conversation
        assert conversation is not None
        assert conversation.turn_ids == [first.id, third.id]  # type: ignore[attr-defined]


async def test_session_interrupt_stops_the_current_turn_and_drops_the_queue(
    backend: FakeSpeechBackend, speaker: FakeAudioOutput, clock: ScaledClock
) -> None:
    async with Session(backend, output=speaker, clock=clock) as session:
        current = session.say("a rather long sentence that will not finish")
        queued = session.say("never said")
        while speaker.played_s(current.id) < 0.5:
            await asyncio.sleep(0.001)
        result = await session.interrupt()
        assert result is not None and result.interrupted
        assert 0.5 <= result.heard_s < 3.0  # whole frames heard: a started frame counts
        assert "a rather long sentence".startswith(result.heard_text[:5])
        assert (await queued).interrupted
        assert await session.interrupt() is None
        assert speaker.cleared >= 1
        # audio after the cut never reaches the speaker (a 20 ms slice past the cut at most); the
        # last heard frame, rounded up, may have been cut short
        played = len(speaker.played_audio(current.id)) / speaker.sample_rate
        assert result.heard_s - 0.08 <= played <= result.heard_s + 0.021


async def test_without_output_audio_arrives_as_events(backend: FakeSpeechBackend, clock: ScaledClock) -> None:
    async with Session(backend, clock=clock) as session:
        events = session.events()
        result = await session.say("hi there")
        chunks = [e for e in events.drain() if isinstance(e, AudioChunk)]
        # one chunk per frame, then the output limiter's held look-ahead (2 ms of the last frame)
        assert [c.turn_id for c in chunks] == [result.turn_id] * (len("hi there") + 1)
        assert [c.frame_index for c in chunks] == [*range(len("hi there")), len("hi there") - 1]
        assert chunks[-1].duration_s == pytest.approx(0.002)
        assert sum(c.duration_s for c in chunks) == pytest.approx(result.audio_s)
    # the fake's tone is within the limiter's ceiling: it arrives bit-exact, as the engine made it
    conversation = await FakeSpeechBackend(clock=clock).open_conversation()
    stream = await conversation.start_turn(None, 1)
    await stream.push_text("hi there")
    await stream.end_input()
    made = np.concatenate([chunk.pcm async for chunk in stream])
    await conversation.aclose()
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks]), made)


async def test_closing_frees_the_slot_ends_events_and_refuses_new_turns(
    backend: FakeSpeechBackend, speaker: FakeAudioOutput, clock: ScaledClock
) -> None:
    session = Session(backend, output=speaker, clock=clock)
    await session.start()
    events = session.events()
    speaking = session.say("this turn is cut by close")
    assert len(backend.active) == 1
    await asyncio.sleep(0.01)
    await session.aclose()
    await session.aclose()
    assert speaking.done() and (await speaking).interrupted
    assert not backend.active
    assert [type(e).__name__ async for e in events][-2:] == ["Interrupted", "Metrics"]
    with pytest.raises(SessionClosedError):
        session.say("too late")
    assert [e async for e in session.events()] == []


async def test_bad_wiring_is_refused_with_a_clear_error(backend: FakeSpeechBackend, clock: ScaledClock) -> None:
    async with Session(backend, clock=clock) as session:
        with pytest.raises(ConfigError, match="llm"):
            session.respond()
        with pytest.raises(ConfigError):
            session.say("  ")
    with pytest.raises(ConfigError, match="vad"):
        Session(backend, input=FakeAudioInput())
    with pytest.raises(ConfigError, match="Hz"):
        await Session(backend, output=FakeAudioOutput(48000)).start()


async def test_a_stuck_engine_ends_the_turn_and_the_session_recovers(
    backend: FakeSpeechBackend, speaker: FakeAudioOutput, clock: ScaledClock
) -> None:
    backend.ttfa_s = 1000.0  # never speaks within the watchdog
    config = SessionConfig(audio_stall_timeout_s=0.2)
    async with Session(backend, output=speaker, config=config, clock=clock) as session:
        events = session.events()
        stuck = await asyncio.wait_for(session.say("silence"), 5)
        assert stuck.error is not None and "no audio" in stuck.error
        assert any(isinstance(e, ErrorEvent) and e.turn_id == stuck.turn_id for e in events.drain())
        backend.ttfa_s = 0.05
        assert (await asyncio.wait_for(session.say("back"), 5)).heard_text == "back"


def burst(seconds: float, rate: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(np.arange(int(seconds * rate)) * 0.2)).astype(np.float32)


async def test_heard_user_audio_goes_to_the_next_turn(
    backend: FakeSpeechBackend, speaker: FakeAudioOutput, clock: ScaledClock
) -> None:
    mic = FakeAudioInput(16000)
    turns = TurnTakingConfig(min_speech_s=0.1, hang_s=0.3, pre_roll_s=0.2)
    config = SessionConfig(turns=turns, auto_respond=False)
    async with Session(backend, output=speaker, input=mic, vad=EnergyVad(), config=config, clock=clock) as session:
        events = session.events()
        await mic.push_silence(0.5)
        await mic.push(burst(1.0))
        await mic.push_silence(0.6)
        stopped = None
        async for event in events:
            if isinstance(event, UserStoppedSpeaking):
                stopped = event
                break
        assert stopped is not None and stopped.duration_s == pytest.approx(1.0, abs=0.07)
        await session.respond(["I heard a tone."])
        conversation = session.conversation
        assert conversation is not None
        (user,) = conversation.user_turns  # type: ignore[attr-defined]
        assert user.sample_rate == 24000 and user.audio is not None
        # the utterance plus pre-roll and a short tail, at 24 kHz
        assert len(user.audio) / 24000 == pytest.approx(1.0 + 0.2 + 0.1, abs=0.08)


async def test_half_duplex_does_not_hear_the_agent(
    backend: FakeSpeechBackend, speaker: FakeAudioOutput, clock: ScaledClock
) -> None:
    mic = FakeAudioInput(16000)
    turns = TurnTakingConfig(min_speech_s=0.1, hang_s=0.3, echo_mode="half_duplex", echo_tail_s=0.2)
    config = SessionConfig(turns=turns, auto_respond=False)
    async with Session(backend, output=speaker, input=mic, vad=EnergyVad(), config=config, clock=clock) as session:
        events = session.events()
        speaking = session.say("the agent talks for a while here")
        while speaker.played_s(speaking.id) < 0.3:
            await asyncio.sleep(0.001)
        await mic.push(burst(0.8))  # the speaker's own sound in the microphone
        await mic.push_silence(0.5)
        await asyncio.sleep(0.05)
        assert not [e for e in events.drain() if isinstance(e, UserStartedSpeaking)]
        result = await speaking
        assert not result.interrupted
        await mic.push_silence(0.3)
        await mic.push(burst(0.5))
        await mic.push_silence(0.5)
        kinds = []
        async for event in events:
            kinds.append(type(event))
            if isinstance(event, UserStoppedSpeaking):
                break
        assert UserStartedSpeaking in kinds


async def test_interrupt_while_the_last_audio_is_still_playing_cuts_the_context(
    backend: FakeSpeechBackend, clock: ScaledClock
) -> None:
    # A deep speaker buffer lets the engine finish generating long before playback ends.
    speaker = FakeAudioOutput(clock=clock, buffer_s=10.0)
    async with Session(backend, output=speaker, clock=clock) as session:
        handle = session.say("generated fast, heard slowly")
        conversation = session.conversation
        assert conversation is not None
        while not conversation.context:  # type: ignore[attr-defined]
            await asyncio.sleep(0.001)
        assert speaker.played_s(handle.id) < 1.0
        result = await handle.interrupt()
        assert result.interrupted and result.error is None
        # The model's context is cut to the frames played (the fake: one character each) ...
        [(role, kept)] = conversation.context  # type: ignore[attr-defined]
        assert role == "assistant" and 0 < len(kept) < len("generated fast, heard slowly")
        assert kept == "generated fast, heard slowly"[: round(result.heard_s / backend.frame_s)]
        # ... and the history to the whole words spoken by then, which the context covers.
        assert kept.startswith(result.heard_text)
        assert result.heard_text in ("", "generated", "generated fast,")
        expected = [{"role": "assistant", "content": result.heard_text}] if result.heard_text else []
        assert [m for m in session.history if m["role"] == "assistant"] == expected
    await speaker.aclose()


async def test_an_engine_failure_mid_turn_keeps_what_was_heard(
    backend: FakeSpeechBackend, speaker: FakeAudioOutput, clock: ScaledClock
) -> None:
    backend.fail_at_frame = 5
    async with Session(backend, output=speaker, clock=clock) as session:
        events = session.events()
        failed = await asyncio.wait_for(session.say("this breaks after five"), 5)
        assert failed.error is not None and "injected" in failed.error
        # the five frames made ("this ") were played: the word "this" was heard
        assert failed.interrupted and failed.heard_text == "this"
        assert [e.detail["kind"] for e in events.drain() if isinstance(e, ErrorEvent)] == ["EngineError"]
        backend.fail_at_frame = None
        assert (await asyncio.wait_for(session.say("fine again"), 5)).heard_text == "fine again"
        assert session.history[-1]["content"] == "this fine again"


async def test_a_turn_ends_with_its_speech_and_hears_only_what_was_spoken(clock: ScaledClock) -> None:
    """At the frame cap the turn ends, the endless LLM stream is closed, and only the spoken text
    (one character per frame here: "never endi") joins the history, as whole words."""
    backend = FakeSpeechBackend(clock=clock, max_frames_per_turn=10)
    result, last, closed = await endless_llm_turn(backend, clock, "never ending text ", "never ending text ")
    assert closed, "the LLM stream was left open after the speech ended"
    assert not result.interrupted and result.error is None
    assert result.heard_text == "never" and result.heard_s == pytest.approx(0.8)
    # backpressure: the text budget, what was spoken, the delta that waited and one more
    assert len(result.text) <= backend.text_buffer_chars + 10 + 2 * len("never ending text ")
    assert last == {"role": "assistant", "content": "never"}


async def endless_llm_turn(
    backend: FakeSpeechBackend, clock: ScaledClock, opening: str, rest: str
) -> tuple[TurnResult, dict, bool]:
    """One turn on an LLM that never ends (``opening``, then ``rest`` forever): its result, the
    history's last entry, and whether the LLM stream was closed."""
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            yield opening
            while True:
                yield rest
        finally:
            closed.set()

    async with Session(backend, clock=clock) as session:
        result = await asyncio.wait_for(session.respond(endless()), 5)
        return result, session.history[-1], closed.is_set()


async def test_any_llm_gets_the_session_system_prompt_first(backend: FakeSpeechBackend, clock: ScaledClock) -> None:
    """The system prompt lives in SessionConfig alone and reaches an LLM of one's own, not only OpenAI's."""
    received: list[list[dict]] = []

    class EchoLLM:  # the whole LLM protocol: messages in, text deltas out
        async def stream(self, messages: list) -> AsyncIterator[str]:
            received.append([dict(m) for m in messages])
            yield "You said " + messages[-1]["content"]

    config = SessionConfig(system_prompt="Answer in one short sentence.")
    async with Session(backend, llm=EchoLLM(), config=config, clock=clock) as session:
        first = await session.respond(user_text="hello")
        second = await session.respond(user_text="again")
    assert first.heard_text == "You said hello" and second.heard_text == "You said again"
    assert [m["role"] for m in received[1]] == ["system", "user", "assistant", "user"]
    assert all(messages[0] == {"role": "system", "content": "Answer in one short sentence."} for messages in received)


async def test_a_turn_ends_at_the_models_own_stop_while_the_llm_streams_on(clock: ScaledClock) -> None:
    """The model stops by itself (EOS) after the first sentence: the turn ends there, the endless LLM
    stream is closed, and only that sentence is heard."""
    backend = FakeSpeechBackend(clock=clock, model_stop_after=".")
    result, last, closed = await endless_llm_turn(backend, clock, "Fine, thanks. ", "And there is more to say ")
    assert closed, "the LLM stream was left open after the model stopped"
    assert not result.interrupted and result.error is None
    assert result.heard_text == "Fine, thanks." and result.heard_s == pytest.approx(0.08 * len("Fine, thanks."))
    assert last == {"role": "assistant", "content": "Fine, thanks."}
