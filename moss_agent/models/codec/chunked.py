"""Schedule of the codec's chunked offline encode and decode (upstream's ``chunk_duration``).

Upstream (OpenMOSS/MOSS-Audio-Tokenizer) handles one utterance at a time: an utterance no longer
than one chunk takes the plain offline path; a longer one streams through the ring caches a chunk
at a time, and only its last call may be shorter (padded to whole frames, the padding frame then
dropped). Here every batch row follows that schedule in its own slot of one multi-slot state; rows
that feed the same number of frames at the same offset share one masked step, so each row gets
exactly what a batch-of-one upstream call would give it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moss_agent.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ChunkStep:
    """One batched streaming call: ``rows`` feed ``frames`` frames starting at frame ``start``.

    ``kept[i]`` is how many of those frames row ``rows[i]`` keeps: ``frames``, or one fewer when its
    last frame is padding around a partial frame of samples.
    """

    start: int
    frames: int
    rows: tuple[int, ...]
    kept: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """``offline`` rows fit in one chunk and run offline; ``steps`` stream every other row."""

    offline: tuple[int, ...]
    steps: tuple[ChunkStep, ...]


def plan_chunks(fed: Sequence[int], kept: Sequence[int], chunk: int) -> ChunkPlan:
    """fed[b]: frames row b feeds (partial frames rounded up); kept[b]: frames it keeps (rounded down).

    Offline rows keep all ``fed`` frames, as upstream's offline path does; a trailing call that keeps nothing is skipped, since it
    could only change caches that are thrown away.
    """
    offline = tuple(row for row, count in enumerate(fed) if 0 < count <= chunk)
    streamed = [row for row, count in enumerate(fed) if count > chunk]
    steps = []
    for start in range(0, max((fed[row] for row in streamed), default=0), chunk):
        groups: dict[int, list[int]] = {}
        for row in streamed:
            if kept[row] > start:
                groups.setdefault(min(chunk, fed[row] - start), []).append(row)
        for frames, rows in sorted(groups.items(), reverse=True):
            steps.append(ChunkStep(start, frames, tuple(rows), tuple(min(frames, kept[r] - start) for r in rows)))
    return ChunkPlan(offline, tuple(steps))


def resolve_chunk_frames(
    chunk_frames: int | None, chunk_duration: float | None, *, frame_size: int, sample_rate: int, limit: int
) -> int:
    """Chunk length in frames from at most one of the two forms; ``limit`` is the smallest window.

    The default is half the window. A chunk of a whole window leaves no history at its first frame
    (the ring caches are overwritten before attending), while one-frame chunks give the most history
    and the slowest run; half a window keeps at least half a window of history for every frame.
    """
    if chunk_frames is not None and chunk_duration is not None:
        raise ConfigError("give chunk_frames or chunk_duration, not both")
    if chunk_duration is not None:
        samples = round(float(chunk_duration) * sample_rate)
        if samples <= 0 or samples % frame_size:
            raise ConfigError(
                f"chunk_duration={chunk_duration} s is {samples} samples; it must be a positive whole number "
                f"of {frame_size}-sample frames ({frame_size / sample_rate} s each)"
            )
        chunk_frames = samples // frame_size
    if chunk_frames is None:
        return max(1, limit // 2)
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or not 1 <= chunk_frames <= limit:
        raise ConfigError(
            f"a chunk must hold 1 to {limit} frames (the attention window, {limit * frame_size / sample_rate} s), "
            f"got {chunk_frames}"
        )
    return chunk_frames
