"""Framework overhead on first audio: pipecat's MossTTSService and LiveKit's MossTTS on one engine.

For each framework, 1 and 8 concurrent pipelines (pipecat) or streams (LiveKit) share ONE speech
backend and speak ``--turns`` replies each, streamed token by token as an LLM would. Per turn:

- adapter first audio: the first text token entering the adapter -> the first audio frame leaving
  the framework. pipecat: the first ``LLMTextFrame`` of a reply queued into ``MossTTSService`` ->
  its first ``TTSAudioRawFrame`` pushed downstream. LiveKit: the first ``push_text`` on the
  ``SynthesizeStream`` -> the first ``SynthesizedAudio`` it yields.
- engine first audio: the same turn's first ``push_text`` on the engine's ``SpeechStream`` -> its
  first ``AudioChunk``, recorded by a timing proxy between adapter and backend that forwards every
  call unchanged.
- overhead = adapter first audio - engine first audio: what the framework and the adapter add.
  The part of ``start_turn`` (a round trip to the engine's device thread) still running when the
  first text arrives falls inside it, so it has a column of its own; the adapters start the turn
  when the reply starts, so with an LLM's time to first token (``--ttft-s``) it is mostly hidden.

Every pipeline ends in a real-time sink (pipecat: an output transport that sleeps each frame's
length; LiveKit: the plugin's default hold until the turn was played), so the loop carries the
pacing work of a live call. The first turn of each pipeline warms imports and the slot up and is
not counted. Target (the issue): overhead under 5 ms p95 on the tiny engine.

    .venv/bin/python benchmarks/adapters.py                          # tiny engine, both, 1 and 8
    .venv/bin/python benchmarks/adapters.py --backend fake --turns 2 # the script itself, seconds
    .venv/bin/python benchmarks/adapters.py --framework livekit --concurrency 8 --turns 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent import loop_lag  # the same probe as the pipeline benchmark (benchmarks/ is on sys.path)

from moss_agent.events import AudioChunk
from moss_agent.streaming.tts import HeardResult, SpeechBackend, UserTurn

REPLY = (
    "Sure, your order shipped this morning and it should reach you on Thursday before noon, "
    "so keep an eye on the porch."
)
FRAMEWORKS = ("pipecat", "livekit")


def now() -> float:
    return time.perf_counter()


# -- the timing proxy: the engine's own first audio, per turn -----------------------------------------


@dataclass
class EngineTurn:
    """perf_counter() stamps of one turn as the backend saw it."""

    start_called: float = 0.0
    start_returned: float = 0.0
    first_push: float | None = None
    first_chunk: float | None = None

    @property
    def first_audio_s(self) -> float | None:
        if self.first_push is None or self.first_chunk is None:
            return None
        return self.first_chunk - self.first_push


class TimedStream:
    """A SpeechStream that stamps the first push_text and the first chunk, and forwards the rest."""

    def __init__(self, inner: Any, times: EngineTurn) -> None:
        self.inner = inner
        self.times = times
        self.turn_id: int = inner.turn_id

    async def push_text(self, delta: str) -> None:
        if self.times.first_push is None:
            self.times.first_push = now()
        await self.inner.push_text(delta)

    async def end_input(self) -> None:
        await self.inner.end_input()

    async def __aiter__(self) -> AsyncIterator[AudioChunk]:
        async for chunk in self.inner:
            if self.times.first_chunk is None:
                self.times.first_chunk = now()
            yield chunk

    async def interrupt(self, heard_s: float | None = None) -> HeardResult:
        result: HeardResult = await self.inner.interrupt(heard_s)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:  # the rest of the stream, unchanged
        return getattr(self.inner, name)


class TimedConversation:
    def __init__(self, inner: Any, turns: list[EngineTurn]) -> None:
        self.inner = inner
        self.sample_rate: int = inner.sample_rate
        self.turns = turns

    async def start_turn(self, user: UserTurn | None, turn_id: int, **options: Any) -> TimedStream:
        times = EngineTurn(start_called=now())
        stream = await self.inner.start_turn(user, turn_id, **options)
        times.start_returned = now()
        self.turns.append(times)
        return TimedStream(stream, times)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:  # the rest of the conversation, unchanged
        return getattr(self.inner, name)


class TimedBackend:
    """One per pipeline over the shared backend, so each pipeline's engine turns are its own list."""

    def __init__(self, inner: SpeechBackend) -> None:
        self.inner = inner
        self.sample_rate = inner.sample_rate
        self.turns: list[EngineTurn] = []

    async def open_conversation(self, **options: Any) -> TimedConversation:
        # Options pass through as given: the proxy changes no call, whatever the protocol grows.
        return TimedConversation(await self.inner.open_conversation(**options), self.turns)


# -- per-turn results -----------------------------------------------------------------------------------


@dataclass
class Turn:
    text_in: float  # first text token into the adapter
    audio_out: float  # first audio frame out of the framework
    engine: EngineTurn

    @property
    def adapter_s(self) -> float:
        return self.audio_out - self.text_in

    @property
    def overhead_s(self) -> float:
        return self.adapter_s - (self.engine.first_audio_s or 0.0)

    @property
    def start_turn_s(self) -> float:
        """The part of start_turn after the first text arrived: the adapters start the engine turn
        when the reply starts, so the rest of it overlapped the LLM's time to first token."""
        return max(0.0, self.engine.start_returned - max(self.engine.start_called, self.text_in))

    @property
    def framework_s(self) -> float:
        """The overhead less that: what is left once the engine's own work is taken out."""
        return self.overhead_s - self.start_turn_s

    @property
    def text_hop_s(self) -> float:
        """First token into the adapter -> the engine's first push_text (start_turn included)."""
        return (self.engine.first_push or self.text_in) - self.text_in

    @property
    def audio_hop_s(self) -> float:
        """The engine's first chunk -> the first frame out of the framework."""
        return self.audio_out - (self.engine.first_chunk or self.audio_out)


@dataclass
class PipelineRun:
    """What one pipeline measured: adapter stamps in turn order, matched to its engine turns."""

    backend: TimedBackend
    text_in: list[float] = field(default_factory=list)
    audio_out: list[float] = field(default_factory=list)

    def turns(self, warmup: int) -> list[Turn]:
        engine = self.backend.turns
        count = min(len(self.text_in), len(self.audio_out), len(engine))
        if not count == len(self.text_in) == len(self.audio_out) == len(engine):
            print(
                f"  note: a pipeline recorded {len(self.text_in)} text starts, {len(self.audio_out)} first "
                f"frames and {len(engine)} engine turns; the first {count} are matched",
                file=sys.stderr,
            )
        return [
            Turn(self.text_in[i], self.audio_out[i], engine[i])
            for i in range(warmup, count)
            if engine[i].first_audio_s is not None
        ]


def pauses(args: argparse.Namespace) -> Iterator[float]:
    """Seconds to wait before each turn of one pipeline: a random share of ``--spread-s``, so the
    pipelines' turns start at independent times, as separate calls' do (0: all in lockstep)."""
    rng = random.Random(next(args.seeds))
    while True:
        yield rng.uniform(0.0, args.spread_s)


# -- pipecat -----------------------------------------------------------------------------------------


async def run_pipecat(backend: SpeechBackend, pipelines: int, args: argparse.Namespace) -> list[PipelineRun]:
    from pipecat.frames.frames import (
        EndFrame,
        Frame,
        LLMContextFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        OutputAudioRawFrame,
        StartFrame,
        TTSAudioRawFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.llm_service import LLMService
    from pipecat.services.settings import LLMSettings
    from pipecat.transports.base_output import BaseOutputTransport
    from pipecat.transports.base_transport import TransportParams
    from pipecat.workers.runner import WorkerRunner

    from moss_agent.integrations.pipecat import MossTTSService

    class ScriptedLLM(LLMService):
        """Answers every context with the reply, one word token per ``token_delay_s``."""

        def __init__(self) -> None:
            settings: dict[str, Any] = {
                f.name: None for f in dataclasses.fields(LLMSettings) if not f.name.startswith("_")
            }
            super().__init__(settings=LLMSettings(**{**settings, "model": "scripted"}))

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if not isinstance(frame, LLMContextFrame):
                await self.push_frame(frame, direction)
                return
            await self.push_frame(LLMFullResponseStartFrame())
            await asyncio.sleep(args.ttft_s)  # the LLM's time to first token
            for token in re.findall(r"\s*\S+", args.reply):
                await self._push_llm_text(token)
                await asyncio.sleep(args.token_delay_s)
            await self.push_frame(LLMFullResponseEndFrame())

    class TimedTTS(MossTTSService):
        """Stamps where text enters the service (its input queue) and where audio leaves it."""

        def __init__(self, backend: SpeechBackend, run: PipelineRun) -> None:
            super().__init__(backend)
            self.run = run
            self._awaiting_text = False
            self._contexts_heard: set[str | None] = set()

        async def queue_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM,
                              callback: Any = None) -> None:  # fmt: skip
            if isinstance(frame, LLMFullResponseStartFrame):
                self._awaiting_text = True
            elif isinstance(frame, LLMTextFrame) and self._awaiting_text:
                self._awaiting_text = False
                self.run.text_in.append(now())
            await super().queue_frame(frame, direction, callback)

        async def push_frame(
            self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
        ) -> None:
            if (
                isinstance(frame, TTSAudioRawFrame)
                and direction == FrameDirection.DOWNSTREAM
                and frame.context_id not in self._contexts_heard
            ):
                self._contexts_heard.add(frame.context_id)
                self.run.audio_out.append(now())
            await super().push_frame(frame, direction)

    class Speaker(BaseOutputTransport):
        """Plays in real time (sleeps each frame's length), as a WebRTC or sound-card output would."""

        def __init__(self, rate: int) -> None:
            super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=rate))

        async def start(self, frame: StartFrame) -> None:
            await super().start(frame)
            await self.set_transport_ready(frame)

        async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
            await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)
            return True

    class ReplyEnds(FrameProcessor):
        """Sets an event per finished reply (pipecat sends the LLM's end after the reply's audio)."""

        def __init__(self) -> None:
            super().__init__()
            self.ended: asyncio.Queue[None] = asyncio.Queue()

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, LLMFullResponseEndFrame) and direction == FrameDirection.DOWNSTREAM:
                self.ended.put_nowait(None)
            await self.push_frame(frame, direction)

    runs: list[PipelineRun] = []
    workers: list[PipelineWorker] = []
    bodies: list[Callable[[], Awaitable[None]]] = []
    for _ in range(pipelines):
        run = PipelineRun(TimedBackend(backend))
        ends = ReplyEnds()
        pipeline = Pipeline([ScriptedLLM(), TimedTTS(run.backend, run), Speaker(backend.sample_rate), ends])
        # enable_rtvi None: pipecat's default (RTVI observer and processor on), what a bot gets.
        worker = PipelineWorker(
            pipeline, cancel_on_idle_timeout=False, enable_rtvi=False if args.no_rtvi else None
        )
        started = asyncio.Event()

        @worker.event_handler("on_pipeline_started")  # type: ignore[untyped-decorator]
        async def _started(_worker: PipelineWorker, _frame: Frame, started: asyncio.Event = started) -> None:
            started.set()

        async def converse(worker: PipelineWorker = worker, ends: ReplyEnds = ends,
                           started: asyncio.Event = started) -> None:  # fmt: skip
            await started.wait()
            context = LLMContext([{"role": "user", "content": "Where is my order?"}])
            pause = pauses(args)
            for _ in range(args.warmup + args.turns):
                await asyncio.sleep(next(pause))
                await worker.queue_frame(LLMContextFrame(context))
                await ends.ended.get()
            await worker.queue_frame(EndFrame())

        runs.append(run)
        workers.append(worker)
        bodies.append(converse)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(*workers)
    async with asyncio.timeout(args.timeout_s):
        await asyncio.gather(runner.run(), *(body() for body in bodies))
    return runs


# -- LiveKit -----------------------------------------------------------------------------------------


async def run_livekit(backend: SpeechBackend, streams: int, args: argparse.Namespace) -> list[PipelineRun]:
    from livekit.agents import APIConnectOptions

    from moss_agent.integrations.livekit import MossTTS

    once = APIConnectOptions(max_retry=0, timeout=args.timeout_s)
    tokens = re.findall(r"\s*\S+", args.reply)

    async def session(run: PipelineRun) -> None:
        tts = MossTTS(backend=run.backend)  # one per AgentSession, as LiveKit's entrypoint builds it
        pause = pauses(args)
        try:
            for _ in range(args.warmup + args.turns):
                await asyncio.sleep(next(pause))
                stamps: dict[str, float] = {}
                async with tts.stream(conn_options=once) as stream:

                    async def forward(stamps: dict[str, float] = stamps) -> None:  # as tts_node does
                        await asyncio.sleep(args.ttft_s)  # the stream opens as the LLM request goes out
                        for token in tokens:
                            stamps.setdefault("text_in", now())
                            stream.push_text(token)
                            await asyncio.sleep(args.token_delay_s)
                        stream.end_input()

                    forwarding = asyncio.create_task(forward(), name="livekit-bench-text")
                    try:
                        async for _event in stream:
                            stamps.setdefault("audio_out", now())
                    finally:
                        await forwarding
                if "audio_out" in stamps:
                    run.text_in.append(stamps["text_in"])
                    run.audio_out.append(stamps["audio_out"])
        finally:
            await tts.aclose()

    runs = [PipelineRun(TimedBackend(backend)) for _ in range(streams)]
    async with asyncio.timeout(args.timeout_s):
        await asyncio.gather(*(session(run) for run in runs))
    return runs


# -- backends, loop lag, report -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_backend(args: argparse.Namespace) -> AsyncIterator[SpeechBackend]:
    if args.backend == "fake":
        from moss_agent.testing import FakeSpeechBackend

        # 20 ms frames keep the real-time playback (and so the check of the script) short.
        yield FakeSpeechBackend(frame_s=0.02, rtf=0.25, ttfa_s=0.05, max_frames_per_turn=args.max_frames)
        return
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.realtime import SamplingConfig
    from moss_agent.options import ensure_tiny_checkpoints

    # What the CLI's --tiny loads (made once into the cache), with a slot per pipeline, and a
    # shortest turn so every reply speaks (the random model may stop on its first frame).
    model, codec = await asyncio.to_thread(ensure_tiny_checkpoints)
    config = RealtimeEngineConfig(
        num_slots=max(8, max(args.concurrency)),
        max_context=2048,
        max_frames_per_turn=args.max_frames,
        sampling=SamplingConfig(min_frames=min(4, args.max_frames)),
        seed=0,
    )
    engine = await asyncio.to_thread(RealtimeEngine.load, model, codec, device=args.device, config=config)
    async with engine:
        yield engine


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def row(framework: str, concurrency: int, turns: list[Turn]) -> str:
    engine = [t.engine.first_audio_s or 0.0 for t in turns]
    adapter = [t.adapter_s for t in turns]
    over = [t.overhead_s for t in turns]
    return (
        f"{framework:<8}{concurrency:>5}{len(turns):>7}"
        f"{pct(engine, 0.5):>9.1f}{pct(engine, 0.95):>7.1f}"
        f"{pct(adapter, 0.5):>9.1f}{pct(adapter, 0.95):>7.1f}"
        f"{pct(over, 0.5):>9.2f}{pct(over, 0.95):>7.2f}{max(over) * 1000:>7.2f}"
    )


def split_row(
    framework: str,
    concurrency: int,
    turns: list[Turn],
    lags: list[float],
    tick_ms: float | None,
    cores: float,
) -> str:
    text = [t.text_hop_s for t in turns]
    start = [t.start_turn_s for t in turns]
    audio = [t.audio_hop_s for t in turns]
    rest = [t.framework_s for t in turns]
    tick = f"{tick_ms:>7.1f}" if tick_ms is not None else f"{'-':>7}"
    tick += f"{cores:>6.2f}"
    return (
        f"{framework:<8}{concurrency:>5}"
        f"{pct(text, 0.5):>9.2f}{pct(text, 0.95):>7.2f}"
        f"{pct(start, 0.5):>9.2f}{pct(start, 0.95):>7.2f}"
        f"{pct(audio, 0.5):>9.2f}{pct(audio, 0.95):>7.2f}"
        f"{pct(rest, 0.5):>9.2f}{pct(rest, 0.95):>7.2f}{max(rest) * 1000:>7.2f}"
        f"{pct(lags, 0.5):>9.2f}{pct(lags, 0.95):>7.2f}{max(lags) * 1000:>7.1f}{tick}"
    )


HEADER = (
    f"{'':<20}{'engine':>16}{'adapter':>16}{'overhead':>23}\n"
    f"{'framework':<8}{'conc':>5}{'turns':>7}"
    f"{'p50':>9}{'p95':>7}{'p50':>9}{'p95':>7}{'p50':>9}{'p95':>7}{'max':>7}"
)
SPLIT_HEADER = (
    f"{'':<13}{'text -> engine':>16}{'(start_turn)':>16}{'engine -> out':>16}{'overhead - start':>23}"
    f"{'loop lag':>23}{'tick':>7}{'cpu':>6}\n"
    f"{'framework':<8}{'conc':>5}"
    f"{'p50':>9}{'p95':>7}{'p50':>9}{'p95':>7}{'p50':>9}{'p95':>7}{'p50':>9}{'p95':>7}{'max':>7}"
    f"{'p50':>9}{'p95':>7}{'max':>7}{'mean':>7}{'cores':>6}"
)


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


async def bench(args: argparse.Namespace) -> int:
    from loguru import logger

    logger.remove()  # pipecat logs every frame at DEBUG through loguru: that would be measured too
    logger.add(sys.stderr, level="WARNING")
    tokens = len(re.findall(r"\s*\S+", args.reply))
    print(f"backend: {args.backend}; reply of {tokens} tokens, the first after {args.ttft_s * 1000:g} ms, "
          f"then one per {args.token_delay_s * 1000:g} ms; at most {args.max_frames} frames a turn; "
          f"{args.turns} turns per pipeline after {args.warmup} warm-up, each after a pause of 0 to "
          f"{args.spread_s:g} s")  # fmt: skip
    print(f"load before: {load()}")
    results: list[tuple[str, int, list[Turn], list[float], float | None, float]] = []
    async with open_backend(args) as backend:
        for framework in args.framework:
            for concurrency in args.concurrency:
                runner = run_pipecat if framework == "pipecat" else run_livekit
                stats = getattr(backend, "stats", None)  # the engine's tick counters
                ticks = (stats.ticks, stats.tick_seconds) if stats is not None else None
                cpu, wall = time.process_time(), now()
                lags: list[float] = []
                probe = asyncio.create_task(loop_lag(lags), name="loop-lag-probe")
                try:
                    runs = await runner(backend, concurrency, args)
                finally:
                    probe.cancel()
                    await asyncio.wait([probe])
                turns = [t for run in runs for t in run.turns(args.warmup)]
                cores = (time.process_time() - cpu) / (now() - wall)  # this process: loop + engine thread
                tick_ms = None
                if stats is not None and ticks is not None and stats.ticks > ticks[0]:
                    tick_ms = (stats.tick_seconds - ticks[1]) / (stats.ticks - ticks[0]) * 1000
                results.append((framework, concurrency, turns, lags or [0.0], tick_ms, cores))
                print(f"  done: {framework} x{concurrency}", file=sys.stderr, flush=True)
    spoke = [r for r in results if r[2]]
    for framework, concurrency, turns, *_ in results:
        if not turns:
            print(f"{framework} x{concurrency}: no turn spoke, nothing to report")
    print("\nfirst audio, ms per turn. engine: its first push_text -> its first chunk; adapter: the first "
          "token into the\nadapter -> the first frame out of the framework; overhead = adapter - engine")  # fmt: skip
    print(HEADER)
    print("\n".join(row(f, c, t) for f, c, t, *_ in spoke))
    print("\nwhere it goes, ms: the first token's way to the engine's first push_text, of which start_turn still running (the "
          "engine's\ndevice thread: waiting for the tick in progress, then the prompt's prefill); the first "
          "chunk's way out;\nthe overhead less that (the frameworks' and adapters' own share); loop lag: "
          "how late a 5 ms sleeper\nwoke meanwhile (the GIL and CPU the engine thread takes); tick: the engine's "
          "mean batched step;\ncpu: cores this process used (event loop and engine thread), of the machine's "
          f"{os.cpu_count()}")  # fmt: skip
    print(SPLIT_HEADER)
    print("\n".join(split_row(*result) for result in spoke))
    print(f"\ntarget: overhead p95 < 5 ms (tiny engine)\nload after: {load()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("tiny", "fake"), default="tiny",
                        help="tiny: the CLI's --tiny engine (random weights, CPU); "
                             "fake: FakeSpeechBackend, to check the script (default tiny)")  # fmt: skip
    parser.add_argument("--framework", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8],
                        help="pipelines (streams) sharing the one backend (default 1 8)")  # fmt: skip
    parser.add_argument("--turns", type=int, default=8, help="measured turns per pipeline (default 8)")
    parser.add_argument("--warmup", type=int, default=1, help="turns per pipeline not counted (default 1)")
    parser.add_argument("--reply", default=REPLY, help="what the scripted LLM answers every time")
    parser.add_argument("--token-delay-s", type=float, default=0.01, help="LLM time per token (default 0.01)")
    parser.add_argument("--ttft-s", type=float, default=0.2,
                        help="LLM time to first token, from the reply's start (pipecat's "
                             "LLMFullResponseStartFrame, LiveKit's stream opening); the adapters start "
                             "the engine turn meanwhile (default 0.2; 0 shows the start's full cost)")  # fmt: skip
    parser.add_argument("--max-frames", type=int, default=8,
                        help="frame cap of a turn (80 ms each on the engine; default 8)")  # fmt: skip
    parser.add_argument("--spread-s", type=float, default=0.5,
                        help="each turn starts after a random pause of up to this, so concurrent pipelines "
                             "are not in step (0: lockstep, the worst case; default 0.5)")  # fmt: skip
    parser.add_argument(
        "--no-rtvi", action="store_true",
        help="pipecat without its default RTVI observer and processor (a bot with no RTVI client)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="engine device (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=300.0, help="give up on one configuration after this"
    )
    args = parser.parse_args(argv)
    if args.turns < 1 or args.warmup < 0 or min(args.concurrency) < 1 or args.max_frames < 1:
        parser.error("--turns, --concurrency and --max-frames must be >= 1, --warmup >= 0")
    args.seeds = itertools.count()
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
