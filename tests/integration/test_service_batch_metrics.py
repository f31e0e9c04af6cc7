"""Batch requests (``/v1/audio/speech`` on a ``--batch-model`` model) in the server's ``/metrics``.

One tiny realtime engine and the tiny Delay model on its codec and device thread (as
``speech-server --tiny --batch-model tiny`` serves them), behind a real server on an ephemeral port.
The Delay engine is wrapped so that a test can hold a batch job at its start on the device (a
gate): the request whose job is held counts as active, one behind it as queued.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.models.realtime import SamplingConfig
from moss_agent.service import ServiceConfig, create_app, serve
from moss_agent.service.batch_speech import BATCH_MODELS

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "moss-tts"
TOKEN = "batch-metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"model": MODEL, "voice": "default", "input": "Counted apart from the realtime figures.",
        "response_format": "pcm"}  # fmt: skip

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Gated:
    """The real BatchEngine, but each job waits at its start (on the device thread, after the
    engine reported it started) until ``gate`` is set."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    async def agenerate(self, requests: Sequence[Any], *, on_start: Any = None, **kwargs: Any) -> Any:
        def start() -> None:
            if on_start is not None:
                on_start()
            self.gate.wait(30)

        return await self.target.agenerate(requests, on_start=start, **kwargs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    tiny_realtime_dir: Path, tiny_codec_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Any, Gated]]:
    from moss_agent.options import ensure_tiny_batch_checkpoint
    from moss_agent.service.batch_speech import add_batch_engines, load_batch_engines

    config = RealtimeEngineConfig(num_slots=1, max_frames_per_turn=6, sampling=SamplingConfig(greedy=True))
    engine = await asyncio.to_thread(
        RealtimeEngine.load, tiny_realtime_dir, tiny_codec_dir, device="cpu", config=config
    )
    folder = str(ensure_tiny_batch_checkpoint(tmp_path_factory.mktemp("batch")))
    engines = await asyncio.to_thread(load_batch_engines, [(MODEL, folder)], engine)
    gated = Gated(engines[MODEL])
    app = create_app(engine, ServiceConfig(token=TOKEN))
    add_batch_engines(app, {MODEL: gated}, min_frames=12)
    async with engine, serve(app) as url:
        yield url, app, gated


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics", headers=AUTH) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def batch(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({"model": MODEL, **labels}.items()))


async def speak(url: str) -> tuple[int, int]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/audio/speech", json=BODY, headers=AUTH) as response,
    ):
        return response.status, len(await response.read())


async def until(url: str, check: Any, within_s: float = 20.0) -> Samples:
    """Scrape until ``check(samples)`` holds (the server's side of a request runs on its own time)."""
    began = time.monotonic()
    while True:
        samples = await scrape(url)
        if check(samples):
            return samples
        assert time.monotonic() - began < within_s, {k: v for k, v in samples.items() if "batch" in k[0]}
        await asyncio.sleep(0.05)


async def test_a_batch_request_shows_in_the_batch_figures_and_not_the_realtime_ones(
    server: tuple[str, Any, Gated],
) -> None:
    url = server[0]
    before = await scrape(url)
    # Listed at 0 before any request, so that dashboards and alerts see the model from the start.
    assert (
        before[batch("moss_batch_requests_active")] == 0 and before[batch("moss_batch_requests_queued")] == 0
    )
    assert before[batch("moss_batch_request_seconds_count")] == 0

    status, size = await speak(url)
    assert status == 200 and size > 0
    after = await scrape(url)
    for name in ("moss_batch_request_seconds_count", "moss_batch_first_audio_seconds_count",
                 "moss_batch_queue_seconds_count"):  # fmt: skip
        assert after[batch(name)] == 1, name
    assert after[batch("moss_batch_audio_seconds_total")] == pytest.approx(size / 2 / 24000, abs=0.01)
    assert (
        after[batch("moss_batch_request_seconds_sum")] >= after[batch("moss_batch_first_audio_seconds_sum")]
    )
    assert after[batch("moss_batch_requests_active")] == 0 and after[batch("moss_batch_requests_queued")] == 0
    ok = ("moss_requests_total", (("route", "/v1/audio/speech"), ("status", "200")))
    assert after[ok] == before.get(ok, 0) + 1  # the route's count has every request
    # The realtime figures did not move.
    for name in ("moss_first_audio_seconds_count", "moss_rtf_count", "moss_conversations_active"):
        assert after[(name, ())] == before[(name, ())], name
    assert not [key for key in after if key[0] == "moss_batch_errors_total"]


async def test_in_flight_and_queued_batch_requests_and_errors_by_kind(server: tuple[str, Any, Gated]) -> None:
    url, app, gated = server
    gated.gate.clear()  # the next job holds the device at its start
    try:
        first = asyncio.create_task(speak(url))
        await until(url, lambda s: s[batch("moss_batch_requests_active")] == 1)
        second = asyncio.create_task(speak(url))  # behind the first job on the device
        gone = asyncio.create_task(speak(url))
        held = await until(url, lambda s: s[batch("moss_batch_requests_queued")] == 2)
        assert held[batch("moss_batch_requests_active")] == 1

        # A client that leaves while queued: no longer queued, counted as client_gone.
        gone.cancel()
        await until(url, lambda s: s.get(batch("moss_batch_errors_total", kind="client_gone")) == 1)
        # One request too many: refused (busy), as the realtime engine's full queue answers.
        models = app[BATCH_MODELS]
        saved, models.max_pending = models.max_pending, models.pending
        try:
            assert (await speak(url))[0] == 503
        finally:
            models.max_pending = saved
        held = await scrape(url)
        assert (
            held[batch("moss_batch_requests_queued")] == 1 and held[batch("moss_batch_requests_active")] == 1
        )
        assert held[batch("moss_batch_errors_total", kind="busy")] == 1
    finally:
        gated.gate.set()
    assert [(await first)[0], (await second)[0]] == [200, 200]
    done = await until(url, lambda s: s[batch("moss_batch_requests_active")] == 0)
    assert done[batch("moss_batch_requests_queued")] == 0
    assert done[batch("moss_batch_request_seconds_count")] >= 3  # with the first test's
    assert done[batch("moss_batch_queue_seconds_count")] >= 3  # the request that left never started
    # The queued one waited at least as long as the held one ran: the queue time shows it.
    assert done[batch("moss_batch_queue_seconds_sum")] > 0
