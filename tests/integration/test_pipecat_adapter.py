"""``MossTTSService`` in real pipecat pipelines: a scripted LLM service streams tokens, the service
speaks them on the fake backend (a tone per conversation, one character per 80 ms frame) or on the
tiny random engine, and pipecat's own aggregators build the assistant context from the word frames.

Recording wrappers (real implementations of the speech protocols that delegate) note what each
engine stream made and how it was settled, so the tests compare pipecat's frames with the engine's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (pip install 'moss-agent[pipecat]')")

from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    MetricsFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings
from pipecat.tests.utils import run_test
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from moss_agent.events import AudioChunk, FloatArray
from moss_agent.integrations.pipecat import MossTTSService, pcm16_bytes
from moss_agent.streaming.tts import HeardResult, SpeechBackend, UserTurn
from moss_agent.testing import FakeSpeechBackend

RATE = 24000


# -- pipecat side: an LLM that streams scripted replies, a paced speaker, a frame recorder ----------


class ScriptedLLM(LLMService):
    """A pipecat LLM service answering each context with the next scripted reply, token by token."""

    def __init__(self, replies: Iterable[str], token_delay_s: float = 0.005) -> None:
        fields = [f.name for f in dataclasses.fields(LLMSettings) if not f.name.startswith("_")]
        super().__init__(settings=LLMSettings(**{**dict.fromkeys(fields), "model": "scripted"}))
        self.replies = list(replies)
        self.token_delay_s = token_delay_s

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        reply = self.replies.pop(0)
        await self.push_frame(LLMFullResponseStartFrame())
        for token in re.findall(r"\s*\S+", reply):
            await self._push_llm_text(token)
            await asyncio.sleep(self.token_delay_s)
        await self.push_frame(LLMFullResponseEndFrame())


class Speaker(BaseOutputTransport):
    """An output transport that plays in real time (it sleeps each chunk's duration) and keeps the
    audio; pipecat's clock queue releases word frames as their audio plays, as on a real line."""

    def __init__(self) -> None:
        super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=RATE))
        self.played = bytearray()
        self._progress = asyncio.Event()

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        # A chunk counts as played once its duration has passed, as on a real line: counted before
        # that, 0.5 s "played" could be less than 0.5 s of wall time since the first push.
        await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)
        self.played += frame.audio
        self._progress.set()
        return True

    async def wait_played(self, seconds: float, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.played) < seconds * RATE * 2:
                self._progress.clear()
                await self._progress.wait()


class Recorder(FrameProcessor):
    """Keeps every downstream frame; ``wait_for`` waits until a condition on them holds."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self._changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
            self._changed.set()
        await self.push_frame(frame, direction)

    def count(self, kind: type[Frame]) -> int:
        return sum(isinstance(f, kind) for f in self.frames)

    async def wait_for(self, kind: type[Frame], count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while self.count(kind) < count:
                self._changed.clear()
                await self._changed.wait()


# -- speech side: recording wrappers around any SpeechBackend ---------------------------------------


@dataclass
class StreamLog:
    turn_id: int
    text: str = ""
    chunks: list[FloatArray] = field(default_factory=list)
    interrupts: list[tuple[float | None, HeardResult]] = field(default_factory=list)
    made_at_interrupt: float | None = None

    @property
    def made_s(self) -> float:
        return sum(len(c) for c in self.chunks) / RATE


class RecordingStream:
    def __init__(self, inner: Any, log: StreamLog) -> None:
        self.inner = inner
        self.log = log
        self.turn_id = inner.turn_id

    async def push_text(self, delta: str) -> None:
        self.log.text += delta
        await self.inner.push_text(delta)

    async def end_input(self) -> None:
        await self.inner.end_input()

    async def __aiter__(self) -> AsyncIterator[AudioChunk]:
        async for chunk in self.inner:
            self.log.chunks.append(chunk.pcm)
            yield chunk

    async def interrupt(self, heard_s: float | None = None) -> HeardResult:
        self.log.made_at_interrupt = self.log.made_s
        heard = await self.inner.interrupt(heard_s)
        self.log.interrupts.append((heard_s, heard))
        return heard

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingConversation:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sample_rate = inner.sample_rate
        self.streams: list[StreamLog] = []
        self.users: list[UserTurn | None] = []

    async def start_turn(self, user: UserTurn | None, turn_id: int) -> RecordingStream:
        stream = await self.inner.start_turn(user, turn_id)
        self.users.append(user)
        self.streams.append(StreamLog(turn_id))
        return RecordingStream(stream, self.streams[-1])

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingBackend:
    def __init__(self, inner: SpeechBackend) -> None:
        self.inner = inner
        self.sample_rate = inner.sample_rate
        self.conversations: list[RecordingConversation] = []

    async def open_conversation(self, **kwargs: Any) -> RecordingConversation:
        self.conversations.append(RecordingConversation(await self.inner.open_conversation(**kwargs)))
        return self.conversations[-1]


def pipeline_with_context(
    llm: LLMService, tts: MossTTSService, *tail: FrameProcessor, context: LLMContext | None = None
) -> tuple[Pipeline, LLMContext]:
    context = context or LLMContext()
    pair = LLMContextAggregatorPair(context)
    return Pipeline([pair.user(), llm, tts, *tail, pair.assistant()]), context


def user_says(text: str) -> LLMMessagesAppendFrame:
    return LLMMessagesAppendFrame([{"role": "user", "content": text}], run_llm=True)


def assistant_messages(context: LLMContext) -> list[str]:
    return [str(m["content"]) for m in context.get_messages() if m.get("role") == "assistant"]


def dominant_hz(pcm16: bytes) -> float:
    samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[int(np.argmax(spectrum))])


def audio_of(frames: list[Frame]) -> bytes:
    return b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))


# -- tests ----------------------------------------------------------------------------------------


async def test_a_reply_streams_started_audio_stopped_and_its_words_as_text_frames() -> None:
    """pipecat's run_test: one context in, the engine's audio out unchanged (as int16), framed by
    TTSStarted/TTSStopped, its words as TTSTextFrames, the LLM's end after the audio, TTFB reported."""
    reply = "Hello there, how are you today?"
    backend = RecordingBackend(FakeSpeechBackend())
    tts = MossTTSService(backend)
    context = LLMContext([{"role": "user", "content": "hi"}])
    down, _ = await run_test(
        Pipeline([ScriptedLLM([reply]), tts]),
        frames_to_send=[LLMContextFrame(context)],
        pipeline_params=PipelineParams(enable_metrics=True),
    )
    kinds = [type(f) for f in down if isinstance(f, (TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame))]
    audio_frames = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert kinds == [TTSStartedFrame, *[TTSAudioRawFrame] * len(audio_frames), TTSStoppedFrame]
    assert all(f.sample_rate == RATE and f.num_channels == 1 for f in audio_frames)
    [conversation] = backend.conversations
    [log] = conversation.streams
    assert log.text == reply  # token streaming: the text reached the engine as written
    assert audio_of(down) == b"".join(pcm16_bytes(c) for c in log.chunks)
    assert len(log.chunks) == len(reply)  # the fake speaks one frame per character: all of it
    words = [f.text for f in down if isinstance(f, TTSTextFrame)]
    assert words == reply.split()
    order = [type(f) for f in down]
    assert order.index(LLMFullResponseEndFrame) > order.index(TTSStoppedFrame)
    ttfb = [d for f in down if isinstance(f, MetricsFrame) for d in f.data if isinstance(d, TTFBMetricsData)]
    [measured] = [d for d in ttfb if d.value > 0]  # pipecat also reports a zero at start
    assert measured.processor == str(tts) and measured.model == "MOSS-TTS-Realtime"
    assert conversation.inner.closed  # the EndFrame closed the conversation (freed the slot)


async def test_an_announcement_and_a_reply_are_two_turns_of_one_conversation() -> None:
    """A TTSSpeakFrame and then an LLM reply: two pipecat contexts, two engine turns in order on one
    conversation (the first settled before the second starts), each framed by started/stopped."""
    backend = RecordingBackend(FakeSpeechBackend())
    context = LLMContext([{"role": "user", "content": "hi"}])
    down, _ = await run_test(
        Pipeline([ScriptedLLM(["Fine, thanks."]), MossTTSService(backend)]),
        frames_to_send=[TTSSpeakFrame("Welcome back."), LLMContextFrame(context)],
    )
    marks = [type(f) for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))]
    assert marks == [TTSStartedFrame, TTSStoppedFrame] * 2
    assert [f.text for f in down if isinstance(f, TTSTextFrame)] == ["Welcome", "back.", "Fine,", "thanks."]
    [conversation] = backend.conversations
    assert [(log.turn_id, log.text) for log in conversation.streams] == [
        (1, "Welcome back."),
        (2, "Fine, thanks."),
    ]
    assert conversation.inner.context == [("assistant", "Welcome back."), ("assistant", "Fine, thanks.")]


async def test_a_turn_that_ends_before_the_reply_keeps_one_audio_context() -> None:
    """The engine ends the turn (here its frame cap) while the LLM still streams: the rest of the
    reply goes to the ended turn, not to a new audio context that no audio would ever fill (pipecat
    would wait 3 s for it, then report an error)."""
    reply = "A reply much longer than the four frames this engine may speak for it."
    backend = RecordingBackend(FakeSpeechBackend(max_frames_per_turn=4))  # 4 frames in about 0.1 s
    down, up = await run_test(
        Pipeline([ScriptedLLM([reply], token_delay_s=0.03), MossTTSService(backend)]),  # 0.45 s of text
        frames_to_send=[LLMContextFrame(LLMContext([{"role": "user", "content": "hi"}]))],
    )
    kinds = [type(f) for f in down if isinstance(f, (TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame))]
    assert kinds == [TTSStartedFrame, *[TTSAudioRawFrame] * 4, TTSStoppedFrame]
    assert not [f for f in [*down, *up] if isinstance(f, ErrorFrame)]
    [log] = backend.conversations[0].streams
    assert len(log.chunks) == 4


async def test_cancelling_the_pipeline_settles_the_turn_and_frees_the_slot() -> None:
    backend = FakeSpeechBackend()
    recording = RecordingBackend(backend)
    recorder = Recorder()
    pipeline, _ = pipeline_with_context(ScriptedLLM(["A reply long enough to still be speaking."]),
                                        MossTTSService(recording), recorder)  # fmt: skip
    worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)

    async def converse() -> None:
        await worker.queue_frame(user_says("talk"))
        await recorder.wait_for(TTSAudioRawFrame, 3)
        await worker.cancel()

    await run_pipeline(worker, converse)
    [log] = recording.conversations[0].streams
    [(heard_s, heard)] = log.interrupts
    assert heard_s is not None and log.made_at_interrupt is not None and heard_s <= log.made_at_interrupt
    assert heard.frames < len(log.text)
    assert backend.active == set()  # the conversation was closed: its slot is free


async def test_from_url_speaks_through_a_speech_server() -> None:
    """``MossTTSService.from_url``: the service owns a RemoteSpeechBackend on a session server (here
    serving the fake backend); its audio is the server conversation's tone; the end of the pipeline
    closes the conversation on the server."""
    pytest.importorskip("aiohttp")
    from moss_agent.service.sessions import session_server

    backend = FakeSpeechBackend()
    reply = "Hello from the server."
    async with session_server(backend) as url:
        tts = MossTTSService.from_url(url)
        down, _ = await run_test(
            Pipeline([ScriptedLLM([reply]), tts]),
            frames_to_send=[LLMContextFrame(LLMContext([{"role": "user", "content": "hi"}]))],
        )
        pcm = audio_of(down)
        assert len(pcm) == len(reply) * 1920 * 2
        assert dominant_hz(pcm) == pytest.approx(backend.tone_hz(0), abs=2.0)
        assert [f.text for f in down if isinstance(f, TTSTextFrame)] == reply.split()
        assert backend.active == set()


async def test_an_interruption_rolls_the_engine_back_to_what_was_played_and_the_next_turn_continues() -> None:
    """Through a real-time speaker: the user barges in once two words were played. The engine stream
    is cut at min(pushed, played time), less than it made; pipecat's context keeps the words played;
    the next reply starts a new turn on the same conversation, which kept the cut reply."""
    long_reply = "Well, I think the weather will be lovely tomorrow, unless the forecast is wrong again."
    backend = RecordingBackend(FakeSpeechBackend())
    context = LLMContext()
    tts = MossTTSService(backend, context=context)  # the user's words go to the engine too
    recorder = Recorder()
    pipeline, _ = pipeline_with_context(
        ScriptedLLM([long_reply, "Sure."]), tts, Speaker(), recorder, context=context
    )
    worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)

    async def converse() -> None:
        await worker.queue_frame(user_says("what about tomorrow?"))
        await recorder.wait_for(TTSTextFrame, 2)
        await worker.queue_frame(InterruptionFrame())
        await worker.queue_frame(user_says("stop"))
        await recorder.wait_for(LLMFullResponseEndFrame, 1)
        await worker.queue_frame(EndFrame())

    await run_pipeline(worker, converse)

    [conversation] = backend.conversations
    first, second = conversation.streams
    [(heard_s, heard)] = first.interrupts
    assert heard_s is not None and first.made_at_interrupt is not None
    # cut at what was played, not at what was made (the fake makes audio 4x faster than real time)
    assert 0 < heard_s < first.made_at_interrupt, (heard_s, first.made_at_interrupt)
    assert 0 < heard.frames < len(long_reply)
    spoken = assistant_messages(context)
    assert len(spoken) == 2
    assert long_reply.startswith(spoken[0]) and 0 < len(spoken[0]) < len(long_reply)
    assert spoken[1] == "Sure."
    # The engine's context continues from the cut (the heard prefix), each turn after the user's words.
    assert conversation.inner.context == [
        ("user", "what about tomorrow?"),
        ("assistant", long_reply[: heard.frames]),
        ("user", "stop"),
        ("assistant", "Sure."),
    ]
    assert second.interrupts == [] and second.text == "Sure."


async def test_two_pipelines_share_one_backend_without_cross_talk() -> None:
    """Two pipelines in one process, one service each, on one backend: two conversations (slots),
    each pipeline's audio in its own conversation's tone only."""
    backend = FakeSpeechBackend()
    replies = ["Good morning to the first caller.", "And good evening to the second one."]
    recording = RecordingBackend(backend)
    services = [MossTTSService(recording) for _ in replies]
    recorders = [Recorder() for _ in replies]
    workers = []
    for reply, tts, recorder in zip(replies, services, recorders, strict=True):
        pipeline, _ = pipeline_with_context(ScriptedLLM([reply]), tts, recorder)
        workers.append(PipelineWorker(pipeline, cancel_on_idle_timeout=False))

    async def converse(worker: PipelineWorker, recorder: Recorder) -> None:
        await worker.queue_frame(user_says("hello"))
        await recorder.wait_for(LLMFullResponseEndFrame, 1)
        await worker.queue_frame(EndFrame())

    starts = [watch_start(w) for w in workers]
    runner = WorkerRunner()
    await runner.add_workers(*workers)
    async with asyncio.timeout(60):
        await asyncio.gather(
            runner.run(),
            *(after(s, converse(w, r)) for s, w, r in zip(starts, workers, recorders, strict=True)),
        )
    for reply, tts, recorder in zip(replies, services, recorders, strict=True):
        pcm = audio_of(recorder.frames)
        assert len(pcm) == len(reply) * 1920 * 2  # every character, one 80 ms frame each
        assert tts.conversation is None  # closed by the EndFrame
    slots = [conversation.inner.slot for conversation in recording.conversations]
    assert len(set(slots)) == 2
    for slot, recorder in zip(slots, recorders, strict=True):
        assert dominant_hz(audio_of(recorder.frames)) == pytest.approx(backend.tone_hz(slot), abs=2.0)


async def test_the_tiny_engine_speaks_two_turns_through_pipecat(
    tiny_realtime_dir: Path, tiny_codec_dir: Path
) -> None:
    """The real engine (tiny random weights, CPU): each reply is a turn on one engine slot, its
    frames reach pipecat as 80 ms int16 frames between TTSStarted and TTSStopped, the slot is freed
    at the end."""
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.realtime import SamplingConfig

    config = RealtimeEngineConfig(
        num_slots=2, max_context=512, max_frames_per_turn=16,
        sampling=SamplingConfig(greedy=True, min_frames=4), cpu_threads=1,
    )  # fmt: skip
    engine = RealtimeEngine.load(tiny_realtime_dir, tiny_codec_dir, device="cpu", config=config)
    await engine.start()
    try:
        backend = RecordingBackend(engine)
        context = LLMContext()
        tts = MossTTSService(backend, context=context)
        recorder = Recorder()
        replies = ["Nice to meet you, friend.", "Goodbye for now."]
        pipeline, _ = pipeline_with_context(ScriptedLLM(replies), tts, recorder, context=context)
        worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)

        async def converse() -> None:
            for n, question in enumerate(["hi", "bye"], start=1):
                await worker.queue_frame(user_says(question))
                await recorder.wait_for(LLMFullResponseEndFrame, n, timeout=60)
            await worker.queue_frame(EndFrame())

        await run_pipeline(worker, converse, timeout=120)
        [conversation] = backend.conversations
        assert [log.text for log in conversation.streams] == replies
        assert [user.text if user else None for user in conversation.users] == ["hi", "bye"]
        for start in [i for i, f in enumerate(recorder.frames) if isinstance(f, TTSStartedFrame)]:
            stop = next(
                i for i, f in enumerate(recorder.frames[start:], start) if isinstance(f, TTSStoppedFrame)
            )
            audio = [f for f in recorder.frames[start:stop] if isinstance(f, TTSAudioRawFrame)]
            assert 4 <= len(audio) <= 16 and all(len(f.audio) == 1920 * 2 for f in audio)
        assert audio_of(recorder.frames) == b"".join(
            pcm16_bytes(c) for log in conversation.streams for c in log.chunks
        )
        assert np.abs(np.frombuffer(audio_of(recorder.frames), dtype="<i2")).max() > 0
        assert len(assistant_messages(context)) == 2
        assert engine.free_slots == 2  # the EndFrame closed the conversation
    finally:
        await engine.aclose()


async def test_the_tiny_engine_is_cut_back_to_what_was_played(
    tiny_realtime_endless_dir: Path, tiny_codec_dir: Path
) -> None:
    """An interruption on the real engine: the turn (which would run to its 1.9 s cap) is cut at the
    played estimate, well short of what the engine had made, and the next turn speaks."""
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.realtime import SamplingConfig

    config = RealtimeEngineConfig(
        num_slots=1, max_context=512, max_frames_per_turn=24, max_ahead_s=4.0,
        sampling=SamplingConfig(greedy=True), cpu_threads=1,
    )  # fmt: skip
    engine = RealtimeEngine.load(tiny_realtime_endless_dir, tiny_codec_dir, device="cpu", config=config)
    async with engine:
        backend = RecordingBackend(engine)
        speaker, recorder = Speaker(), Recorder()
        llm = ScriptedLLM(["This reply goes on and on, far longer than anyone wants to listen.", "Okay."])
        pipeline, _ = pipeline_with_context(llm, MossTTSService(backend), speaker, recorder)
        worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)

        async def converse() -> None:
            await worker.queue_frame(user_says("talk"))
            await speaker.wait_played(0.5)
            await worker.queue_frame(InterruptionFrame())
            await worker.queue_frame(user_says("stop"))
            await recorder.wait_for(LLMFullResponseEndFrame, 1, timeout=60)
            await worker.queue_frame(EndFrame())

        await run_pipeline(worker, converse, timeout=120)
        first, second = backend.conversations[0].streams
        [(heard_s, heard)] = first.interrupts
        assert heard_s is not None and first.made_at_interrupt is not None
        # At most what was made (less, unless a loaded machine kept the engine near real time) and
        # short of the whole turn: the engine kept the frames played.
        assert 0.5 <= heard_s <= first.made_at_interrupt, (heard_s, first.made_at_interrupt)
        assert heard.frames == math.ceil(heard_s / 0.08 - 1e-6) < 24
        assert second.text == "Okay." and second.chunks and not second.interrupts


def test_the_adapter_needs_pipecat_and_never_torch() -> None:
    """Without pipecat the import names the extra; with it, importing the adapter loads no torch."""
    blocked = (
        "import sys; sys.modules['pipecat'] = None\n"
        "from moss_agent.errors import MissingExtraError\n"
        "try:\n    import moss_agent.integrations.pipecat\nexcept MissingExtraError as e:\n"
        "    print(e.extra, 'moss-agent[pipecat]' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pipecat", "True"], out.stderr
    light = "import sys, moss_agent.integrations.pipecat; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# -- running pipelines ----------------------------------------------------------------------------


def watch_start(worker: PipelineWorker) -> asyncio.Event:
    """An event set once the worker's pipeline has started (frames queued before are dropped)."""
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker: PipelineWorker, _frame: Frame) -> None:
        started.set()

    return started


async def after(started: asyncio.Event, body: Any) -> None:
    await started.wait()
    await body


async def run_pipeline(worker: PipelineWorker, converse: Any, timeout: float = 60) -> None:
    started = watch_start(worker)
    runner = WorkerRunner()
    await runner.add_workers(worker)
    async with asyncio.timeout(timeout):
        await asyncio.gather(runner.run(), after(started, converse()))
