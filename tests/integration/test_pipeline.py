"""The voice pipeline end to end: espeak-ng speech in, VAD turn-taking, speech recognition and the
LLM over real HTTP (FakeOpenAIServer), the speech backend, and a clock-paced speaker out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from pipeline_harness import BACKENDS, SPEED, HttpTranscriber, backend_maker, dominant_hz, next_event
from system_requirements import ESPEAK_NG, requires

from moss_agent.config import LLMConfig, SessionConfig, TurnTakingConfig
from moss_agent.events import ErrorEvent, Interrupted, Metrics, TextDelta, TurnEnded
from moss_agent.streaming.clock import ScaledClock
from moss_agent.streaming.llm import OpenAIChatLLM
from moss_agent.streaming.session import Session
from moss_agent.testing.audio_io import FakeAudioInput, FakeAudioOutput
from moss_agent.testing.openai_server import FakeOpenAIServer, ScriptedReply
from moss_agent.testing.speech import synthesize_speech
from moss_agent.testing.vad import EnergyVad

pytestmark = requires(ESPEAK_NG)

MIC_RATE = 16000
FIRST, SECOND = "what is the weather like today", "thank you very much"


make_backend = pytest.fixture(params=sorted(BACKENDS))(backend_maker)


@pytest.fixture(scope="module")
def utterances() -> dict[str, np.ndarray]:
    return {text: synthesize_speech(text, MIC_RATE) for text in (FIRST, SECOND)}


@pytest.fixture
async def server(utterances: dict[str, np.ndarray]) -> AsyncIterator[FakeOpenAIServer]:
    durations = {text: len(pcm) / MIC_RATE for text, pcm in utterances.items()}

    def transcribe(pcm: np.ndarray, rate: int) -> str:
        # Scripted recognizer: picks the utterance whose length matches the uploaded audio.
        seconds = len(pcm) / rate
        return min(durations, key=lambda text: abs(durations[text] - seconds))

    async with FakeOpenAIServer(transcribe=transcribe) as running:
        yield running


class Rig:
    def __init__(
        self, backend: Any, server: FakeOpenAIServer, clock: ScaledClock, config: SessionConfig, llm_idle_s: float = 2.0
    ) -> None:
        self.clock = clock
        self.backend = backend
        self.mic = FakeAudioInput(MIC_RATE)
        self.speaker = FakeAudioOutput(backend.sample_rate, clock=clock)
        self.llm = OpenAIChatLLM(LLMConfig(base_url=server.base_url, model="fake", idle_timeout_s=llm_idle_s))
        self.stt = HttpTranscriber(server.base_url)
        self.session = Session(
            backend, llm=self.llm, output=self.speaker, input=self.mic, vad=EnergyVad(),
            stt=self.stt, config=config, clock=clock,
        )

    async def speak(self, pcm: np.ndarray, trailing_silence_s: float = 1.0) -> None:
        await self.mic.push_silence(0.3)
        await self.mic.push(pcm)
        await self.mic.push_silence(trailing_silence_s)

    async def aclose(self) -> None:
        await self.session.aclose()
        await self.speaker.aclose()
        await self.llm.aclose()
        await self.stt.aclose()


def session_config(server: FakeOpenAIServer, **turns: Any) -> SessionConfig:
    settings: dict[str, Any] = {"min_speech_s": 0.1, "hang_s": 0.5, "min_interrupt_s": 0.4, "echo_mode": "none"}
    turn_cfg = TurnTakingConfig(**(settings | turns))
    return SessionConfig(turns=turn_cfg)


async def test_two_turn_conversation_from_user_speech(
    make_backend: Any, server: FakeOpenAIServer, utterances: dict[str, np.ndarray]
) -> None:
    replies = ["It is sunny and warm.", "You are welcome, goodbye!"]
    server.script(*replies)
    clock = ScaledClock(SPEED)
    rig = Rig(await make_backend(clock), server, clock, session_config(server))
    await rig.session.start()
    events = rig.session.events()
    try:
        for user_text, reply in zip((FIRST, SECOND), replies, strict=True):
            await rig.speak(utterances[user_text])
            transcript = await next_event(events, TextDelta, role="user")
            assert transcript.text == user_text
            ended = await next_event(events, TurnEnded)
            assert ended.text == reply
            metrics = await next_event(events, Metrics, turn_id=ended.turn_id)
            for stage in ("e2e_s", "stt_s", "llm_ttft_s", "tts_ttfa_s", "pipeline_overhead_s"):
                assert metrics.values[stage] is not None, stage
            played = rig.speaker.played_audio(ended.turn_id)
            assert len(played) / rig.speaker.sample_rate == pytest.approx(ended.audio_s, abs=1e-6)
        conversation = rig.session.conversation
        assert conversation is not None
        if hasattr(conversation, "tone_hz"):
            audio = rig.speaker.played_audio()
            assert dominant_hz(audio, rig.speaker.sample_rate) == pytest.approx(conversation.tone_hz, abs=15)
            assert len(audio) == round(sum(len(r) for r in replies) * 0.08 * rig.speaker.sample_rate)
        if hasattr(conversation, "user_turns"):
            # the engine got each utterance's own audio (with pre-roll) at 24 kHz, and its transcript
            turns = conversation.user_turns
            assert [t.text for t in turns] == [FIRST, SECOND]
            for turn, text in zip(turns, (FIRST, SECOND), strict=True):
                assert turn.sample_rate == 24000 and turn.audio is not None
                spoken_s = len(utterances[text]) / MIC_RATE
                assert spoken_s - 0.3 < len(turn.audio) / 24000 < spoken_s + 0.8
        last_request = server.chat_requests[-1]["messages"]
        assert [m["role"] for m in last_request] == ["system", "user", "assistant", "user"]
        assert last_request[1]["content"] == FIRST and last_request[2]["content"] == replies[0]
        assert rig.session.history[-1] == {"role": "assistant", "content": replies[1]}
    finally:
        events.close()
        await rig.aclose()


async def test_barge_in_cuts_history_at_the_heard_point_and_next_turn_works(
    make_backend: Any, server: FakeOpenAIServer, utterances: dict[str, np.ndarray]
) -> None:
    long_reply = (
        "Let me tell you a very long story about the sea, the wind and the old lighthouse keeper, "
        "who lived alone on a rock far from the coast, and every night he climbed the stairs, "
        "lit the great lamp and watched the ships pass by until the sun rose again over the water."
    )
    server.script(long_reply, "Okay, I will stop.")
    clock = ScaledClock(SPEED)
    rig = Rig(await make_backend(clock), server, clock, session_config(server))
    await rig.session.start()
    events = rig.session.events()
    try:
        handle = rig.session.respond(user_text="tell me a story")
        while rig.speaker.played_s(handle.id) < 1.0:
            await asyncio.sleep(0.005)
        await rig.speak(utterances[FIRST], trailing_silence_s=1.0)
        interrupted = await next_event(events, Interrupted, turn_id=handle.id)
        result = await handle
        assert result.interrupted and result.text and long_reply.startswith(result.text)  # text sent so far
        assert 0 < len(result.heard_text) < len(long_reply)
        assert long_reply.startswith(result.heard_text)
        assert interrupted.heard_text == result.heard_text
        # what left the speaker is what the session says was heard (one 20 ms slice in flight)
        played = len(rig.speaker.played_audio(handle.id)) / rig.speaker.sample_rate
        assert played == pytest.approx(result.heard_s, abs=0.1)
        ended = await next_event(events, TurnEnded)
        assert ended.text == "Okay, I will stop."
        messages = server.chat_requests[-1]["messages"]
        assert {"role": "assistant", "content": result.heard_text.strip()} in messages
        assert messages[-1] == {"role": "user", "content": FIRST}
        assert rig.session.summary.interruptions == 1
        assert rig.session.stale_chunks_dropped >= 0
    finally:
        events.close()
        await rig.aclose()


async def test_a_cough_over_the_agent_does_not_interrupt(make_backend: Any, server: FakeOpenAIServer) -> None:
    reply = "This answer is long enough to be coughed over without stopping."
    server.script(reply)
    clock = ScaledClock(SPEED)
    rig = Rig(await make_backend(clock), server, clock, session_config(server, min_interrupt_s=0.6))
    await rig.session.start()
    try:
        handle = rig.session.respond(user_text="go on")
        while rig.speaker.played_s(handle.id) < 0.5:
            await asyncio.sleep(0.005)
        cough = (0.5 * np.sin(np.arange(int(0.25 * MIC_RATE)) * 0.3)).astype(np.float32)
        await rig.speak(cough, trailing_silence_s=0.8)
        result = await asyncio.wait_for(handle, 20)
        assert not result.interrupted and result.heard_text == reply
        assert len(server.chat_requests) == 1  # the cough started no user turn
    finally:
        await rig.aclose()


@pytest.mark.parametrize("failure", ["reset", "http500", "stall"])
async def test_llm_failure_mid_turn_leaves_a_usable_session(
    make_backend: Any, server: FakeOpenAIServer, failure: str
) -> None:
    server.script(
        ScriptedReply("Half of this reply arrives before it breaks.", fail=failure, fail_after=4),  # type: ignore[arg-type]
        "Back to normal.",
    )
    clock = ScaledClock(SPEED)
    rig = Rig(await make_backend(clock), server, clock, session_config(server), llm_idle_s=0.5)
    await rig.session.start()
    events = rig.session.events()
    try:
        first = await asyncio.wait_for(rig.session.respond(user_text="hello"), 20)
        error = await next_event(events, ErrorEvent, turn_id=first.turn_id)
        assert not error.fatal and first.error is not None
        spoken = "" if failure == "http500" else "Half of this reply"
        assert first.text == spoken and first.heard_text == spoken
        second = await asyncio.wait_for(rig.session.respond(user_text="are you there"), 20)
        assert second.error is None and second.heard_text == "Back to normal."
        history = rig.session.history
        assert history[-1] == {"role": "assistant", "content": "Back to normal."}
        if spoken:
            assert {"role": "assistant", "content": spoken} in history
    finally:
        events.close()
        await rig.aclose()


async def test_a_failed_transcription_loses_one_utterance_not_the_session(
    make_backend: Any, server: FakeOpenAIServer, utterances: dict[str, np.ndarray]
) -> None:
    working = server.transcribe
    calls = 0

    def flaky(pcm: np.ndarray, rate: int) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("recognizer crashed")  # the server answers HTTP 500
        assert working is not None
        return working(pcm, rate)

    server.transcribe = flaky
    server.script("Now I hear you.")
    clock = ScaledClock(SPEED)
    rig = Rig(await make_backend(clock), server, clock, session_config(server))
    await rig.session.start()
    events = rig.session.events()
    try:
        await rig.speak(utterances[FIRST])
        error = await next_event(events, ErrorEvent)
        assert error.detail["kind"] == "stt" and not error.fatal
        await rig.speak(utterances[SECOND])
        ended = await next_event(events, TurnEnded)
        assert ended.text == "Now I hear you."
        assert server.chat_requests[-1]["messages"][-1] == {"role": "user", "content": SECOND}
    finally:
        events.close()
        await rig.aclose()


async def test_interrupting_closes_the_llm_stream_so_the_server_stops(
    make_backend: Any, server: FakeOpenAIServer
) -> None:
    words = " ".join(f"word{i}" for i in range(60))
    server.script(ScriptedReply(words, token_delay_s=0.03))
    clock = ScaledClock(SPEED)
    rig = Rig(await make_backend(clock), server, clock, session_config(server))
    await rig.session.start()
    try:
        handle = rig.session.respond(user_text="count for me")
        while rig.speaker.played_s(handle.id) < 0.2:
            await asyncio.sleep(0.005)
        result = await handle.interrupt()
        assert result.interrupted and len(result.text) < len(words)
        for _ in range(200):  # the server notices the hang-up at its next write
            if server.aborted:
                break
            await asyncio.sleep(0.01)
        assert server.aborted == 1 and server.tokens_sent < 60
    finally:
        await rig.aclose()
