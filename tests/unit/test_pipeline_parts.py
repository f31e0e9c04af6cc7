"""Channels (overflow policies), history trimming, metrics, the manual clock and the fake speaker."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moss_agent.config import HistoryConfig, LLMConfig
from moss_agent.errors import ConfigError, OverloadError, SessionClosedError
from moss_agent.events import AudioChunk, Metrics
from moss_agent.streaming.channels import Channel
from moss_agent.streaming.clock import ManualClock
from moss_agent.streaming.history import History
from moss_agent.streaming.metrics import SessionSummary, TurnTimeline, format_breakdown
from moss_agent.testing.audio_io import FakeAudioOutput


async def test_block_channel_makes_the_producer_wait_until_a_get() -> None:
    channel: Channel[int] = Channel(2, "block")
    await channel.put(1)
    await channel.put(2)
    producer = asyncio.create_task(channel.put(3))
    await asyncio.sleep(0)
    assert not producer.done() and len(channel) == 2
    assert await channel.get() == 1
    await producer
    assert [await channel.get(), await channel.get()] == [2, 3]


async def test_drop_oldest_counts_what_it_drops_and_reject_raises() -> None:
    lossy: Channel[int] = Channel(3, "drop_oldest")
    for i in range(5):
        await lossy.put(i)
    assert lossy.dropped == 2 and [await lossy.get() for _ in range(3)] == [2, 3, 4]
    strict: Channel[int] = Channel(1, "reject")
    strict.put_nowait(1)
    with pytest.raises(OverloadError):
        strict.put_nowait(2)


async def test_bypass_items_skip_the_bound_and_close_drains_then_stops() -> None:
    channel: Channel[str] = Channel(1, "block", bypass=lambda item: item == "stop")
    await channel.put("audio")
    await asyncio.wait_for(channel.put("stop"), 1.0)  # control never waits behind audio
    channel.close()
    assert [item async for item in channel] == ["audio", "stop"]
    with pytest.raises(SessionClosedError):
        await channel.put("late")


async def test_close_wakes_a_blocked_getter() -> None:
    channel: Channel[int] = Channel(1)
    getter = asyncio.create_task(channel.get())
    await asyncio.sleep(0)
    channel.close()
    with pytest.raises(SessionClosedError):
        await getter


def test_history_keeps_the_system_prompt_and_trims_oldest_turns() -> None:
    history = History("be brief", HistoryConfig(max_messages=4, max_chars=10_000))
    for i in range(5):
        history.add("user", f"question {i}")
        history.add("assistant", f"answer {i}")
    messages = history.messages()
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert [m["content"] for m in messages[1:]] == ["question 3", "answer 3", "question 4", "answer 4"]
    assert history.trimmed == 6


def test_history_char_budget_never_starts_with_assistant_and_merges_roles() -> None:
    history = History(None, HistoryConfig(max_messages=100, max_chars=30))
    history.add("user", "a" * 10)
    history.add("assistant", "b" * 10)
    history.add("user", "c" * 10)
    history.add("user", "d" * 5)  # two utterances in a row become one message
    history.add("assistant", "e" * 10)
    messages = history.messages()
    assert messages[0]["role"] == "user"
    assert messages[0]["content"] == "c" * 10 + " " + "d" * 5
    assert sum(len(m["content"]) for m in messages) <= 30
    history.add("assistant", "   ")
    assert len(history.messages()) == len(messages)


def test_turn_timeline_breaks_latency_into_stages() -> None:
    tl = TurnTimeline(7, user_end=10.0, stt_start=10.0, stt_end=10.1, llm_request=10.11,
                      llm_first_token=10.31, tts_first_text=10.312, first_audio=10.412,
                      first_output=10.415, last_audio=12.0, frames=25, audio_s=2.0)
    values = tl.values()
    assert values["e2e_s"] == pytest.approx(0.415)
    assert values["stt_s"] == pytest.approx(0.1)
    assert values["llm_ttft_s"] == pytest.approx(0.2)
    assert values["tts_ttfa_s"] == pytest.approx(0.1)
    assert values["pipeline_overhead_s"] == pytest.approx(0.015)
    assert values["rtf"] == pytest.approx((12.0 - 10.312) / 2.0)
    text = format_breakdown(tl.event())
    assert "415.0 ms" in text and "LLM first token" in text and "200.0 ms" in text


def test_summary_aggregates_turns_and_interruptions() -> None:
    summary = SessionSummary()
    for i, interrupted in enumerate([0, 1, 0, 1]):
        summary.add(Metrics(i, {"e2e_s": 0.1 * (i + 1), "interrupted": interrupted, "stt_s": None}))
    stats = summary.stats()
    assert summary.turns == 4 and summary.interruptions == 2
    assert stats["e2e_s"].mean == pytest.approx(0.25) and stats["e2e_s"].max == pytest.approx(0.4)
    assert "stt_s" not in stats
    assert "4 turns, 2 interrupted" in summary.format()



def test_summary_statistics_cover_a_bounded_recent_window() -> None:
    summary = SessionSummary(window=3)
    for i in range(10):
        summary.add(Metrics(i, {"e2e_s": float(i)}))
    stats = summary.stats()["e2e_s"]
    assert summary.turns == 10 and len(summary.samples["e2e_s"]) == 3
    assert (stats.count, stats.mean, stats.max) == (3, 8.0, 9.0)

def test_llm_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        LLMConfig(idle_timeout_s=0)


async def test_manual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = ManualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper("late", 2.0)), asyncio.create_task(sleeper("early", 0.5))]
    await asyncio.sleep(0)
    await clock.advance(1.0)
    assert woke == [("early", 0.5)]
    await clock.advance(1.0)
    assert woke == [("early", 0.5), ("late", 2.0)]
    await asyncio.gather(*tasks)


async def test_fake_speaker_plays_on_its_clock_and_clear_drops_unplayed_audio() -> None:
    clock = ManualClock()
    speaker = FakeAudioOutput(24000, clock=clock, buffer_s=1.0)
    tone = np.ones(24000 // 2, dtype=np.float32)  # 0.5 s
    await speaker.write(AudioChunk(tone, 24000, turn_id=1))
    await speaker.write(AudioChunk(tone, 24000, turn_id=1))
    await clock.advance(0.3)
    assert speaker.played_s(1) == pytest.approx(0.3, abs=0.021)
    speaker.clear()
    await clock.advance(1.0)
    assert speaker.played_s(1) == pytest.approx(0.3, abs=0.021)
    await speaker.write(AudioChunk(tone, 24000, turn_id=2))
    flushed = asyncio.create_task(speaker.flush())
    await clock.advance(0.6)
    await asyncio.wait_for(flushed, 1.0)
    assert speaker.played_s(2) == pytest.approx(0.5)
    assert len(speaker.played_audio(2)) == 12000
    await speaker.aclose()


def test_audio_ring_keeps_the_newest_samples_by_absolute_position() -> None:
    from moss_agent.streaming.listen import AudioRing

    ring = AudioRing(10)
    signal = np.arange(37, dtype=np.float32)
    for start in range(0, 37, 4):
        ring.append(signal[start : start + 4])
    ring.append(np.zeros(0, dtype=np.float32))
    assert ring.end == 37
    np.testing.assert_array_equal(ring.slice(30, 37), signal[30:37])
    np.testing.assert_array_equal(ring.slice(0, 37), signal[27:37])  # older samples are gone
    ring.append(np.arange(100, 125, dtype=np.float32))  # longer than the ring
    np.testing.assert_array_equal(ring.slice(0, ring.end), np.arange(115, 125, dtype=np.float32))
