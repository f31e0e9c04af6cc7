"""The speech server under N concurrent clients, over real sockets, against the same engine in-process.

One tiny realtime engine (``ensure_tiny_checkpoints``, greedy, every turn exactly ``--frames``
frames) is served by ``create_app`` on 127.0.0.1 in this process. For each client count N:

- in-process: N conversations on the engine itself (``open_conversation`` / ``start_turn`` /
  ``push_text``), each fed LLM-like deltas (a word every ``--token-ms``) and reading its audio;
- session protocol: the same over the WebSocket, one ``RemoteSpeechBackend`` (one socket) per client;
- ``/v1/audio/speech``: the same text as one request per client, with the official ``openai``
  client streaming the response (pcm).

Printed per run: first audio p50/p95/p99 (first text sent -> first audio received; for HTTP:
request sent -> first audio bytes), inter-chunk gap p99, aggregate audio seconds per wall second,
and the fraction of streams that stayed ahead of real time (every chunk arrived before the audio
before it, played from the first chunk on, ran out). Then the service overhead: first audio through
the socket minus first audio in-process at p50/p95 (the issue's target: < 10 ms at p95 for 8
clients on this config).

Server, engine loop and clients share one event loop (and one process), so client-side work is
inside the socket figures; the engine's device thread is the only other busy thread. Run:

    .venv/bin/python benchmarks/service.py --clients 1 8
    .venv/bin/python benchmarks/service.py               # 1, 8, 32
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

FRAME_S = 0.08
PCM_BYTES_PER_S = 24000 * 2  # OpenAI's pcm: 16-bit mono at 24 kHz
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "bright", "lanterns", "glow", "above", "the", "quiet", "harbor", "and", "the", "evening", "train", "rolls", "north", "across", "the", "silver", "river"]  # fmt: skip
TOKEN = "bench-token"


@dataclass
class Stream:
    """What one client saw of one turn (monotonic seconds)."""

    sent: float = 0.0  # first text delta (or the HTTP request) sent
    arrivals: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # audio seconds of each arrival

    @property
    def first_audio_s(self) -> float | None:
        return self.arrivals[0] - self.sent if self.arrivals else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    @property
    def ahead(self) -> bool:
        """Every chunk arrived before the audio before it, played from the first arrival, ran out."""
        if not self.arrivals:
            return False
        played = 0.0
        for arrival, seconds in zip(self.arrivals, self.seconds, strict=True):
            if arrival - self.arrivals[0] > played + 1e-4:
                return False
            played += seconds
        return True


@dataclass
class Run:
    name: str
    clients: int
    wall_s: float
    streams: list[Stream]
    errors: list[str]

    def row(self) -> str:
        firsts = [s.first_audio_s for s in self.streams if s.first_audio_s is not None]
        gaps = [g for s in self.streams for g in s.gaps]
        audio = sum(sum(s.seconds) for s in self.streams)
        ahead = sum(s.ahead for s in self.streams)
        return (
            f"  {self.name:<18}{self.clients:>4}  {ms(pct(firsts, 50))}{ms(pct(firsts, 95))}"
            f"{ms(pct(firsts, 99))}  {ms(pct(gaps, 99))}  {audio / self.wall_s:8.2f}  "
            f"{ahead:>3}/{len(self.streams):<3} {len(self.errors):>4}"
        )


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def text_for(index: int, words: int) -> list[str]:
    """The client's deltas: distinct per client, the same across the three paths."""
    chosen = [WORDS[(index * 7 + k) % len(WORDS)] for k in range(words)]
    return [("" if k == 0 else " ") + word for k, word in enumerate(chosen)]


async def speak_backend(backend: Any, deltas: list[str], token_s: float, stream: Stream) -> None:
    """One turn on a SpeechBackend (the engine or RemoteSpeechBackend): deltas at LLM pace, audio read."""
    from moss_agent.streaming.tts import UserTurn

    conversation = await backend.open_conversation(system_prompt=None)
    try:
        speech = await conversation.start_turn(UserTurn("tell me something"), 1)

        async def feed() -> None:
            for k, delta in enumerate(deltas):
                if k == 0:
                    stream.sent = time.monotonic()
                else:
                    await asyncio.sleep(token_s)
                await speech.push_text(delta)
            await speech.end_input()

        async with asyncio.TaskGroup() as group:
            group.create_task(feed(), name="bench-feed")
            async for chunk in speech:
                stream.arrivals.append(time.monotonic())
                stream.seconds.append(len(chunk.pcm) / backend.sample_rate)
        await speech.aclose()
    finally:
        await conversation.aclose()


async def speak_http(api: Any, deltas: list[str], stream: Stream) -> None:
    """One /v1/audio/speech request with the whole text (the HTTP API takes no text deltas)."""
    stream.sent = time.monotonic()
    async with api.audio.speech.with_streaming_response.create(
        model="tts-1", voice="default", input="".join(deltas), response_format="pcm"
    ) as response:
        async for data in response.iter_bytes():
            stream.arrivals.append(time.monotonic())
            stream.seconds.append(len(data) / PCM_BYTES_PER_S)


async def run_clients(name: str, clients: int, one: Callable[[int, Stream], Awaitable[None]]) -> Run:
    streams = [Stream() for _ in range(clients)]
    errors: list[str] = []

    async def guarded(index: int) -> None:
        try:
            await one(index, streams[index])
        except Exception as exc:  # a failed client is counted, not fatal to the run
            errors.append(f"{type(exc).__name__}: {exc}")

    began = time.monotonic()
    await asyncio.gather(*(guarded(i) for i in range(clients)))
    return Run(name, clients, time.monotonic() - began, streams, errors)


async def bench(args: argparse.Namespace) -> int:
    import openai

    from moss_agent.client import RemoteSpeechBackend
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.realtime import SamplingConfig
    from moss_agent.options import ensure_tiny_checkpoints
    from moss_agent.service import ServiceConfig, create_app, serve

    # Every turn here is cut at --frames on purpose; the server's warning about it would flood the table.
    logging.getLogger("moss_agent.service.openai_speech").setLevel(logging.ERROR)
    model_dir, codec_dir = await asyncio.to_thread(ensure_tiny_checkpoints)
    slots = args.slots or max(args.clients)
    config = RealtimeEngineConfig(
        num_slots=slots, max_waiting=max(32, max(args.clients)), max_context=1024,
        max_frames_per_turn=args.frames, sampling=SamplingConfig(greedy=True, min_frames=args.frames),
        call_timeout_s=120.0,
    )  # fmt: skip
    engine = await asyncio.to_thread(RealtimeEngine.load, model_dir, codec_dir, device="cpu", config=config)
    app = create_app(engine, ServiceConfig(token=TOKEN))  # starts and stops the engine with the server
    token_s = args.token_ms / 1000
    print(f"tiny realtime engine on the CPU: {slots} slots, {args.frames} frames "
          f"({args.frames * FRAME_S:.2f} s) per turn, {args.words} words at one per {args.token_ms:.0f} ms; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")  # fmt: skip
    runs: list[Run] = []
    async with serve(app) as url:
        api = openai.AsyncOpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, timeout=300.0)
        remotes = [
            RemoteSpeechBackend(url, token=TOKEN, request_timeout_s=120.0) for _ in range(max(args.clients))
        ]
        try:
            for remote in remotes:
                await remote.start()

            async def local(i: int, s: Stream) -> None:
                await speak_backend(engine, text_for(i, args.words), token_s, s)

            async def socket(i: int, s: Stream) -> None:
                await speak_backend(remotes[i], text_for(i, args.words), token_s, s)

            async def http(i: int, s: Stream) -> None:
                await speak_http(api, text_for(i, args.words), s)

            # Warm-up: lazy imports, the first connections, the engine's first ticks.
            for one in (local, socket, http):
                await run_clients("warm-up", 1, one)
            for clients in args.clients:
                for _ in range(args.repeats):
                    runs.append(await run_clients("in-process", clients, local))
                    runs.append(await run_clients("session socket", clients, socket))
                    runs.append(await run_clients("/v1/audio/speech", clients, http))
        finally:
            for remote in remotes:
                await remote.aclose()
            await api.close()
    await engine.aclose()

    print(
        "\n                 clients  first audio ms (p50 / p95 / p99)   gap p99   audio s/s   ahead  errors"
    )
    for run in runs:
        print(run.row())
    print("\nservice overhead: first audio through the session socket minus in-process (ms)")
    print("  clients       p50       p95   (socket p50 / p95 - in-process p50 / p95)")
    for clients in args.clients:
        local_firsts = firsts(runs, "in-process", clients)
        socket_firsts = firsts(runs, "session socket", clients)
        print(f"  {clients:>7}  {ms(pct(socket_firsts, 50) - pct(local_firsts, 50))}  "
              f"{ms(pct(socket_firsts, 95) - pct(local_firsts, 95))}")  # fmt: skip
    failures = [error for run in runs for error in run.errors]
    for error in sorted(set(failures))[:10]:
        print(f"  error: {error}")
    return 1 if failures else 0


def firsts(runs: list[Run], name: str, clients: int) -> list[float]:
    return [
        first
        for run in runs
        if run.name == name and run.clients == clients
        for s in run.streams
        if (first := s.first_audio_s) is not None
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--frames", type=int, default=40, help="codec frames (80 ms) of every turn")
    parser.add_argument("--words", type=int, default=16, help="text deltas of every turn")
    parser.add_argument("--token-ms", type=float, default=30.0, help="LLM pace: ms between deltas")
    parser.add_argument("--slots", type=int, help="engine slots (default: the largest client count)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind per client count")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.frames < 1 or args.words < 1:
        parser.error("--clients, --frames and --words must be >= 1")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
