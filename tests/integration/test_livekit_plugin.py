"""The LiveKit Agents TTS plugin, driven the way LiveKit's voice pipeline drives a TTS.

No LiveKit server is needed: ``AgentSession``'s ``tts_node`` only opens ``stream()``, pushes text
deltas, ends the input, reads ``SynthesizedAudio`` events (word timings ride on their frames), and
closes the stream early when the user barges in; the tests do the same. The engine is
``FakeSpeechBackend`` (a per-conversation tone, one 80 ms frame per character), in process or behind
the real speech service (``session_server``) reached through the plugin's default remote backend.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "livekit.agents", reason="livekit-agents is not installed (pip install 'moss-agent[livekit]')"
)

from livekit import rtc
from livekit.agents import Agent, AgentSession, APIConnectionError, APIConnectOptions, APIStatusError
from livekit.agents.tts import SynthesizedAudio
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT, TimedString
from livekit.agents.voice import io

from moss_agent.audio import float_to_pcm16
from moss_agent.client import RemoteSpeechBackend
from moss_agent.integrations.livekit import MossTTS
from moss_agent.service.sessions import session_server
from moss_agent.testing import FakeConversation, FakeSpeechBackend

FAST: dict[str, Any] = {"rtf": 0.0, "ttfa_s": 0.0}  # audio as fast as the loop turns
ONCE = APIConnectOptions(max_retry=0, timeout=5.0)
TEXT = "Hello there, this reply streams in as the model writes it."
DELTAS = ["Hello ", "there, ", "this re", "ply streams in ", "as the model ", "writes it."]


def reference_pcm(text: str, slot: int = 0) -> np.ndarray:
    """What the fake engine says for ``text`` in the conversation of ``slot``, as 16-bit samples."""
    fake = FakeSpeechBackend()
    n = fake.frame_samples
    t = np.arange(len(text) * n, dtype=np.float64) / fake.sample_rate
    return float_to_pcm16((0.3 * np.sin(2 * np.pi * fake.tone_hz(slot) * t)).astype(np.float32))


def pcm_of(events: list[SynthesizedAudio]) -> np.ndarray:
    return np.concatenate([np.frombuffer(ev.frame.data, dtype=np.int16) for ev in events])


def timed_words(events: list[SynthesizedAudio]) -> list[TimedString]:
    return [word for ev in events for word in ev.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])]


def check_timings(words: list[TimedString], text: str, audio_s: float) -> None:
    """Present, in order, inside the audio, and joined they are the text as written."""
    assert words and all(isinstance(w, TimedString) for w in words)
    assert "".join(words) == text
    starts = [w.start_time for w in words]
    assert starts == sorted(starts) and starts[0] >= 0.0
    assert all(w.start_time <= w.end_time <= audio_s + 1e-6 for w in words)  # type: ignore[operator]


async def speak(tts: MossTTS, deltas: list[str]) -> list[SynthesizedAudio]:
    """As LiveKit's tts_node: text pushed by one task while the audio is read."""
    async with tts.stream(conn_options=ONCE) as stream:

        async def forward() -> None:
            for delta in deltas:
                stream.push_text(delta)
                await asyncio.sleep(0)
            stream.end_input()

        forwarding = asyncio.create_task(forward())
        try:
            events = [ev async for ev in stream]
        finally:
            await forwarding  # it only pushes: done within a few loop turns
    return events


def only_conversation(fake: FakeSpeechBackend) -> FakeConversation:
    (conversation,) = fake.active
    return conversation


@pytest.fixture
async def fake_tts() -> AsyncIterator[tuple[FakeSpeechBackend, MossTTS]]:
    fake = FakeSpeechBackend(**FAST)
    tts = MossTTS(backend=fake, hold_until_played=False)
    yield fake, tts
    await tts.aclose()


# -- audio and word timings ------------------------------------------------------------------------


async def test_a_stream_speaks_each_delta_as_it_arrives_with_word_timings(
    fake_tts: tuple[FakeSpeechBackend, MossTTS],
) -> None:
    fake, tts = fake_tts
    assert tts.capabilities.streaming and tts.capabilities.aligned_transcript
    async with tts.stream(conn_options=ONCE) as stream:
        stream.push_text(DELTAS[0])
        # no sentence buffering: audio comes while the sentence is still being written
        first = await asyncio.wait_for(anext(stream), 10)
        for delta in DELTAS[1:]:
            stream.push_text(delta)
        stream.end_input()
        events = [first] + [ev async for ev in stream]
    pcm = pcm_of(events)
    assert np.array_equal(pcm, reference_pcm(TEXT))
    check_timings(timed_words(events), TEXT, len(pcm) / tts.sample_rate)
    assert events[-1].is_final and {ev.segment_id for ev in events} == {events[0].segment_id}
    conversation = only_conversation(fake)
    assert conversation.context == [("assistant", TEXT)]  # the turn ended in full
    assert conversation.turn_ids == [1]


async def test_synthesize_speaks_a_whole_text(fake_tts: tuple[FakeSpeechBackend, MossTTS]) -> None:
    _, tts = fake_tts
    async with tts.synthesize(TEXT, conn_options=ONCE) as chunked:
        events = [ev async for ev in chunked]
    pcm = pcm_of(events)
    assert np.array_equal(pcm, reference_pcm(TEXT))
    check_timings(timed_words(events), TEXT, len(pcm) / tts.sample_rate)


async def test_turns_share_one_conversation_and_follow_the_users_words(
    fake_tts: tuple[FakeSpeechBackend, MossTTS],
) -> None:
    fake, tts = fake_tts
    first = await speak(tts, ["First answer."])
    tts.add_user_turn("And then?")
    second = await speak(tts, ["Second ", "answer."])
    # no text: the turn started early (to overlap the LLM's first token) is settled at nothing heard
    async with tts.stream(conn_options=ONCE) as silent:
        silent.end_input()
        assert [ev async for ev in silent] == []
    conversation = only_conversation(fake)
    assert conversation.turn_ids == [1, 2, 3]
    assert conversation.context == [
        ("assistant", "First answer."), ("user", "And then?"), ("assistant", "Second answer."), ("assistant", "")
    ]  # fmt: skip
    assert np.array_equal(pcm_of(first), reference_pcm("First answer."))
    assert np.array_equal(pcm_of(second), reference_pcm("Second answer."))  # same slot, same tone


# -- interruptions ---------------------------------------------------------------------------------


async def test_closing_a_stream_rolls_the_engine_back_to_what_was_heard() -> None:
    # the engine makes 8 s of audio at once; LiveKit would play it for 8 s, and the user barges in
    # after the first frame: the plugin holds the turn open while it plays, so the cut reaches it
    fake = FakeSpeechBackend(**FAST)
    tts = MossTTS(backend=fake)  # hold_until_played: the default
    long_text = "A long answer that goes on and on, " * 3
    try:
        stream = tts.stream(conn_options=ONCE)
        stream.push_text(long_text)
        stream.end_input()
        await asyncio.wait_for(anext(stream), 10)
        await stream.aclose()  # what AgentSession does on an interruption
        conversation = only_conversation(fake)
        engine_turn = conversation._stream
        assert engine_turn is not None and engine_turn.interrupted
        heard = await engine_turn.interrupt()  # the settled result (a second call returns it)
        assert heard.frames < len(long_text)  # wall time since the first audio, not 8 s
        assert conversation.context == [("assistant", long_text[: heard.frames])]

        # the next turn starts from there on the same conversation
        events = await speak(tts, ["Sorry, go on."])
        assert np.array_equal(pcm_of(events), reference_pcm("Sorry, go on."))
        assert only_conversation(fake) is conversation and conversation.turn_ids == [1, 2]
        assert conversation.context[-1] == ("assistant", "Sorry, go on.")
    finally:
        await tts.aclose()
    assert not fake.active


async def test_a_turn_played_to_its_end_is_kept_in_full() -> None:
    fake = FakeSpeechBackend(**FAST, frame_s=0.01)  # 10 ms per character: a short hold
    tts = MossTTS(backend=fake)
    try:
        events = await speak(tts, ["Short."])
        assert len(pcm_of(events)) == 6 * fake.frame_samples
        conversation = only_conversation(fake)
        assert conversation._stream is not None and not conversation._stream.interrupted
        assert conversation.context == [("assistant", "Short.")]
    finally:
        await tts.aclose()


class Speaker(io.AudioOutput):
    """An audio sink that takes frames at once; a flush plays the segment out, a clear cuts it."""

    def __init__(self) -> None:
        super().__init__(label="speaker", capabilities=io.AudioOutputCapabilities(pause=False))
        self.frames: list[rtc.AudioFrame] = []
        self.got_audio = asyncio.Event()
        self._segment_s: float | None = None

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._segment_s is None:
            self._segment_s = 0.0
            self.on_playback_started(created_at=time.time())
        self._segment_s += frame.duration
        self.frames.append(frame)
        self.got_audio.set()

    def flush(self) -> None:
        super().flush()
        self._finish(interrupted=False)

    def clear_buffer(self) -> None:
        self._finish(interrupted=True)

    def _finish(self, *, interrupted: bool) -> None:
        if self._segment_s is not None:
            played, self._segment_s = self._segment_s, None
            self.on_playback_finished(playback_position=played, interrupted=interrupted)


class Captions(io.TextOutput):
    def __init__(self) -> None:
        super().__init__(label="captions", next_in_chain=None)
        self.parts: list[str] = []

    async def capture_text(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        return None


async def test_an_agent_session_speaks_with_word_captions_and_a_barge_in_rolls_back() -> None:
    """LiveKit's own pipeline: AgentSession.say() runs its tts_node on the plugin."""
    fake = FakeSpeechBackend(**FAST)
    tts = MossTTS(backend=fake)
    session: AgentSession[None] = AgentSession(tts=tts, use_tts_aligned_transcript=True)
    speaker, captions = Speaker(), Captions()
    session.output.audio, session.output.transcription = speaker, captions
    await session.start(agent=Agent(instructions="Be brief."))
    try:
        await asyncio.wait_for(session.say("Hello there.").wait_for_playout(), 20)
        played = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in speaker.frames])
        assert np.array_equal(played, reference_pcm("Hello there."))
        assert "".join(captions.parts) == "Hello there."  # from the plugin's timed words
        conversation = only_conversation(fake)
        assert conversation.context == [("assistant", "Hello there.")]

        long_text = "A long answer that the user cuts short, and it would go on. " * 2
        speaker.got_audio.clear()
        handle = session.say(long_text)
        await asyncio.wait_for(speaker.got_audio.wait(), 20)
        handle.interrupt()  # the user barged in just after the audio started (of 10 s made at once)
        await asyncio.wait_for(handle.wait_for_playout(), 20)
        for _ in range(100):  # the stream is closed as the speech winds down
            if len(conversation.context) == 2:
                break
            await asyncio.sleep(0.02)
        role, kept = conversation.context[-1]
        assert role == "assistant" and long_text.startswith(kept) and len(kept) < len(long_text)
    finally:
        await session.aclose()
        await tts.aclose()
    assert not fake.active


# -- errors ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_speech_server_that_is_down_raises_api_connection_error() -> None:
    tts = MossTTS(url=f"ws://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(APIConnectionError, match="cannot reach the speech server") as caught:
            await speak(tts, ["Anyone there?"])
        assert caught.value.retryable
        with pytest.raises(APIConnectionError):
            async with tts.synthesize("Anyone?", conn_options=ONCE) as chunked:
                [ev async for ev in chunked]
    finally:
        await tts.aclose()


async def test_a_full_speech_server_raises_503_and_serves_once_a_slot_is_free() -> None:
    fake = FakeSpeechBackend(**FAST, max_slots=1)
    async with session_server(fake) as url, RemoteSpeechBackend(url) as other:
        held = await other.open_conversation()  # another job holds the only slot
        tts = MossTTS(url=url, hold_until_played=False)
        try:
            with pytest.raises(APIStatusError) as caught:
                await speak(tts, ["Busy?"])
            assert caught.value.status_code == 503 and caught.value.retryable
            await held.aclose()
            events = await speak(tts, ["Now then."])
            assert np.array_equal(pcm_of(events), reference_pcm("Now then.", slot=1))
        finally:
            await tts.aclose()
        assert not fake.active


async def test_the_frameworks_retry_gets_the_slot_once_it_is_free() -> None:
    fake = FakeSpeechBackend(**FAST, max_slots=1)
    held = await fake.open_conversation()
    tts = MossTTS(backend=fake, hold_until_played=False)
    errors: list[Any] = []

    def on_error(error: Any) -> None:  # LiveKit reports a failed attempt before it retries
        errors.append(error)
        asyncio.get_running_loop().create_task(held.aclose())

    tts.on("error", on_error)
    try:
        async with tts.stream(conn_options=APIConnectOptions(max_retry=2, retry_interval=0.05)) as stream:
            stream.push_text("Worth the wait.")
            stream.end_input()
            events = [ev async for ev in stream]
        assert np.array_equal(pcm_of(events), reference_pcm("Worth the wait.", slot=1))
        assert len(errors) == 1 and errors[0].recoverable
        assert isinstance(errors[0].error, APIStatusError) and errors[0].error.status_code == 503
    finally:
        await tts.aclose()


async def test_a_restarted_speech_server_is_reached_again_by_the_frameworks_retry() -> None:
    fake = FakeSpeechBackend(**FAST)
    port = free_port()
    tts = MossTTS(url=f"ws://127.0.0.1:{port}", hold_until_played=False)
    try:
        async with session_server(fake, port=port):
            await speak(tts, ["Before."])
        assert not fake.active  # the server went away, and the conversation with it
        async with session_server(fake, port=port):
            retry = APIConnectOptions(max_retry=1, retry_interval=0.05, timeout=5.0)
            async with tts.stream(conn_options=retry) as stream:
                stream.push_text("After.")
                stream.end_input()
                events = [ev async for ev in stream]
            # the lost conversation failed the first try; the retry opened a new one (a new slot)
            assert np.array_equal(pcm_of(events), reference_pcm("After.", slot=1))
            assert only_conversation(fake).context == [("assistant", "After.")]
    finally:
        await tts.aclose()


async def test_an_engine_failure_mid_turn_raises_and_the_next_turn_works() -> None:
    fake = FakeSpeechBackend(**FAST, fail_at_frame=4)
    tts = MossTTS(backend=fake, hold_until_played=False)
    try:
        with pytest.raises(APIConnectionError, match="injected engine failure"):
            await speak(tts, ["This will break."])
        conversation = only_conversation(fake)
        assert conversation.context == [("assistant", "This")]  # the frames made stay
        fake.fail_at_frame = None
        events = await speak(tts, ["Fine now."])
        assert np.array_equal(pcm_of(events), reference_pcm("Fine now."))
    finally:
        await tts.aclose()


# -- the remote path, prewarm, close ---------------------------------------------------------------


async def test_the_default_remote_backend_through_the_speech_service() -> None:
    fake = FakeSpeechBackend(**FAST)
    async with session_server(fake) as url:
        tts = MossTTS(url=url, hold_until_played=False)
        tts.prewarm()  # AgentSession calls it as the session starts: the slot is claimed at once
        assert tts._prewarming is not None
        await tts._prewarming
        assert len(fake.active) == 1 and tts.conversation is not None
        events = await speak(tts, DELTAS)
        pcm = pcm_of(events)
        assert np.array_equal(pcm, reference_pcm(TEXT))  # pcm_s16le on the wire: exactly these samples
        check_timings(timed_words(events), TEXT, len(pcm) / tts.sample_rate)
        async with tts.synthesize("Said whole.", conn_options=ONCE) as chunked:
            assert np.array_equal(pcm_of([ev async for ev in chunked]), reference_pcm("Said whole."))
        assert only_conversation(fake).context == [("assistant", TEXT), ("assistant", "Said whole.")]
        await tts.aclose()
        assert not fake.active  # the slot is free when aclose returns
        with pytest.raises(APIConnectionError, match="closed"):
            await speak(tts, ["After close."])


def test_the_plugin_imports_no_torch() -> None:
    """A bot process on a remote engine installs no torch (DESIGN: integrations never import it)."""
    code = (
        "import sys\n"
        "from moss_agent.integrations.livekit import MossTTS\n"
        "MossTTS(url='ws://127.0.0.1:1')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr


def test_without_livekit_the_import_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['livekit'] = sys.modules['livekit.agents'] = None\n"
        "from moss_agent.errors import MissingExtraError\n"
        "try:\n"
        "    import moss_agent.integrations.livekit\n"
        "except MissingExtraError as exc:\n"
        "    print(exc.extra, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.startswith("livekit ") and 'pip install "moss-agent[livekit]"' in out.stdout, out.stderr
