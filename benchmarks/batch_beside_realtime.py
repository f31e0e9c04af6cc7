"""Realtime sessions with and without a long batch job on the same device thread.

One ModelRegistry, so the realtime engine and the batch engine share the codec and the device's
one thread. ``--sessions`` conversations speak ``--turns`` turns each, their listeners consuming
audio in real time (80 ms per chunk), with staggered starts. The run is done twice: alone, then
with a batch job (Delay model, many long requests) running for the whole time. Printed per run:
- first_ms p50/p95: start_turn + text pushed -> the turn's first chunk on the event loop;
- tick_ms: one realtime tick's wall time (EngineStats), mean; cpu_ms: its CPU time on the device
  thread (what other processes on a shared machine cannot inflate); ticks: how many ran;
- batch audio s/s: audio the batch job made per second meanwhile (the time realtime leaves it).
The batch job yields to realtime ticks between its steps, so the figures with it should stay
within 20% of those without.

    .venv/bin/python benchmarks/batch_beside_realtime.py                  # tiny configs, 8 sessions
    .venv/bin/python benchmarks/batch_beside_realtime.py --turns 4 --twice  # and the noise floor
    .venv/bin/python benchmarks/batch_beside_realtime.py --config small   # needs a ~50 ms tick: an idle CPU
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realtime import CONFIGS  # benchmarks/realtime.py: the tiny and small realtime shapes

from moss_agent.engine.batch import BatchEngine
from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.engine.registry import ModelRegistry
from moss_agent.models.codec.tiny import save_tiny_codec
from moss_agent.models.delay.tiny import save_tiny_delay
from moss_agent.models.realtime import SamplingConfig, save_tiny_realtime

DELAY = {"tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128),
         "small": dict(hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, ffn=128)}
TEXT = "Thanks for calling! Your order shipped this morning and should arrive on Thursday."
FRAME_S = 0.08


async def speak(engine: RealtimeEngine, index: int, turns: int, first_ms: list[float]) -> None:
    conversation = await engine.open_conversation()
    await asyncio.sleep(0.15 * index)  # staggered starts, as real callers arrive
    for turn in range(turns):
        began = time.perf_counter()
        stream = await conversation.start_turn(None, turn + 1)
        await stream.push_text(TEXT)
        await stream.end_input()
        count = 0
        async for _ in stream:
            now = time.perf_counter()
            if count == 0:
                first_ms.append(1000 * (now - began))
                played_from = now
            count += 1
            # the listener plays in real time: chunk k has been heard at played_from + k * 80 ms
            await asyncio.sleep(max(0.0, played_from + count * FRAME_S - time.perf_counter()))
        await asyncio.sleep(0.2)  # the user answers
    await conversation.aclose()


async def batch_forever(batch: BatchEngine, stop: asyncio.Event, produced: list[float]) -> None:
    """Rounds of 8 requests, each ``max_new_tokens`` rows long: a job that never ends while realtime runs."""
    requests = [{"text": f"Batch request {k} reads a long enough sentence for the benchmark."} for k in range(8)]
    while not stop.is_set():
        results = await batch.agenerate(requests, batch_size=8, seed=0)
        produced.append(sum(r.duration_s for r in results))


async def run(engine: RealtimeEngine, batch: BatchEngine | None, sessions: int, turns: int) -> dict[str, Any]:
    first_ms: list[float] = []
    produced: list[float] = []
    stop = asyncio.Event()
    background = asyncio.create_task(batch_forever(batch, stop, produced)) if batch else None
    if background is not None:
        await asyncio.sleep(1.0)  # the job is well under way before the first caller
    ticks, seconds, cpu = engine.stats.ticks, engine.stats.tick_seconds, list(TICK_CPU)
    began = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for index in range(sessions):
            tg.create_task(speak(engine, index, turns, first_ms), name=f"caller{index}")
    ran = engine.stats.ticks - ticks
    tick_ms = 1000 * (engine.stats.tick_seconds - seconds) / max(1, ran)
    wall = time.perf_counter() - began
    tick_cpu = TICK_CPU[len(cpu):]
    if background is not None:
        stop.set()
        await background
    ordered = sorted(first_ms)
    return {
        "first_p50": statistics.median(ordered),
        "first_p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "tick_ms": tick_ms,
        "tick_cpu_ms": 1000 * statistics.mean(tick_cpu),
        "ticks": ran,
        "batch_audio_s_per_s": sum(produced) / wall,
    }


TICK_CPU: list[float] = []  # CPU seconds of each realtime tick on the device thread


def time_ticks(engine: RealtimeEngine) -> None:
    """Record each tick's thread CPU time: unlike wall time, other processes on the cores do not inflate it."""
    tick = engine._worker.tick

    def timed() -> None:
        began = time.thread_time()
        tick()
        TICK_CPU.append(time.thread_time() - began)

    engine._worker.tick = timed


async def main_async(args: argparse.Namespace, folder: Path) -> None:
    realtime_dir = save_tiny_realtime(folder / "realtime", seed=0, eos_gain=0.0, **CONFIGS[args.config])
    codec_dir = save_tiny_codec(folder / "codec", seed=0, num_quantizers=16, codebook_size=1024)
    delay_dir = save_tiny_delay(folder / "delay", seed=0, n_vq=16, scripted_frames=1e6, **DELAY[args.config])
    registry = ModelRegistry(device="cpu", dtype="float32")
    device = registry.device_thread("cpu")
    device.ticks_per_batch_step, device.realtime_grace_s = args.ticks_per_step, args.grace_ms / 1000
    config = RealtimeEngineConfig(
        num_slots=args.sessions, max_context=1024, max_frames_per_turn=args.frames, sampling=SamplingConfig(),
        seed=0, cpu_threads=args.threads,
    )
    engine = registry.realtime_engine(realtime_dir, codec_dir, config=config)
    batch = registry.batch_engine(delay_dir, codec_dir, max_new_tokens=args.batch_rows)
    time_ticks(engine)
    try:
        async with engine:
            await run(engine, None, args.sessions, 1)  # warm-up: allocator, thread pools
            alone = await run(engine, None, args.sessions, args.turns)
            again = await run(engine, None, args.sessions, args.turns) if args.twice else None
            beside = await run(engine, batch, args.sessions, args.turns)
    finally:
        registry.close()
    print(
        f"CPU, {args.threads} thread(s), {args.config} realtime + Delay configs, {args.sessions} sessions x "
        f"{args.turns} turns of {args.frames} frames, listeners in real time; batch job: 8 requests x "
        f"{args.batch_rows} rows, repeated"
    )
    print(f"{'run':<16}{'first_ms p50':>13}{'p95':>8}{'tick_ms':>9}{'cpu_ms':>8}{'ticks':>7}{'batch audio s/s':>17}")
    rows = [("alone", alone), *([("alone again", again)] if again else []), ("beside batch", beside)]
    for name, result in rows:
        print(
            f"{name:<16}{result['first_p50']:>13.1f}{result['first_p95']:>8.1f}{result['tick_ms']:>9.2f}"
            f"{result['tick_cpu_ms']:>8.2f}{result['ticks']:>7}{result['batch_audio_s_per_s']:>17.1f}"
        )
    for key, label in (
        ("first_p50", "first audio p50"), ("first_p95", "first audio p95"), ("tick_ms", "tick wall"),
        ("tick_cpu_ms", "tick CPU"),
    ):
        change = 100 * (beside[key] / alone[key] - 1)
        noise = f"; alone twice: {100 * (again[key] / alone[key] - 1):+.1f}%" if again else ""
        print(f"{label}: {change:+.1f}% with the batch job ({'within' if change <= 20 else 'beyond'} the 20% bound){noise}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(DELAY), default="tiny")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--frames", type=int, default=25, help="frames per realtime turn (80 ms each)")
    parser.add_argument("--batch-rows", type=int, default=100, help="rows per batch request (12.5 per audio s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--twice", action="store_true", help="run alone twice (the noise floor)")
    parser.add_argument("--ticks-per-step", type=int, default=8, help="DeviceThread.ticks_per_batch_step")
    parser.add_argument("--grace-ms", type=float, default=20.0, help="DeviceThread.realtime_grace_s, in ms")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    main()
