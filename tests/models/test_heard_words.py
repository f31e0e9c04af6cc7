"""On the real engine (a tiny random checkpoint), a cut turn puts only the words heard into the
history, with word timings that end by the cut, while the model keeps the exact frames heard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from moss_agent.events import AudioChunk, WordTimes
from moss_agent.streaming.session import Session

TEXT = " ".join(f"word{i}," if i % 5 == 4 else f"word{i}" for i in range(60)) + "."
HEARD_CHUNKS = 14  # frames of audio the listener hears before the cut (80 ms each)


@pytest.fixture
async def engine(tiny_realtime_endless_dir: Path, tiny_codec_dir: Path) -> AsyncIterator[Any]:
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.codec import load_codec
    from moss_agent.models.realtime import SamplingConfig

    config = RealtimeEngineConfig(
        num_slots=1, max_context=1024, max_frames_per_turn=80, sampling=SamplingConfig(greedy=True)
    )
    codec = load_codec(tiny_codec_dir, device="cpu")
    async with RealtimeEngine.load(tiny_realtime_endless_dir, codec, device="cpu", config=config) as started:
        yield started


async def test_a_cut_turn_keeps_the_heard_words_and_the_next_turn_speaks(engine: Any) -> None:
    async with Session(engine) as session:
        events = session.events()
        handle = session.say(TEXT)
        chunks, settled = 0, []
        async for event in events:
            if isinstance(event, AudioChunk) and event.turn_id == handle.id:
                chunks += 1
                if chunks == HEARD_CHUNKS:
                    break
            elif isinstance(event, WordTimes):
                settled.extend(event.words)
        cut = await asyncio.wait_for(handle.interrupt(), 30)
        final = [e for e in events.drain() if isinstance(e, WordTimes) and e.turn_id == cut.turn_id][-1]

        assert cut.interrupted and cut.error is None and final.final
        assert cut.heard_s >= HEARD_CHUNKS * 0.08 - 1e-6  # every frame played is kept
        heard = " ".join(w.word for w in final.words)
        assert heard and cut.heard_text == heard and TEXT.startswith(heard)
        assert TEXT[len(heard)] == " "  # whole words
        assert all(w.end_s <= cut.heard_s + 1e-6 for w in final.words)
        # Far less than the model had read: it reads 12 tokens ahead, then one per frame.
        assert len(heard.split()) < HEARD_CHUNKS
        # Words settled while streaming are reported again, with final times, only if heard.
        assert [w.word for w in settled][: len(final.words)] == [w.word for w in final.words][: len(settled)]
        assert session.history[-1] == {"role": "assistant", "content": heard}

        after = await asyncio.wait_for(session.say("And now, the next turn."), 60)
        assert after.error is None and after.audio_s > 0
