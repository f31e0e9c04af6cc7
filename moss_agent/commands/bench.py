"""``moss-agent bench``: how fast this machine runs the realtime engine, for 1..N concurrent sessions.

Measures through the public engine API what a voice agent feels: time from the first text to the
first audio chunk, and frames per second across all sessions (a frame is 80 ms of audio).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from moss_agent.commands import common
from moss_agent.options import MAX_REPLY_SECONDS, MAX_SLOTS

MAX_FRAMES = int(MAX_REPLY_SECONDS / 0.08)

TEXT = (
    "Thanks for calling. I can help you with your booking, change the date of your trip, "
    "or answer any question about the hotel and the city around it."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "bench", help="measure first-audio latency and throughput of the realtime engine",
        description="Run N sessions at once through the realtime engine and print time to first "
        "audio, frames per second and the real-time factor. Greedy decoding, a fixed text.",
    )
    parser.add_argument(
        "--sessions", type=int, nargs="+", default=[1, 4, 16],
        help=f"session counts to try, each 1 to {MAX_SLOTS} (default 1 4 16)",
    )  # fmt: skip
    parser.add_argument(
        "--frames", type=int, default=50, help=f"frames per session and turn, 1 to {MAX_FRAMES} (default 50 = 4 s)"
    )
    common.add_engine_options(parser, slots=16)
    parser.set_defaults(handler=run)


def check(args: argparse.Namespace) -> None:
    from moss_agent.errors import ConfigError

    if getattr(args, "engine_url", None):
        raise ConfigError("bench measures an engine it loads itself; --engine-url is not for bench "
                          "(benchmarks/service.py measures a speech server)")
    bad = [count for count in args.sessions if not 1 <= count <= MAX_SLOTS]
    if bad:
        raise ConfigError(f"--sessions takes session counts from 1 to {MAX_SLOTS}, got {bad[0]}")
    if not 1 <= args.frames <= MAX_FRAMES:
        raise ConfigError(f"--frames must be from 1 to {MAX_FRAMES} (80 ms each), got {args.frames}")


def run(args: argparse.Namespace) -> int:
    check(args)
    args.greedy = True
    args.max_seconds = args.frames * 0.08
    args.slots = max(args.sessions)
    return asyncio.run(_bench(args))


async def _one_turn(engine: object) -> tuple[float, int]:
    conversation = await engine.open_conversation()  # type: ignore[attr-defined]
    stream = await conversation.start_turn(None, 1)
    pushed = time.perf_counter()
    await stream.push_text(TEXT)
    await stream.end_input()
    first, frames = None, 0
    async for _chunk in stream:
        first = first if first is not None else time.perf_counter() - pushed
        frames += 1
    await conversation.aclose()
    return (first if first is not None else float("nan")), frames


async def _bench(args: argparse.Namespace) -> int:
    import torch

    engine = await asyncio.to_thread(common.build_engine, args)
    device = engine.generator.device
    tick = "CUDA graph" if engine.generator.uses_cuda_graph else ("compiled" if args.compile else "eager")
    print(f"device {device}, torch {torch.__version__}, model dtype {engine.generator.model.dtype}, {tick} tick")
    print(f"{'sessions':>8} {'first audio p50':>16} {'first audio max':>16} {'frames/s':>10} {'RTF/session':>12}")
    async with engine:
        await _one_turn(engine)  # warm-up: allocations, kernels, caches
        for count in args.sessions:
            start = time.perf_counter()
            results = await asyncio.gather(*(_one_turn(engine) for _ in range(count)))
            elapsed = time.perf_counter() - start
            firsts = [r[0] for r in results]
            frames = sum(r[1] for r in results)
            fps = frames / elapsed
            rtf = elapsed / (frames / count * 0.08) if frames else float("nan")
            print(
                f"{count:>8} {statistics.median(firsts) * 1000:>13.1f} ms {max(firsts) * 1000:>13.1f} ms "
                f"{fps:>10.1f} {rtf:>12.3f}"
            )
    print("RTF/session = wall time / audio time of one session (below 1: faster than real time)")
    return 0
