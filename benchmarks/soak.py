"""Soak: N concurrent sessions x M turns on one realtime engine, then every conversation alone.

Each session says distinct texts after distinct user messages; some turns are interrupted after a
random number of frames, some LLM token sources raise midway. Sampling is greedy, so a
conversation's audio is a function of its own turns only. Afterwards each conversation is replayed
alone on the same engine (same texts, same end of input, settled at the same heard frames) and
every turn's audio is compared with what the loaded run delivered.

Prints: cross-talk (turns whose audio differs from the solo replay, exactly and beyond 1e-3;
chunks tagged with another turn's id), RSS at start / warm (10% of the turns, once contexts have
filled) / middle / end with the growth from start and from warm, tasks and slots left after every
session closed, p50/p95 first audio (first text -> first chunk out). The audio kept for the replay
goes to a temporary file, so RSS measures the engine and sessions, not the benchmark's records.

    .venv/bin/python benchmarks/soak.py --sessions 8 --turns 50
    .venv/bin/python benchmarks/soak.py --sessions 32 --turns 1000 --replay-sessions 2

The solo replay runs one conversation at a time, so at scale it costs far more than the loaded run
(each turn is replayed without batching); ``--replay-sessions K`` replays K conversations chosen at
random (every one of their turns) instead of all. Chunks with another turn's id are counted for all.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moss_agent.config import SessionConfig
from moss_agent.errors import LLMError
from moss_agent.events import AudioChunk, TextDelta
from moss_agent.limiter import PeakLimiter
from moss_agent.streaming.session import Session
from moss_agent.streaming.tts import UserTurn

WORDS = ["amber", "bright", "calm", "delta", "echo", "fable", "garden", "harbor", "island", "jungle", "kettle", "lemon", "meadow", "north", "orbit", "pepper", "quiet", "river", "silver", "timber", "umber", "velvet", "willow", "yellow", "zephyr"]


@dataclass
class TurnRecord:
    """What one turn of the loaded run sent and delivered."""

    user_text: str
    text: str = ""  # every delta sent to the speech stream
    ended_input: bool = False  # the text pump reached end_input (not cut before)
    heard_s: float = 0.0
    chunks: int = 0
    audio: tuple[int, int] = (0, 0)  # (offset, samples) in its session's AudioSpill, if replayed later
    first_audio_s: float | None = None
    wrong_turn_chunks: int = 0


class AudioSpill:
    """One session's kept audio in a temporary file (appended turn after turn), not in memory."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (open for the whole run; close() ends it)
        self.samples = 0

    def close(self) -> None:
        self._file.close()

    def append(self, pcm: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(pcm, dtype=np.float32).tobytes())
        self.samples += len(pcm)

    def read(self, span: tuple[int, int]) -> np.ndarray:
        self._file.seek(4 * span[0])
        data = np.frombuffer(self._file.read(4 * span[1]), dtype=np.float32)
        self._file.seek(0, 2)  # appending goes on at the end
        return data


@dataclass
class SoakReport:
    sessions: int
    turns: int
    replayed: int
    seconds: float
    interrupted: int
    llm_failures: int
    cross_talk_exact: int
    cross_talk_1e3: int
    wrong_turn_chunks: int
    rss_mb: tuple[float, float, float, float]  # start, warm (10% of turns), middle, end
    leaked_tasks: int
    leaked_slots: int
    first_audio_p50_ms: float
    first_audio_p95_ms: float

    def lines(self) -> list[str]:
        start, warm, middle, end = self.rss_mb
        return [
            f"sessions x turns   {self.sessions} x {self.turns} in {self.seconds:.1f} s "
            f"({self.interrupted} interrupted, {self.llm_failures} LLM failures)",
            f"cross-talk         {self.cross_talk_exact} turns of {self.replayed} sessions differ from the solo replay "
            f"({self.cross_talk_1e3} beyond 1e-3), {self.wrong_turn_chunks} chunks with another turn's id",
            f"RSS MB             start {start:.0f}, warm {warm:.0f}, middle {middle:.0f}, end {end:.0f} "
            f"({100 * (end - start) / start:+.1f}% from start, {100 * (end - warm) / warm:+.1f}% from warm)",
            f"leaked             {self.leaked_tasks} tasks, {self.leaked_slots} slots",
            f"first audio ms     p50 {self.first_audio_p50_ms:.1f}, p95 {self.first_audio_p95_ms:.1f}",
        ]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def tokens(words: list[str], fail_after: int | None) -> AsyncIterator[str]:
    """An LLM-like token source that raises LLMError after ``fail_after`` words."""
    for index, word in enumerate(words):
        if fail_after is not None and index == fail_after:
            raise LLMError(f"injected LLM failure after {index} words")
        await asyncio.sleep(0)
        yield word + " "


async def run_session(
    engine: Any, index: int, turns: int, rng: random.Random, interrupt_p: float, fail_p: float,
    counters: dict[str, int], on_turn: Any, spill: AudioSpill | None = None,
) -> list[TurnRecord]:
    """The session's turns; with ``spill``, each turn's audio is kept there for the solo replay."""
    records: list[TurnRecord] = []
    config = SessionConfig(system_prompt=None, audio_stall_timeout_s=60.0)
    async with Session(engine, config=config, name=f"soak{index}") as session:
        for turn in range(turns):
            words = [f"s{index}t{turn}", *rng.choices(WORDS, k=rng.randint(3, 14))]
            fail_after = rng.randint(0, len(words) - 1) if rng.random() < fail_p else None
            cut_after = rng.randint(1, 8) if rng.random() < interrupt_p else None
            record = TurnRecord(user_text=f"user {index} asks question {turn}?")
            first_sample = spill.samples if spill is not None else 0
            handle = session.respond(tokens(words, fail_after), user_text=record.user_text)
            async for event in handle:
                if isinstance(event, AudioChunk):
                    if event.turn_id != handle.id:
                        record.wrong_turn_chunks += 1
                        continue
                    record.chunks += 1
                    if spill is not None:
                        spill.append(event.pcm)
                    if cut_after is not None and record.chunks == cut_after:
                        await handle.interrupt()
                elif isinstance(event, TextDelta) and event.final:
                    record.ended_input = True
            result = await handle
            record.text, record.heard_s = result.text, result.heard_s
            if spill is not None:
                record.audio = (first_sample, spill.samples - first_sample)
            if result.metrics is not None:
                record.first_audio_s = result.metrics.values.get("first_audio_out_s")  # type: ignore[assignment]
            counters["interrupted"] += result.interrupted and result.error is None
            counters["llm_failures"] += fail_after is not None
            records.append(record)
            on_turn()
    return records


async def replay_alone(engine: Any, records: list[TurnRecord]) -> list[list[AudioChunk]]:
    """The same conversation alone on the engine: same turns, same end of input, same heard frames."""
    conversation = await engine.open_conversation()
    audio: list[list[AudioChunk]] = []
    try:
        for turn_id, record in enumerate(records, start=1):
            stream = await conversation.start_turn(UserTurn(record.user_text), turn_id)
            # a frame counted as heard may have been cut before it reached the collector
            heard_frames = round(record.heard_s / engine.frame_s)
            chunks: list[AudioChunk] = []

            async def produce(stream: Any = stream, record: TurnRecord = record) -> None:
                for word in record.text.split(" ")[:-1] if record.text else []:
                    await stream.push_text(word + " ")
                if record.ended_input:
                    await stream.end_input()

            async with asyncio.TaskGroup() as tg:
                producer = tg.create_task(produce(), name=f"replay-text{turn_id}")
                if heard_frames:
                    async for chunk in stream:
                        chunks.append(chunk)
                        if len(chunks) >= heard_frames:
                            break
                await stream.interrupt(record.heard_s)
                producer.cancel()
            await stream.aclose()
            audio.append(chunks)
    finally:
        await conversation.aclose()
    return audio


def differs(loaded: np.ndarray, alone: list[AudioChunk], tolerance: float) -> bool:
    """Whether the session's output differs from the engine's solo audio sent through the same
    output limiter. The session holds back the limiter's look-ahead (and drops it when a turn is
    cut), and the solo replay may run past what the session delivered, so the session's audio must
    be a prefix of the limited solo audio."""
    if not len(loaded):
        return False
    if not alone:
        return True
    a = loaded
    limiter = PeakLimiter(alone[0].sample_rate)
    b = np.concatenate([limiter.process(np.concatenate([c.pcm for c in alone])), limiter.flush()])
    return len(b) < len(a) or float(np.abs(a - b[: len(a)]).max()) > tolerance


async def run_soak(
    model_dir: Path, codec_dir: Path, *, sessions: int, turns: int, seed: int = 0, interrupt_p: float = 0.3,
    fail_p: float = 0.1, max_frames: int = 16, max_context: int = 1024, replay_sessions: int | None = None,
) -> SoakReport:
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.realtime import SamplingConfig

    config = RealtimeEngineConfig(
        num_slots=sessions, max_waiting=0, max_context=max_context, max_frames_per_turn=max_frames,
        sampling=SamplingConfig(greedy=True), text_buffer_chars=64,
    )
    engine = await asyncio.to_thread(RealtimeEngine.load, model_dir, codec_dir, device="cpu", config=config)
    counters = {"interrupted": 0, "llm_failures": 0}
    total = sessions * turns
    done = 0
    rss = [0.0, 0.0, 0.0, 0.0]

    def on_turn() -> None:
        nonlocal done
        done += 1
        if done == max(1, total // 10):
            rss[1] = rss_mb()
        if done == total // 2:
            rss[3] = rss_mb()

    # Chosen up front: only these keep their audio (on disk, so RSS measures the engine, not the records).
    replayed = sorted(random.Random(seed).sample(range(sessions), min(sessions, replay_sessions or sessions)))
    spills = {i: AudioSpill() for i in replayed}
    async with engine:
        rss[0] = rss_mb()
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            runs = [
                tg.create_task(
                    run_session(
                        engine, i, turns, random.Random(seed * 1000 + i), interrupt_p, fail_p, counters, on_turn,
                        spill=spills.get(i),
                    ),
                    name=f"soak-session{i}",
                )
                for i in range(sessions)
            ]
        seconds = time.perf_counter() - started
        rss[2] = rss_mb()
        leaked_tasks = len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])
        leaked_slots = engine.config.num_slots - engine.free_slots
        records = [run.result() for run in runs]
        exact = loose = 0
        for i in replayed:
            alone = await replay_alone(engine, records[i])
            for record, solo in zip(records[i], alone, strict=True):
                delivered = spills[i].read(record.audio)
                exact += differs(delivered, solo, 0.0)
                loose += differs(delivered, solo, 1e-3)
            spills[i].close()
    first = sorted(1000 * r.first_audio_s for rs in records for r in rs if r.first_audio_s is not None)
    return SoakReport(
        sessions=sessions, turns=turns, replayed=len(replayed), seconds=seconds, interrupted=counters["interrupted"],
        llm_failures=counters["llm_failures"], cross_talk_exact=exact, cross_talk_1e3=loose,
        wrong_turn_chunks=sum(r.wrong_turn_chunks for rs in records for r in rs),
        rss_mb=(rss[0], rss[1], rss[2], rss[3]), leaked_tasks=leaked_tasks, leaked_slots=leaked_slots,
        first_audio_p50_ms=statistics.median(first) if first else float("nan"),
        first_audio_p95_ms=first[min(len(first) - 1, int(0.95 * len(first)))] if first else float("nan"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interrupt", type=float, default=0.3, help="share of turns interrupted")
    parser.add_argument("--fail", type=float, default=0.1, help="share of turns whose token source raises")
    parser.add_argument("--max-frames", type=int, default=16, help="frame cap per turn (80 ms each)")
    parser.add_argument("--max-context", type=int, default=1024, help="context rows per slot (old turns are trimmed)")
    parser.add_argument("--model", type=Path, help="realtime checkpoint (default: the tiny random one)")
    parser.add_argument("--codec", type=Path, help="codec checkpoint (default: the tiny random one)")
    parser.add_argument("--replay-sessions", type=int, default=None,
                        help="conversations replayed alone for the cross-talk check (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the injected LLM failures would log a warning each
    if args.model is None or args.codec is None:
        from moss_agent.options import ensure_tiny_checkpoints

        args.model, args.codec = ensure_tiny_checkpoints()
    report = asyncio.run(run_soak(
        args.model, args.codec, sessions=args.sessions, turns=args.turns, seed=args.seed,
        interrupt_p=args.interrupt, fail_p=args.fail, max_frames=args.max_frames, max_context=args.max_context,
        replay_sessions=args.replay_sessions,
    ))
    print("\n".join(report.lines()))
    clean = report.cross_talk_1e3 == 0 and report.wrong_turn_chunks == 0 and not report.leaked_tasks
    return 0 if clean and not report.leaked_slots else 1


if __name__ == "__main__":
    raise SystemExit(main())
