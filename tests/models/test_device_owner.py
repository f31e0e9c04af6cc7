"""One owner per device: a realtime conversation and a batch job on one registry run every forward
of the realtime model, the batch model and the shared codec on the device's one thread, and the
batch job yields to realtime ticks between its steps."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from moss_agent.engine.batch import Waveform
from moss_agent.engine.realtime import RealtimeEngineConfig
from moss_agent.engine.registry import ModelRegistry
from moss_agent.errors import EngineError
from moss_agent.models.delay.tiny import save_tiny_delay
from moss_agent.models.realtime import SamplingConfig


@pytest.fixture(scope="module")
def delay_dir(tmp_path_factory):
    return save_tiny_delay(tmp_path_factory.mktemp("delay16"), n_vq=16, seed=2, scripted_frames=30)


def record_forwards(models: dict[str, object], log: list[tuple[str, str]]) -> list:
    """A forward pre-hook on every module: (model name, thread name) per call, in order."""
    hooks = []
    for name, model in models.items():
        for module in model.modules():  # type: ignore[attr-defined]
            hooks.append(
                module.register_forward_pre_hook(
                    lambda _m, _a, name=name: log.append((name, threading.current_thread().name))
                )
            )
    return hooks


async def test_every_forward_runs_on_the_device_thread(tiny_codec_dir, tiny_realtime_endless_dir, delay_dir):
    registry = ModelRegistry(device="cpu", dtype="float32")
    config = RealtimeEngineConfig(
        num_slots=2, max_context=256, max_frames_per_turn=30, sampling=SamplingConfig(greedy=True)
    )
    realtime = registry.realtime_engine(tiny_realtime_endless_dir, tiny_codec_dir, config=config)
    batch = registry.batch_engine(delay_dir, tiny_codec_dir, max_new_tokens=40)
    assert realtime.codec is batch.codec
    log: list[tuple[str, str]] = []
    hooks = record_forwards({"realtime": realtime.generator.model, "batch": batch.tts.model, "codec": batch.codec}, log)
    voice = Waveform((0.1 * np.sin(np.arange(12000) / 9)).astype(np.float32), 24000)
    requests = [{"text": f"Batch request number {k} runs beside a live conversation."} for k in range(4)]
    requests.append({"text": "With a reference voice.", "reference": voice})
    try:
        async with realtime:
            conversation = await realtime.open_conversation()
            job = asyncio.ensure_future(batch.agenerate(requests, batch_size=1, seed=0))
            while not any(name == "batch" for name, _ in log):  # the job is under way
                await asyncio.sleep(0.005)
            stream = await conversation.start_turn(None, 1)
            await stream.push_text("A live turn while the batch job runs.")
            await stream.end_input()
            chunks = [chunk async for chunk in stream]
            results = await asyncio.wait_for(job, 60)
            await conversation.aclose()
    finally:
        for hook in hooks:
            hook.remove()
        registry.close()
    assert chunks and sorted(r.index for r in results) == list(range(len(requests)))
    assert all(r.frames > 0 for r in results[:4])
    device_thread = "moss-device-cpu"
    threads = {name: {thread for n, thread in log if n == name} for name in ("realtime", "batch", "codec")}
    assert threads == {"realtime": {device_thread}, "batch": {device_thread}, "codec": {device_thread}}, (
        f"a model ran off {device_thread}: {threads}"
    )
    # realtime forwards ran between two batch forwards: the job yielded to the ticks
    order = [name for name, _ in log if name != "codec"]
    first, last = order.index("batch"), len(order) - 1 - order[::-1].index("batch")
    assert "realtime" in order[first:last], "the realtime turn waited for the whole batch job"


def test_a_batch_job_fails_with_its_device_thread(tiny_codec_dir, delay_dir):
    registry = ModelRegistry(device="cpu", dtype="float32")
    batch = registry.batch_engine(delay_dir, tiny_codec_dir, max_new_tokens=40)
    results = batch.generate([{"text": "Before the close."}], progress=False)
    assert len(results) == 1
    registry.close()
    with pytest.raises(EngineError, match="closed"):
        batch.generate([{"text": "After the close."}], progress=False)
