"""PlaybackBuffer, FramePacer, QueueAudioInput and Connection without any network."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from moss_agent.errors import AudioError, TransportError
from moss_agent.events import AudioChunk, TurnEnded, WordTimes, WordTiming
from moss_agent.transports.base import AudioInput, AudioOutput
from moss_agent.transports.capture import QueueAudioInput
from moss_agent.transports.connection import Connection, event_to_json, parse_control
from moss_agent.transports.playback import FramePacer, PlaybackBuffer


def ramp(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n) / 100_000).astype(np.float32)


def test_buffers_implement_the_protocols() -> None:
    assert isinstance(PlaybackBuffer(24_000), AudioOutput)
    assert isinstance(QueueAudioInput(24_000), AudioInput)


async def test_pull_returns_written_audio_in_order_then_silence_and_counts_played() -> None:
    buffer = PlaybackBuffer(24_000)
    progress: list[tuple[int, float]] = []
    buffer.on_progress(lambda turn, s: progress.append((turn, s)))
    await buffer.write(AudioChunk(ramp(300), 24_000, turn_id=1))
    await buffer.write(AudioChunk(ramp(300, 300), 24_000, turn_id=2))
    first, turn = buffer.pull(480)
    np.testing.assert_array_equal(first, ramp(480))
    assert turn == 1
    second, turn = buffer.pull(480)
    np.testing.assert_array_equal(second[:120], ramp(120, 480))
    assert not second[120:].any()
    assert turn == 2
    assert buffer.played_s(1) == 300 / 24_000
    assert buffer.played_s(2) == 300 / 24_000
    assert progress == [(1, 300 / 24_000), (2, 180 / 24_000), (2, 300 / 24_000)]


async def test_write_waits_while_full_and_resumes_when_the_clock_pulls_from_another_thread() -> None:
    buffer = PlaybackBuffer(1_000, max_buffer_s=0.1)
    await buffer.write(AudioChunk(np.ones(100, np.float32), 1_000, 0))
    blocked = asyncio.create_task(buffer.write(AudioChunk(np.ones(50, np.float32), 1_000, 0)))
    await asyncio.sleep(0)
    assert not blocked.done()
    thread = threading.Thread(target=buffer.pull, args=(60,))
    thread.start()
    await asyncio.wait_for(blocked, 5)
    thread.join()
    assert buffer.queued_s == pytest.approx(0.09)


async def test_clear_drops_queued_audio_and_later_chunks_of_old_turns_only() -> None:
    buffer = PlaybackBuffer(1_000)
    await buffer.write(AudioChunk(np.ones(100, np.float32), 1_000, 7))
    buffer.pull(30)
    buffer.clear()
    assert buffer.queued_s == 0
    await buffer.write(AudioChunk(np.ones(100, np.float32), 1_000, 7))  # stale: dropped
    await buffer.write(AudioChunk(np.full(100, 0.5, np.float32), 1_000, 8))  # a new turn plays
    pcm, turn = buffer.pull(100)
    assert turn == 8
    assert np.all(pcm == 0.5)
    assert buffer.played_s(7) == 0.03


async def test_flush_waits_until_played_and_close_releases_it() -> None:
    buffer = PlaybackBuffer(1_000)
    await buffer.write(AudioChunk(np.ones(100, np.float32), 1_000, 1))
    flushing = asyncio.create_task(buffer.flush())
    await asyncio.sleep(0)
    assert not flushing.done()
    buffer.pull(100)
    await asyncio.wait_for(flushing, 5)
    await buffer.write(AudioChunk(np.ones(100, np.float32), 1_000, 2))
    flushing = asyncio.create_task(buffer.flush())
    await asyncio.sleep(0)
    buffer.close()
    await asyncio.wait_for(flushing, 5)


async def test_write_resamples_to_the_buffer_rate_and_flush_keeps_the_tail() -> None:
    buffer = PlaybackBuffer(48_000)
    t = np.arange(24_000) / 24_000
    await buffer.write(AudioChunk((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 24_000, 1))
    flushing = asyncio.create_task(buffer.flush())
    await asyncio.sleep(0)
    assert buffer.queued_s == pytest.approx(1.0, abs=0.001)
    pcm, _ = buffer.pull(48_000)
    await flushing
    spectrum = np.abs(np.fft.rfft(pcm))
    assert np.argmax(spectrum) == 440


async def test_bad_audio_is_refused_with_audio_error() -> None:
    buffer = PlaybackBuffer(1_000)
    with pytest.raises(AudioError, match="NaN"):
        await buffer.write(AudioChunk(np.array([0.0, np.nan], np.float32), 1_000, 1))
    with pytest.raises(AudioError, match="mono"):
        await buffer.write(AudioChunk(np.zeros((2, 10), np.float32), 1_000, 1))


async def test_frame_pacer_schedules_frames_on_the_clock_and_resyncs_after_a_stall(monkeypatch) -> None:
    now = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    pacer = FramePacer(960, 48_000, max_lag_s=0.2, clock=lambda: now[0])
    pts = [await pacer.next() for _ in range(5)]
    assert pts == [0, 960, 1920, 2880, 3840]
    assert slept == pytest.approx([0.02] * 4)
    now[0] += 1.0  # the consumer stalled for a second
    late = await pacer.next()
    assert late > 3840 + 960 and late % 960 == 0
    assert pacer.resyncs == 1
    assert await pacer.next() == late + 960


async def test_queue_input_resamples_drops_oldest_when_behind_and_ends_on_close() -> None:
    source = QueueAudioInput(16_000, max_queue_s=0.1, chunk_s=0.02)
    for _ in range(20):
        source.feed(np.zeros(960, np.float32), 48_000)
    source.close()
    chunks = [chunk async for chunk in source]
    assert 0 < len(chunks) <= 5
    assert source.dropped_chunks > 0
    assert all(chunk.sample_rate == 16_000 for chunk in chunks)


async def test_connection_control_validation_and_event_encoding() -> None:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    conn = Connection("c1", QueueAudioInput(), PlaybackBuffer(24_000), send, client_id="dev")
    conn.deliver_control(parse_control({"type": "interrupt"}))
    conn.mark_closed()
    assert [m async for m in conn.control] == [{"type": "interrupt"}]
    with pytest.raises(TransportError, match="unknown control"):
        parse_control({"type": "reboot"})
    with pytest.raises(TransportError, match="JSON object"):
        parse_control(["interrupt"])
    assert event_to_json(TurnEnded(3, "hi", 1.5)) == {"type": "turn_ended", "turn_id": 3, "text": "hi", "audio_s": 1.5}
    timed = WordTimes(3, (WordTiming("hi", 0.0, 0.25),), final=True)
    assert event_to_json(timed) == {
        "type": "word_times", "turn_id": 3, "words": [{"word": "hi", "start_s": 0.0, "end_s": 0.25}], "final": True
    }
    assert json.loads(json.dumps(event_to_json(timed))) == event_to_json(timed)
    await conn.send_event({"type": "late"})
    assert sent == []  # events after the client left are dropped
