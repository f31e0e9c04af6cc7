"""Per-turn latency timeline, session summary, and a readable breakdown.

RTF here is ``generation wall time / audio seconds`` measured at the stream boundary (below 1 is
faster than real time). When a paced sink holds the engine back, it is an upper bound on compute.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from moss_agent.events import Metrics

MetricValues = dict[str, float | int | None]

STAGES = ("stt_s", "llm_ttft_s", "tts_ttfa_s")


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, end - start)


@dataclass(slots=True)
class TurnTimeline:
    """Clock readings (seconds) of one agent turn; None where the stage did not happen."""

    turn_id: int
    user_end: float | None = None
    stt_start: float | None = None
    stt_end: float | None = None
    llm_request: float | None = None
    llm_first_token: float | None = None
    tts_first_text: float | None = None
    first_audio: float | None = None
    first_output: float | None = None
    last_audio: float | None = None
    end: float | None = None
    frames: int = 0
    audio_s: float = 0.0
    heard_s: float | None = None
    interrupted: bool = False

    def values(self) -> MetricValues:
        stt = _span(self.stt_start, self.stt_end)
        llm = _span(self.llm_request, self.llm_first_token)
        tts = _span(self.tts_first_text, self.first_audio)
        origin = self.user_end if self.user_end is not None else self.llm_request or self.tts_first_text
        e2e = _span(self.user_end, self.first_output)
        first_audio_out = _span(origin, self.first_output)
        overhead = None
        if first_audio_out is not None:
            overhead = max(0.0, first_audio_out - sum(v for v in (stt, llm, tts) if v is not None))
        gen = _span(self.tts_first_text, self.last_audio)
        return {
            "e2e_s": e2e,
            "stt_s": stt,
            "llm_ttft_s": llm,
            "tts_ttfa_s": tts,
            "first_audio_out_s": first_audio_out,
            "pipeline_overhead_s": overhead,
            "turn_start_s": _span(self.stt_end if self.stt_end is not None else self.user_end, self.llm_request),
            "stt_queue_s": _span(self.user_end, self.stt_start),
            "first_write_s": _span(self.first_audio, self.first_output),
            "rtf": gen / self.audio_s if gen is not None and self.audio_s > 0 else None,
            "frames": self.frames,
            "audio_s": self.audio_s,
            "heard_s": self.heard_s,
            "interrupted": int(self.interrupted),
        }

    def event(self) -> Metrics:
        return Metrics(self.turn_id, self.values())


@dataclass(frozen=True, slots=True)
class Stat:
    count: int
    mean: float
    p50: float
    p95: float
    max: float


def _stat(samples: Iterable[float]) -> Stat:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return Stat(len(ordered), statistics.fmean(ordered), statistics.median(ordered), p95, ordered[-1])


@dataclass(slots=True)
class SessionSummary:
    """Counts of every finished turn, and statistics over the most recent ``window`` turns.

    The window bounds memory for a session that runs for days (it would otherwise keep one float
    per figure per turn forever).
    """

    turns: int = 0
    interruptions: int = 0
    errors: int = 0
    window: int = 1000
    samples: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, metrics: Metrics) -> None:
        self.turns += 1
        self.interruptions += int(metrics.values.get("interrupted") or 0)
        for key, value in metrics.values.items():
            if value is not None and key != "interrupted":
                self.samples.setdefault(key, deque(maxlen=self.window)).append(float(value))

    def stats(self) -> dict[str, Stat]:
        return {key: _stat(values) for key, values in self.samples.items() if values}

    def format(self) -> str:
        lines = [f"{self.turns} turns, {self.interruptions} interrupted, {self.errors} errors"]
        for key, stat in sorted(self.stats().items()):
            scale, unit = (1000.0, "ms") if key.endswith("_s") and key != "audio_s" else (1.0, "")
            lines.append(
                f"  {key:<20} mean {stat.mean * scale:8.1f}{unit}  p50 {stat.p50 * scale:8.1f}{unit}"
                f"  p95 {stat.p95 * scale:8.1f}{unit}  max {stat.max * scale:8.1f}{unit}"
            )
        return "\n".join(lines)


def format_breakdown(metrics: Metrics, *, stt_s: float | None = None) -> str:
    """Multi-line latency breakdown of one turn, for a --verbose CLI.

    A session times speech recognition only for the utterances it hears itself; a caller that
    transcribed the user's audio before asking for the turn (``reply``) passes that time as
    ``stt_s``, and it counts in the total. A stage that did not run shows ``-``.
    """
    v = dict(metrics.values)
    if stt_s is not None and v.get("stt_s") is None:
        v["stt_s"] = stt_s
        start = v.get("first_audio_out_s")
        v["first_audio_out_s"] = None if start is None else float(start) + stt_s

    def ms(key: str) -> str:
        value = v.get(key)
        return "      -" if value is None else f"{float(value) * 1000:7.1f} ms"

    if v.get("e2e_s") is not None:
        head = "user end of speech -> first agent audio"
    elif stt_s is not None:
        head = "speech recognition start -> first agent audio"
    else:
        head = "request -> first agent audio"
    total = v.get("e2e_s") if v.get("e2e_s") is not None else v.get("first_audio_out_s")
    total_text = "-" if total is None else f"{float(total) * 1000:.1f} ms"
    rtf = v.get("rtf")
    lines = [
        f"turn {metrics.turn_id}: {head}: {total_text}",
        f"  speech recognition   {ms('stt_s')}",
        f"  LLM first token      {ms('llm_ttft_s')}",
        f"  TTS first audio      {ms('tts_ttfa_s')}",
        f"  pipeline overhead    {ms('pipeline_overhead_s')}",
        f"  audio {float(v.get('audio_s') or 0.0):.2f} s in {v.get('frames') or 0} frames"
        + ("" if rtf is None else f", rtf {float(rtf):.2f}")
        + (", interrupted" if v.get("interrupted") else ""),
    ]
    return "\n".join(lines)
