"""The output safety limiter (moss_agent.limiter): real speech made 20x too loud never leaves above the
-1 dBFS ceiling, audio within it passes bit-exact, the gain never jumps, chunking changes nothing,
NaN/inf become silence; and a session's agent audio reaches its output and its events limited."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moss_agent.audio import load_audio
from moss_agent.events import AudioChunk, FloatArray
from moss_agent.limiter import CEILING_DBFS, PeakLimiter, limit, log_limited
from moss_agent.streaming.clock import ScaledClock
from moss_agent.streaming.session import Session
from moss_agent.streaming.tts import HeardResult, UserTurn
from moss_agent.testing.audio_io import FakeAudioOutput
from moss_agent.testing.backend import FakeConversation, FakeSpeechBackend, FakeSpeechStream

RATE = 24000
CEILING = 10 ** (CEILING_DBFS / 20)


@pytest.fixture(scope="module")
def speech(audio_dir: Path) -> np.ndarray:
    return load_audio(audio_dir / "user1.wav", RATE)


def _stream(limiter: PeakLimiter, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    """x through ``limiter`` in chunks of the given sizes (the rest in one), then its flush."""
    parts, start = [], 0
    for size in sizes:
        parts.append(limiter.process(x[start : start + size]))
        start += size
    parts.append(limiter.process(x[start:]))
    parts.append(limiter.flush())
    return np.concatenate(parts)


def _gain_steps(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|gain[n] - gain[n-1]| where the gain y/x is well defined at both samples."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    defined = np.abs(x64) > 1e-2
    gain = np.where(defined, y64 / np.where(defined, x64, 1.0), np.nan)
    both = defined[1:] & defined[:-1]
    return np.abs(np.diff(gain))[both]


def test_the_ceiling_is_one_db_below_full_scale_and_a_whole_pcm16_step() -> None:
    limiter = PeakLimiter(RATE)
    assert 20 * np.log10(limiter.ceiling) == pytest.approx(-1.0, abs=0.001) and limiter.ceiling <= CEILING
    assert limiter.ceiling * 32768 == int(limiter.ceiling * 32768) and np.float32(limiter.ceiling) == limiter.ceiling
    assert limiter.lookahead / RATE <= 0.005  # a few ms of latency at most


def test_loud_real_speech_never_exceeds_the_ceiling(speech: np.ndarray) -> None:
    loud = speech * 20  # peaks near +20 dBFS, as the agent audio
    limiter = PeakLimiter(RATE)
    frame = round(0.08 * RATE)  # the realtime engine's 80 ms chunks
    y = _stream(limiter, loud, [frame] * (len(loud) // frame))
    assert y.dtype == np.float32 and len(y) == len(loud)
    assert np.abs(y).max() <= limiter.ceiling
    assert np.abs(y).max() > 0.8 * limiter.ceiling  # turned down to the ceiling, not far below it
    # the same speech, turned down: it follows the original far more closely than clipping would
    clipped = np.clip(loud, -limiter.ceiling, limiter.ceiling)
    assert np.corrcoef(y, loud)[0, 1] > 0.9
    assert np.corrcoef(y, loud)[0, 1] > np.corrcoef(clipped, loud)[0, 1] + 0.05
    stats = limiter.stats
    assert stats.samples == len(loud) and stats.nonfinite == 0
    assert stats.peak == pytest.approx(float(np.abs(loud).max()))
    assert stats.reduced == int(np.count_nonzero(y != loud))
    assert 0.3 < stats.reduced_fraction <= 1.0


def test_speech_within_the_ceiling_passes_bit_exact(speech: np.ndarray) -> None:
    assert np.abs(speech).max() < CEILING
    y, stats = limit(speech, RATE)
    np.testing.assert_array_equal(y, speech)
    assert stats.reduced == 0
    # just below the ceiling, noise with sharp peaks, fed in small chunks
    noise = np.random.default_rng(0).uniform(-1, 1, RATE).astype(np.float32) * np.float32(PeakLimiter(RATE).ceiling)
    np.testing.assert_array_equal(_stream(PeakLimiter(RATE), noise, [7, 100, 1] * 50), noise)


def test_after_a_loud_burst_the_gain_recovers_to_exactly_one(speech: np.ndarray) -> None:
    quiet = speech[: RATE]
    burst = np.concatenate([quiet, speech[RATE : RATE + RATE // 2] * 30, quiet]).astype(np.float32)
    y, _ = limit(burst, RATE)
    np.testing.assert_array_equal(y[:RATE - 10], burst[:RATE - 10])  # before the burst (minus the look-ahead)
    assert np.abs(y).max() <= PeakLimiter(RATE).ceiling
    # 30x is about 30 dB of reduction, released at 60 dB/s: well within the final second
    tail = slice(len(burst) - RATE // 3, None)
    np.testing.assert_array_equal(y[tail], burst[tail])


def test_the_gain_never_jumps(speech: np.ndarray) -> None:
    limiter = PeakLimiter(RATE)
    bound = 1.0 / (limiter.lookahead + 1) + 1e-6
    loud = speech * 20
    y, _ = limit(loud, RATE)
    assert _gain_steps(loud, y).max() <= bound
    # the worst case: silence, then at once a tone 23x too loud (a click if the gain stepped)
    t = np.arange(RATE // 2) / RATE
    onset = np.concatenate([np.zeros(RATE // 4), 23 * np.sin(2 * np.pi * 300 * t)]).astype(np.float32)
    y, _ = limit(onset, RATE)
    assert np.abs(y).max() <= limiter.ceiling
    assert _gain_steps(onset, y).max() <= bound


def test_a_loud_first_sample_is_already_limited() -> None:
    x = np.full(1000, 5.0, dtype=np.float32)
    y, _ = limit(x, RATE)
    assert np.abs(y).max() <= PeakLimiter(RATE).ceiling
    assert y[0] > 0.5 * PeakLimiter(RATE).ceiling  # turned down, not muted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_chunk_or_many_give_the_same_samples(speech: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # loud and quiet passages, so both the limiting and the pass-through paths meet chunk boundaries
    x = np.concatenate([speech[: RATE // 2], speech[RATE : 2 * RATE] * 25, speech[: RATE // 2]]).astype(np.float32)
    whole, _ = limit(x, RATE)
    sizes = [int(s) for s in rng.choice([0, 1, 3, 47, 48, 49, 480, 1920, 5000], size=40)]
    assert sum(sizes) < len(x)
    np.testing.assert_array_equal(_stream(PeakLimiter(RATE), x, sizes), whole)


def test_the_output_is_the_input_delayed_by_the_look_ahead() -> None:
    limiter = PeakLimiter(RATE)
    lookahead = limiter.lookahead
    x = np.random.default_rng(3).uniform(-0.5, 0.5, 1920).astype(np.float32)
    first = limiter.process(x)
    np.testing.assert_array_equal(first, x[: len(x) - lookahead])
    np.testing.assert_array_equal(limiter.flush(), x[len(x) - lookahead :])
    assert len(limiter.process(x[:10])) == 0  # shorter than the look-ahead: held
    limiter.reset()  # an interrupted stream: the held samples are dropped
    assert len(limiter.flush()) == 0


def test_nan_and_inf_become_silence() -> None:
    x = (0.5 * np.sin(np.arange(4800) / 10)).astype(np.float32)
    bad = x.copy()
    bad[[100, 2000, 4000]] = [np.nan, np.inf, -np.inf]
    y, stats = limit(bad, RATE)
    assert np.isfinite(y).all()
    assert (y[[100, 2000, 4000]] == 0).all()
    keep = np.ones(len(x), dtype=bool)
    keep[[100, 2000, 4000]] = False
    np.testing.assert_array_equal(y[keep], x[keep])  # the rest is untouched (within the ceiling)
    assert stats.nonfinite == 3 and stats.reduced == 3
    assert "3 NaN/inf samples set to 0" in stats.describe()


def test_channels_share_one_gain() -> None:
    t = np.arange(RATE // 4) / RATE
    left = 10 * np.sin(2 * np.pi * 200 * t)
    stereo = np.stack([left, 0.1 * left], axis=1).astype(np.float32)
    y, _ = limit(stereo, RATE)
    assert y.shape == stereo.shape and np.abs(y).max() <= PeakLimiter(RATE).ceiling
    loud = np.abs(stereo[:, 1]) > 1e-3
    np.testing.assert_allclose(y[loud, 0] / stereo[loud, 0], y[loud, 1] / stereo[loud, 1], rtol=1e-5)


def test_the_log_line_says_how_much_was_reduced(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("moss_agent.test_limiter")
    _, quiet = limit(np.full(100, 0.1, dtype=np.float32), RATE)
    _, loud = limit(np.concatenate([np.full(100, 0.1), np.full(300, 4.0)]).astype(np.float32), RATE)
    with caplog.at_level(logging.INFO, logger=logger.name):
        log_limited(logger, quiet, "quiet.wav")  # nothing changed: nothing said
        log_limited(logger, loud, "loud.wav")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("limiter: loud.wav: reduced ")
    assert f"{100 * loud.reduced / 400:.1f}% of samples, peak +12.0 dBFS" in messages[0]


# ------------------------------------------------------------------------------------- in a session


class LoudStream:
    """A fake speech stream whose audio is ``gain`` times too loud, as a random checkpoint's is."""

    def __init__(self, inner: FakeSpeechStream, gain: float) -> None:
        self._inner = inner
        self._gain = gain
        self.turn_id = inner.turn_id
        self.made: list[FloatArray] = []

    async def push_text(self, delta: str) -> None:
        await self._inner.push_text(delta)

    async def end_input(self) -> None:
        await self._inner.end_input()

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[AudioChunk]:
        async for chunk in self._inner:
            loud = replace(chunk, pcm=(chunk.pcm * self._gain).astype(np.float32))
            self.made.append(loud.pcm)
            yield loud

    async def interrupt(self, heard_s: float | None = None) -> HeardResult:
        return await self._inner.interrupt(heard_s)

    async def aclose(self) -> None:
        await self._inner.aclose()


class LoudConversation:
    def __init__(self, inner: FakeConversation, gain: float) -> None:
        self._inner = inner
        self._gain = gain
        self.sample_rate = inner.sample_rate
        self.streams: list[LoudStream] = []

    async def start_turn(self, user: UserTurn | None, turn_id: int) -> LoudStream:
        stream = LoudStream(await self._inner.start_turn(user, turn_id), self._gain)
        self.streams.append(stream)
        return stream

    async def aclose(self) -> None:
        await self._inner.aclose()


class LoudBackend:
    def __init__(self, inner: FakeSpeechBackend, gain: float) -> None:
        self._inner = inner
        self._gain = gain
        self.sample_rate = inner.sample_rate
        self.conversations: list[LoudConversation] = []

    async def open_conversation(
        self, *, system_prompt: str | None = None, voice_prompt: FloatArray | None = None
    ) -> LoudConversation:
        inner = await self._inner.open_conversation(system_prompt=system_prompt, voice_prompt=voice_prompt)
        conversation = LoudConversation(inner, self._gain)
        self.conversations.append(conversation)
        return conversation


@pytest.fixture
def clock() -> ScaledClock:
    return ScaledClock(50.0)


async def test_a_sessions_agent_audio_reaches_the_output_limited(clock: ScaledClock) -> None:
    backend = LoudBackend(FakeSpeechBackend(clock=clock), gain=40.0)  # a 0.3 tone at 40x: +21.6 dBFS
    speaker = FakeAudioOutput(clock=clock)
    try:
        async with Session(backend, output=speaker, clock=clock) as session:
            result = await session.say("Far too loud.")
            played = speaker.played_audio(result.turn_id)
            made = np.concatenate(backend.conversations[0].streams[0].made)
            assert len(played) == len(made) == round(result.audio_s * RATE)
            assert np.abs(made).max() > 10
            assert np.abs(played).max() <= PeakLimiter(RATE).ceiling
            assert np.corrcoef(played, made)[0, 1] > 0.95
            stats = session.limiter_stats
            assert stats.samples == len(made) and stats.reduced_fraction > 0.5
            assert stats.peak_dbfs == pytest.approx(20 * np.log10(np.abs(made).max()))
    finally:
        await speaker.aclose()


async def test_without_an_output_the_audio_events_are_limited(clock: ScaledClock) -> None:
    backend = LoudBackend(FakeSpeechBackend(clock=clock), gain=40.0)
    async with Session(backend, clock=clock) as session:
        events = session.events()
        result = await session.say("Loud events.")
        chunks = [event for event in events.drain() if isinstance(event, AudioChunk)]
    audio = np.concatenate([chunk.pcm for chunk in chunks])
    assert len(audio) == round(result.audio_s * RATE)
    assert np.abs(audio).max() <= PeakLimiter(RATE).ceiling
    assert {chunk.turn_id for chunk in chunks} == {result.turn_id}


async def test_an_interrupted_loud_turn_plays_only_limited_audio(clock: ScaledClock) -> None:
    backend = LoudBackend(FakeSpeechBackend(clock=clock), gain=40.0)
    speaker = FakeAudioOutput(clock=clock)
    try:
        async with Session(backend, output=speaker, clock=clock) as session:
            turn = session.say("A long and loud reply that the user cuts short before it ends.")
            while speaker.played_s(turn.id) < 0.3:
                await asyncio.sleep(0.001)
            result = await turn.interrupt()
            assert result.interrupted
            played = speaker.played_audio(result.turn_id)
            assert len(played) > 0 and np.abs(played).max() <= PeakLimiter(RATE).ceiling
            after = session.say("Next.")
            await after
            assert np.abs(speaker.played_audio(after.id)).max() <= PeakLimiter(RATE).ceiling
    finally:
        await speaker.aclose()
