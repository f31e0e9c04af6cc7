"""The tiny realtime engine the speech-service tests serve: turns that always run to their frame cap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.models.realtime import SamplingConfig

FRAME_S = 0.08


@contextlib.asynccontextmanager
async def endless_engine(realtime_dir: Path, codec_dir: Path, cap: int) -> AsyncIterator[RealtimeEngine]:
    """Two slots, greedy, ``cap`` frames a turn, a small look-ahead and text budget (backpressure
    shows within a few frames), and a short call timeout (a stuck device fails the test fast)."""
    config = RealtimeEngineConfig(
        num_slots=2, max_context=512, max_frames_per_turn=cap, sampling=SamplingConfig(greedy=True),
        max_ahead_s=3 * FRAME_S, text_buffer_chars=64, call_timeout_s=5.0,
    )  # fmt: skip
    loaded = await asyncio.to_thread(RealtimeEngine.load, realtime_dir, codec_dir, device="cpu", config=config)
    async with loaded:
        yield loaded
