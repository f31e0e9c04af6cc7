"""The output safety limiter: every sample the agent plays or writes stays at or below -1 dBFS.

The speech models can produce samples far outside [-1, 1] (a random checkpoint peaks above 20x full
scale); played as floats they are painfully loud, written as PCM16 they clip hard. Every output
therefore passes one :class:`PeakLimiter`: realtime agent audio in
``moss_agent.streaming.turn_runner`` before it fans out to the speaker, WebRTC, MQTT and event
subscribers, and files in :func:`moss_agent.audio.write_wav`.

Headroom: the ceiling is ``CEILING_DBFS`` = -1 dBFS (29204/32768 = 0.891 of full scale, rounded down
to a PCM16 step), so PCM16 conversion, resampling overshoot in a transport and lossy codecs (Opus)
do not clip what leaves the limiter.

How it works, on whole chunks (numpy, no per-sample Python loop):

1. each sample needs the gain ``min(1, ceiling / |x|)`` (channels share one gain);
2. a look-ahead of ``LOOKAHEAD_S`` (2 ms): each position takes the smallest gain needed over the
   next look-ahead window, so the gain is already down when a peak arrives;
3. release: after a peak the gain rises back smoothly, by at most ``RELEASE_DB_PER_S``;
4. a moving average over the look-ahead window turns the steps into ramps: every position it
   averages needed at most the gain of the sample being limited, so no sample leaves above the
   ceiling, and the gain moves by at most ``1 / (look-ahead samples + 1)`` from one sample to the
   next (no clicks);
5. a hard clip at the ceiling catches float rounding; NaN and infinite samples become 0.

Audio at or below the ceiling, away from any louder passage, passes bit-exact. The output is the
input delayed by the look-ahead (2 ms): ``process`` holds the last look-ahead of samples back and
``flush`` returns them at the end of the stream. Feeding a stream in one chunk or in many gives the
same samples. :class:`LimiterStats` counts what the limiter changed, so a user can see when the model
is too loud (``moss-agent ... -v`` logs it per turn and per file).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CEILING_DBFS",
    "LOOKAHEAD_S",
    "RELEASE_DB_PER_S",
    "LimiterStats",
    "PeakLimiter",
    "limit",
    "log_limited",
]

CEILING_DBFS = -1.0
LOOKAHEAD_S = 0.002
RELEASE_DB_PER_S = 60.0

_NEPERS_PER_DB = math.log(10.0) / 20.0
_PCM16_STEPS = 32768
_BLOCK = 1 << 16  # samples per block in limit()


@dataclass
class LimiterStats:
    """What a limiter did: ``samples`` seen (frames, for multi-channel audio), how many it changed
    (``reduced``: turned down, clipped or zeroed), ``nonfinite`` samples zeroed, the input ``peak``."""

    samples: int = 0
    reduced: int = 0
    nonfinite: int = 0
    peak: float = 0.0

    @property
    def reduced_fraction(self) -> float:
        return self.reduced / self.samples if self.samples else 0.0

    @property
    def peak_dbfs(self) -> float:
        """The largest finite input sample in dB relative to full scale (-inf for silence)."""
        return 20.0 * math.log10(self.peak) if self.peak > 0 else -math.inf

    def add(self, other: LimiterStats) -> None:
        self.samples += other.samples
        self.reduced += other.reduced
        self.nonfinite += other.nonfinite
        self.peak = max(self.peak, other.peak)

    def describe(self) -> str:
        text = f"reduced {100.0 * self.reduced_fraction:.1f}% of samples, peak {self.peak_dbfs:+.1f} dBFS"
        if self.nonfinite:
            text += f", {self.nonfinite} NaN/inf samples set to 0"
        return text


class PeakLimiter:
    """A streaming look-ahead peak limiter for one stream of float audio (see the module docstring).

    ``process(chunk)`` takes [n] or [n, C] float samples and returns what is ready, float32 of the
    same layout: all but the last look-ahead of the stream so far. ``flush()`` returns the held tail
    and starts a new stream; ``reset()`` drops it (an interrupted turn). ``stats`` accumulates over
    every stream. One stream per instance; not thread-safe.
    """

    def __init__(
        self,
        sample_rate: float,
        *,
        ceiling_dbfs: float = CEILING_DBFS,
        lookahead_s: float = LOOKAHEAD_S,
        release_db_per_s: float = RELEASE_DB_PER_S,
    ) -> None:
        if not (sample_rate > 0 and math.isfinite(sample_rate)):
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
        if not ceiling_dbfs <= 0.0:
            raise ValueError(f"ceiling_dbfs must be at most 0 dBFS, got {ceiling_dbfs}")
        if not (lookahead_s > 0 and release_db_per_s > 0):
            raise ValueError("lookahead_s and release_db_per_s must be positive")
        self.sample_rate = sample_rate
        # Rounded down to a whole PCM16 step: exact in float32 and in PCM16, so neither conversion
        # takes a limited sample above the ceiling.
        self.ceiling = math.floor(10.0 ** (ceiling_dbfs / 20.0) * _PCM16_STEPS) / _PCM16_STEPS
        self.lookahead = max(1, round(lookahead_s * sample_rate))
        self._log_ceiling = math.log(self.ceiling)
        self._release = release_db_per_s * _NEPERS_PER_DB / sample_rate  # log-gain rise per sample
        self.stats = LimiterStats()
        self._channels: int | None = None
        self._mono = True
        self._start_stream()

    # ------------------------------------------------------------------ public

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """chunk: [n] or [n, C] float -> float32 [m] or [m, C], the stream delayed by the look-ahead."""
        x = self._as_frames(chunk)
        out = self._run(x, pad=0)
        return out[:, 0] if self._mono else out

    def flush(self) -> np.ndarray:
        """End the stream: the held tail ([look-ahead] samples at most); the next chunk starts a new one."""
        out = self._run(np.zeros((0, self._channels or 1), dtype=np.float32), pad=self.lookahead)
        self._start_stream()
        return out[:, 0] if self._mono else out

    def reset(self) -> None:
        """Drop the held samples and start a new stream (after an interruption)."""
        self._start_stream()

    # ------------------------------------------------------------------ state

    def _start_stream(self) -> None:
        channels = self._channels or 1
        # The stream starts after a look-ahead of silence, so the gain can ramp down before a loud
        # first sample; the outputs for that silence are discarded (``_skip``).
        self._held = np.zeros((self.lookahead, channels), dtype=np.float32)
        self._skip = self.lookahead
        self._position = 0  # stream index of the first held sample (silence included)
        self._deficits = np.zeros(self.lookahead)  # 1 - gain before the moving average, last positions
        self._release_floor = math.inf  # min over past positions k of (log gain - k * release)
        self._streaming = False

    def _as_frames(self, chunk: np.ndarray) -> np.ndarray:
        """chunk [n] or [n, C] -> finite float32 frames [n, C]; NaN, inf (and float64 beyond float32) -> 0."""
        x = np.asarray(chunk)
        if x.dtype.kind != "f" or x.ndim not in (1, 2):
            raise ValueError(f"the limiter takes float samples of shape [n] or [n, C], got {x.dtype} {x.shape}")
        with np.errstate(over="ignore"):
            frames = (x[:, None] if x.ndim == 1 else x).astype(np.float32, copy=False)
        channels = frames.shape[1]
        if self._channels != channels or self._mono != (x.ndim == 1):
            if self._streaming:
                raise ValueError(f"a stream of shape [n, {self._channels}] got a chunk of shape {x.shape}")
            self._channels, self._mono = channels, x.ndim == 1
            self._held = np.zeros((self.lookahead, channels), dtype=np.float32)
        self._streaming = True
        finite = np.isfinite(frames)
        if not finite.all():
            self.stats.nonfinite += int(np.count_nonzero(~finite))
            self.stats.reduced += int(np.count_nonzero(~finite.all(axis=1)))  # a zeroed sample was changed
            frames = np.where(finite, frames, np.float32(0.0))
        if frames.size:
            self.stats.peak = max(self.stats.peak, float(np.abs(frames).max()))
        self.stats.samples += len(frames)
        return frames

    # ------------------------------------------------------------------ the gain

    def _run(self, x: np.ndarray, *, pad: int) -> np.ndarray:
        """Append x [n, C] (and ``pad`` samples of trailing silence) -> the samples now ready."""
        lookahead = self.lookahead
        buffer = np.concatenate([self._held, x, np.zeros((pad, x.shape[1]), dtype=np.float32)])
        ready = len(buffer) - lookahead  # outputs whose whole look-ahead window is known
        if ready <= 0:
            self._held = buffer
            return np.zeros((0, x.shape[1]), dtype=np.float32)
        level = np.abs(buffer).max(axis=1).astype(np.float64)  # [ready + lookahead]
        loud = level > self.ceiling
        if not loud.any() and not self._deficits.any() and self._released():
            out = buffer[:ready].copy()  # the fast path: bit-exact, and the state as the slow path leaves it
            last = float(self._position + ready - 1)
            self._release_floor = min(self._release_floor, 0.0 - last * self._release)
        else:
            log_needed = np.zeros_like(level)
            log_needed[loud] = self._log_ceiling - np.log(level[loud])
            gain = self._gain(log_needed, ready)
            out = np.clip(buffer[:ready] * gain[:, None], -self.ceiling, self.ceiling).astype(np.float32)
        self.stats.reduced += int(np.count_nonzero((out != buffer[:ready]).any(axis=1)[self._skip :]))
        self._held = buffer[ready:]
        self._position += ready
        skip, self._skip = min(self._skip, ready), max(0, self._skip - ready)
        return out[skip:]

    def _released(self) -> bool:
        """Whether the release has fully recovered (the gain is back at 1 from now on)."""
        return self._release_floor + self._position * self._release >= 0.0

    def _gain(self, log_needed: np.ndarray, ready: int) -> np.ndarray:
        """log_needed [ready + lookahead] (log of the largest gain each sample allows, <= 0) -> gain [ready]."""
        window = self.lookahead + 1
        # 2. the smallest gain over each position's look-ahead window
        ahead = log_needed[:ready].copy()
        for offset in range(1, window):
            np.minimum(ahead, log_needed[offset : offset + ready], out=ahead)
        # 3. release: log_gain[i] = min over k <= i of ahead[k] + (i - k) * release. Positions are the
        # stream's own indices, so chunk boundaries do not change the rounding.
        positions = self._position + np.arange(ready, dtype=np.float64)
        ramp = positions * self._release
        floor = np.minimum.accumulate(ahead - ramp)
        np.minimum(floor, self._release_floor, out=floor)
        self._release_floor = float(floor[-1])
        log_gain = np.minimum(floor + ramp, 0.0)
        # 4. the moving average of (1 - gain) over the window, in a fixed order for every chunking
        deficits = np.concatenate([self._deficits, -np.expm1(log_gain)])
        total = deficits[:ready].copy()
        for offset in range(1, window):
            total += deficits[offset : offset + ready]
        self._deficits = deficits[ready:]
        return 1.0 - total / window


def limit(x: np.ndarray, sample_rate: float, **options: float) -> tuple[np.ndarray, LimiterStats]:
    """A whole signal x: [T] or [T, C] through a fresh :class:`PeakLimiter` -> (float32 of the same
    shape, what it changed). ``options`` go to the limiter (ceiling_dbfs, lookahead_s, release_db_per_s)."""
    limiter = PeakLimiter(sample_rate, **options)
    samples = np.asarray(x)
    # Blocks bound the float64 work arrays for long files; chunking does not change the output.
    parts = [limiter.process(samples[start : start + _BLOCK]) for start in range(0, len(samples), _BLOCK)]
    parts.append(limiter.flush())
    return np.concatenate(parts).reshape(samples.shape), limiter.stats


def log_limited(logger: logging.Logger, stats: LimiterStats, what: str, level: int = logging.INFO) -> None:
    """Log what the limiter changed in ``what`` (a turn, a file), when it changed anything."""
    if stats.reduced or stats.nonfinite:
        logger.log(
            level,
            "limiter: %s: %s (ceiling %g dBFS)",
            what,
            stats.describe(),
            CEILING_DBFS,
            extra={
                "what": what,
                "reduced": stats.reduced,
                "samples": stats.samples,
                "nonfinite": stats.nonfinite,
                "peak_dbfs": round(stats.peak_dbfs, 1),
            },
        )
