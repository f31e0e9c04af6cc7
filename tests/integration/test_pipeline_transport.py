"""The session against the transports' real AudioOutput (PlaybackBuffer, resampling 24 -> 48 kHz),
pulled in 20 ms frames by a clock task the way the WebRTC and MQTT transports pull it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moss_agent.streaming.clock import ScaledClock
from moss_agent.streaming.session import Session
from moss_agent.testing.backend import FakeSpeechBackend
from moss_agent.transports.playback import PlaybackBuffer

PLAY_RATE = 48000


async def pull_forever(buffer: PlaybackBuffer, clock: ScaledClock, heard: list[np.ndarray]) -> None:
    frame = PLAY_RATE // 50
    while True:
        await clock.sleep(0.02)
        pcm, _ = buffer.pull(frame)
        heard.append(pcm)


async def test_session_plays_and_interrupts_through_the_transport_buffer() -> None:
    clock = ScaledClock(20.0)
    backend = FakeSpeechBackend(clock=clock)
    output = PlaybackBuffer(PLAY_RATE, sample_rate=backend.sample_rate, max_buffer_s=0.3)
    heard: list[np.ndarray] = []
    speaker = asyncio.create_task(pull_forever(output, clock, heard), name="test-speaker-clock")
    try:
        async with Session(backend, output=output, clock=clock) as session:
            done = await asyncio.wait_for(session.say("Short one."), 10)
            assert not done.interrupted
            assert output.played_s(done.turn_id) == pytest.approx(len("Short one.") * 0.08, abs=0.025)
            long = session.say("A much longer sentence that the user will talk over.")
            while output.played_s(long.id) < 0.6:
                await asyncio.sleep(0.002)
            result = await long.interrupt()
            sentence = "A much longer sentence that the user will talk over."
            # whole words only, and never more than the frames kept (the fake: a character each)
            assert result.interrupted and 0 < len(result.heard_text) < 20
            assert sentence.startswith(result.heard_text) and sentence[len(result.heard_text)] == " "
            assert len(result.heard_text) <= round(result.heard_s / 0.08)
            await asyncio.sleep(0.05)  # the clock keeps pulling: nothing of the cut turn comes back
            assert output.played_s(long.id) <= result.heard_s + 0.08 + 0.021
            assert session.history[-1]["content"].endswith(result.heard_text.strip())
            after = await asyncio.wait_for(session.say("Next."), 10)
            assert after.heard_text == "Next." and not after.interrupted
        audio = np.concatenate(heard)
        spectrum = np.abs(np.fft.rfft(audio))
        assert np.argmax(spectrum) * PLAY_RATE / len(audio) == pytest.approx(backend.tone_hz(0), abs=10)
    finally:
        speaker.cancel()
        await asyncio.wait([speaker])


async def test_an_output_whose_clock_stopped_ends_the_turn_instead_of_hanging() -> None:
    from moss_agent.config import SessionConfig
    from moss_agent.events import ErrorEvent

    clock = ScaledClock(20.0)
    backend = FakeSpeechBackend(clock=clock)
    output = PlaybackBuffer(PLAY_RATE, sample_rate=backend.sample_rate, max_buffer_s=0.2)  # nobody pulls
    async with Session(backend, output=output, clock=clock, config=SessionConfig(audio_stall_timeout_s=0.3)) as session:
        events = session.events()
        result = await asyncio.wait_for(session.say("nobody is listening to this"), 10)
        assert result.error is not None and "output" in result.error
        errors = [e for e in events.drain() if isinstance(e, ErrorEvent)]
        assert errors and errors[0].detail["kind"] == "TransportError" and not errors[0].fatal


async def test_interrupt_does_not_wait_behind_audio_blocked_in_the_output() -> None:
    clock = ScaledClock(20.0)
    backend = FakeSpeechBackend(clock=clock)
    output = PlaybackBuffer(PLAY_RATE, sample_rate=backend.sample_rate, max_buffer_s=0.2)  # nobody pulls
    async with Session(backend, output=output, clock=clock) as session:
        handle = session.say("this audio fills the buffer and then waits for a clock that never comes")
        while output.queued_s < 0.2:
            await asyncio.sleep(0.002)
        result = await asyncio.wait_for(handle.interrupt(), 2.0)
        assert result.interrupted and result.heard_s == 0.0 and result.heard_text == ""
        assert output.queued_s == 0.0
