"""End-to-end voice-agent latency: user end of speech -> first agent audio, broken down by stage.

Each session hears a synthetic utterance (a 1 s tone burst, detected by an energy VAD), sends it
to speech recognition and the LLM over real local HTTP (FakeOpenAIServer, or --llm-url for a real
OpenAI-compatible server), speaks the reply through the speech backend (FakeSpeechBackend by
default, or --backend module:factory for a real engine) into a real-time fake speaker.

Pipeline overhead = (user end -> first audio written) - (STT + LLM first token + TTS first audio):
everything that is not model or LLM compute. Run:

    .venv/bin/python benchmarks/agent.py --sessions 1 8 --turns 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import multiprocessing
import statistics
import sys
from typing import Any

import numpy as np
import soundfile as sf

from moss_agent.config import LLMConfig, SessionConfig, TurnTakingConfig
from moss_agent.events import FloatArray, Metrics, TurnEnded
from moss_agent.streaming.clock import MonotonicClock
from moss_agent.streaming.llm import OpenAIChatLLM
from moss_agent.streaming.session import Session
from moss_agent.testing.audio_io import FakeAudioInput, FakeAudioOutput
from moss_agent.testing.backend import FakeSpeechBackend
from moss_agent.testing.openai_server import FakeOpenAIServer, ScriptedReply
from moss_agent.testing.vad import EnergyVad

MIC_RATE = 16000
STAGES = ("e2e_s", "stt_s", "llm_ttft_s", "tts_ttfa_s", "pipeline_overhead_s", "stt_queue_s", "turn_start_s", "first_write_s")


class HttpTranscriber:
    def __init__(self, base_url: str) -> None:
        import openai

        self._client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)

    async def transcribe(self, pcm: FloatArray, sample_rate: int) -> str:
        buffer = io.BytesIO()
        sf.write(buffer, pcm, sample_rate, format="WAV", subtype="PCM_16")
        result = await self._client.audio.transcriptions.create(
            model="whisper-1", file=("u.wav", buffer.getvalue(), "audio/wav")
        )
        return str(result.text)

    async def aclose(self) -> None:
        await self._client.close()


def make_backend(spec: str | None, clock: MonotonicClock) -> Any:
    if spec is None:
        return FakeSpeechBackend(clock=clock, rtf=0.25, ttfa_s=0.05)
    module_name, _, factory = spec.partition(":")
    return getattr(importlib.import_module(module_name), factory or "make_backend")()


def utterance() -> FloatArray:
    t = np.arange(MIC_RATE) / MIC_RATE
    return (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


async def run_session(
    index: int, backend: Any, args: argparse.Namespace, llm: OpenAIChatLLM, stt: HttpTranscriber
) -> list[Metrics]:
    clock = MonotonicClock()
    mic = FakeAudioInput(MIC_RATE, clock=clock)  # released at real-time pace, like a sound card
    speaker = FakeAudioOutput(backend.sample_rate, clock=clock)
    turns = TurnTakingConfig(min_speech_s=0.1, hang_s=args.hang_s, echo_mode="none")
    session = Session(
        backend, llm=llm, output=speaker, input=mic, vad=EnergyVad(), stt=stt,
        config=SessionConfig(turns=turns), clock=clock, name=f"bench{index}",
    )
    results: list[Metrics] = []
    async with session:
        events = session.events()
        for _ in range(args.turns + 1):  # the first turn warms up lazy imports and connections
            await mic.push_silence(0.2)
            await mic.push(utterance())
            await mic.push_silence(args.hang_s + 0.1)
            ended = None
            async for event in events:
                if isinstance(event, TurnEnded):
                    ended = event
                if isinstance(event, Metrics) and ended is not None and event.turn_id == ended.turn_id:
                    results.append(event)
                    break
        events.close()
    await speaker.aclose()
    return results[1:]


def serve(reply: str, token_delay_s: float, ports: multiprocessing.Queue[int]) -> None:
    async def run() -> None:
        server = FakeOpenAIServer(
            responder=lambda messages: ScriptedReply(reply, token_delay_s=token_delay_s),
            transcribe=lambda pcm, rate: "what time is it",
        )
        await server.start()
        ports.put(server.port)
        await asyncio.Event().wait()

    asyncio.run(run())


async def loop_lag(lags: list[float]) -> None:
    """How late the loop wakes a 5 ms sleeper: the floor under every hop between pipeline stages."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(0.005)
        lags.append(max(0.0, loop.time() - start - 0.005))


def describe(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.fmean(ordered) * 1000:8.1f} {statistics.median(ordered) * 1000:8.1f} {p95 * 1000:8.1f}"


async def bench(args: argparse.Namespace) -> int:
    failed = False
    # The fake STT/LLM server runs in its own process, as real servers would.
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    process = multiprocessing.Process(target=serve, args=(args.reply, args.token_delay_s, ports), daemon=True)
    process.start()
    server_url = f"http://127.0.0.1:{ports.get(timeout=30)}/v1"
    try:
        llm_cfg = LLMConfig(base_url=args.llm_url or server_url, model=args.model, max_tokens=64)
        # One HTTP client per process, shared by all sessions (each client builds its own TLS context).
        llm = OpenAIChatLLM(llm_cfg)
        stt = HttpTranscriber(server_url)
        for sessions in args.sessions:
            backend = make_backend(args.backend, MonotonicClock())
            lags: list[float] = []
            probe = asyncio.create_task(loop_lag(lags), name="loop-lag-probe")
            per_session = await asyncio.gather(
                *(run_session(i, backend, args, llm, stt) for i in range(sessions))
            )
            probe.cancel()
            await asyncio.wait([probe])
            metrics = [m for ms in per_session for m in ms]
            print(f"\n{sessions} concurrent session(s), {len(metrics)} turns   (ms: mean / p50 / p95)")
            for stage in STAGES:
                samples = [float(v) for m in metrics if (v := m.values.get(stage)) is not None]
                if samples:
                    print(f"  {stage:<22}{describe(samples)}")
            overhead = sorted(float(m.values["pipeline_overhead_s"] or 0.0) for m in metrics)
            worst = overhead[-1] * 1000 if overhead else float("nan")
            verdict = "ok" if worst < 20.0 else "OVER BUDGET"
            failed |= worst >= 20.0
            print(f"  pipeline overhead worst turn: {worst:.1f} ms (budget 20 ms): {verdict}")
            print(f"  event-loop lag (5 ms probe overshoot): {describe(lags)}  <- scheduling noise of this machine")
        await llm.aclose()
        await stt.aclose()
    finally:
        process.terminate()
        process.join()
    print(f"\nVAD hang time (endpointing, before 'user end'): {args.hang_s * 1000:.0f} ms; not in the figures above")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--reply", default="It is half past three.")
    parser.add_argument("--token-delay-s", type=float, default=0.01, help="fake LLM time per token")
    parser.add_argument("--hang-s", type=float, default=0.3)
    parser.add_argument("--llm-url", help="a real OpenAI-compatible endpoint instead of the fake one")
    parser.add_argument("--model", default="fake")
    parser.add_argument("--backend", help="module:factory returning a SpeechBackend (default: FakeSpeechBackend)")
    return asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
