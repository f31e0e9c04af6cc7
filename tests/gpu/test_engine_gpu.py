"""The realtime engine on CUDA (skipped without a GPU): audio flows, slots stay isolated."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.models.codec import load_codec
from moss_agent.models.realtime import SamplingConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


async def _speak(conversation, text):
    stream = await conversation.start_turn(None, 1)
    await stream.push_text(text)
    await stream.end_input()
    return np.concatenate([c.pcm async for c in stream])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_engine_on_cuda_isolates_slots(tiny_realtime_dir, tiny_codec_dir, dtype):
    codec = load_codec(tiny_codec_dir, device="cuda", dtype=dtype)
    config = RealtimeEngineConfig(num_slots=8, max_context=512, max_frames_per_turn=24,
                                  sampling=SamplingConfig(greedy=True))
    texts = [f"Session number {i} says hello to everyone." for i in range(8)]
    async with RealtimeEngine.load(tiny_realtime_dir, codec, device="cuda", dtype=dtype, config=config) as engine:
        conversation = await engine.open_conversation()
        alone = await _speak(conversation, texts[3])
        await conversation.aclose()
        conversations = [await engine.open_conversation() for _ in texts]
        together = await asyncio.gather(*(_speak(c, t) for c, t in zip(conversations, texts, strict=True)))
        assert np.isfinite(together[3]).all()
        if dtype == "float32":
            np.testing.assert_allclose(together[3], alone, atol=1e-4)
        for c in conversations:
            await c.aclose()
