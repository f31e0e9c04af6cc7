"""Shared pieces for the pipeline integration tests: backends to run against, speech, a transcriber.

The ``speech_backend`` fixture is parametrized: add an entry to ``BACKENDS`` (e.g. the real engine
on a tiny checkpoint) and every pipeline test runs against it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from moss_agent.events import Event, FloatArray
from moss_agent.streaming.clock import Clock
from moss_agent.streaming.session import EventStream
from moss_agent.testing.backend import FakeSpeechBackend

SPEED = 20.0  # the fake engine, speaker and microphone run this many times faster than real time


BackendFactory = Callable[[pytest.FixtureRequest, Clock, contextlib.AsyncExitStack], Awaitable[Any]]


async def fake_backend(request: pytest.FixtureRequest, clock: Clock, stack: contextlib.AsyncExitStack) -> Any:
    return FakeSpeechBackend(clock=clock, rtf=0.25, ttfa_s=0.05)


BACKENDS: dict[str, BackendFactory] = {"fake": fake_backend}
"""Name -> async factory(request, clock, stack). A real engine's factory can pull fixtures with
``request.getfixturevalue`` (e.g. a tiny checkpoint), run on ``clock`` or ignore it, and register
its shutdown with ``await stack.enter_async_context(engine)``. Assertions that only hold for the
fake's tone "speech" are guarded with ``hasattr(conversation, "tone_hz")``."""


async def backend_maker(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[Clock], Awaitable[Any]]]:
    """Fixture body: ``backend = await make_backend(clock)``; everything made is closed at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(clock: Clock) -> Any:
            return await BACKENDS[request.param](request, clock, stack)

        yield make


class HttpTranscriber:
    """Speech recognition over the OpenAI transcriptions API (what a deployment would call)."""

    def __init__(self, base_url: str) -> None:
        import openai

        self._client = openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0)

    async def transcribe(self, pcm: FloatArray, sample_rate: int) -> str:
        buffer = io.BytesIO()
        sf.write(buffer, pcm, sample_rate, format="WAV", subtype="PCM_16")
        result = await self._client.audio.transcriptions.create(
            model="whisper-1", file=("utterance.wav", buffer.getvalue(), "audio/wav")
        )
        return str(result.text)

    async def aclose(self) -> None:
        await self._client.close()


def dominant_hz(pcm: FloatArray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    return float(np.argmax(spectrum) * sample_rate / len(pcm))


async def next_event(events: EventStream, kind: type, timeout: float = 20.0, **match: Any) -> Any:
    """The next event of ``kind`` whose attributes equal ``match`` (others are skipped)."""

    async def find() -> Event:
        async for event in events:
            if isinstance(event, kind) and all(getattr(event, k) == v for k, v in match.items()):
                return event
        raise AssertionError(f"the session closed before a {kind.__name__} {match}")

    return await asyncio.wait_for(find(), timeout)


async def engine_backend(request: pytest.FixtureRequest, clock: Clock, stack: contextlib.AsyncExitStack) -> Any:
    """The real RealtimeEngine on a tiny random checkpoint that never ends a turn by itself (greedy,
    capped at 9.6 s), so every reply lasts long enough to be talked over. It runs on real time: its
    frames take what the CPU needs, whatever ``clock`` says."""
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.codec import load_codec
    from moss_agent.models.realtime import SamplingConfig

    codec = load_codec(request.getfixturevalue("tiny_codec_dir"), device="cpu")
    config = RealtimeEngineConfig(
        num_slots=8, max_context=1024, max_frames_per_turn=120, sampling=SamplingConfig(greedy=True)
    )
    engine = RealtimeEngine.load(request.getfixturevalue("tiny_realtime_endless_dir"), codec, device="cpu", config=config)
    return await stack.enter_async_context(engine)


BACKENDS["engine"] = engine_backend
