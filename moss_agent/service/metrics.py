"""Prometheus metrics of one speech server, on the official ``prometheus_client``.

Each :class:`ServiceMetrics` owns its own ``CollectorRegistry`` (never the process-global one), so
two apps in one process (tests, two devices) count apart. Handlers call the small methods below;
figures the engine already keeps (ticks, frames, waiting conversations, free slots) are read from it
when ``/metrics`` is scraped, and the tick-time histogram is filled by :meth:`ServiceMetrics.sample_engine`
(the app calls it every second).

Metric names (all prefixed ``moss_``):

- ``conversations_active`` (gauge): conversations holding an engine slot through this server.
- ``conversations_waiting`` (gauge): conversations queued for a free slot (the engine's queue).
- ``engine_slots_free`` / ``engine_healthy`` (gauges), ``engine_ticks_total``,
  ``engine_frames_total``, ``engine_busy_seconds_total``, ``engine_failed_ticks_total`` (counters,
  from the engine's own statistics; ``rate(ticks)`` is ticks/s).
- ``engine_tick_seconds`` (histogram): tick time; the ticks of each sampling window (1 s) share
  that window's mean, since the engine keeps sums, not per-tick times.
- ``first_audio_seconds`` (histogram): request received to first audio byte sent.
- ``chunk_gap_seconds`` (histogram): time between two audio chunks sent on one stream.
- ``rtf`` (histogram): wall time / audio time of a finished stream (below 1: faster than real time).
- ``requests_total{route, status}``, ``rejected_total{reason}``, ``errors_total{kind}`` (counters).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from moss_agent._optional import require

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5, 1.0)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 4.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceMetrics:
    """The server's metrics; ``engine`` (optional) is read at scrape time."""

    def __init__(self, engine: Any = None) -> None:
        prom = require("prometheus_client", "service")
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.active = prom.Gauge(
            "moss_conversations_active",
            "Conversations holding an engine slot through this server",
            registry=registry,
        )
        self.requests = prom.Counter(
            "moss_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.rejections = prom.Counter(
            "moss_rejected", "Requests refused before any work (busy, limits, auth), by reason", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.errors = prom.Counter("moss_errors", "Errors by kind", ["kind"], registry=registry)
        self.first_audio = prom.Histogram(
            "moss_first_audio_seconds", "Request received to its first audio sent", buckets=_LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.chunk_gap = prom.Histogram(
            "moss_chunk_gap_seconds", "Time between two audio chunks sent on one stream", buckets=_LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.rtf = prom.Histogram(
            "moss_rtf",
            "Wall time over audio time of a finished stream",
            buckets=_RTF_BUCKETS,
            registry=registry,
        )
        self.tick_time = prom.Histogram(
            "moss_engine_tick_seconds", "Engine tick time (each 1 s window's mean, per tick)", buckets=_TICK_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.engine = engine
        self._seen_ticks = 0
        self._seen_tick_seconds = 0.0
        if engine is not None:
            registry.register(_EngineCollector(engine, prom))

    # -- what handlers call ---------------------------------------------------------------------

    def conversation_opened(self) -> None:
        self.active.inc()

    def conversation_closed(self) -> None:
        self.active.dec()

    def observe_first_audio(self, seconds: float) -> None:
        self.first_audio.observe(max(0.0, seconds))

    def observe_chunk_gap(self, seconds: float) -> None:
        self.chunk_gap.observe(max(0.0, seconds))

    def observe_rtf(self, wall_s: float, audio_s: float) -> None:
        if audio_s > 0:
            self.rtf.observe(wall_s / audio_s)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    # -- engine sampling ------------------------------------------------------------------------

    def sample_engine(self) -> None:
        """Observe the ticks made since the last call, each at their mean time."""
        stats = getattr(self.engine, "stats", None)
        if stats is None:
            return
        ticks, seconds = int(stats.ticks), float(stats.tick_seconds)
        new, spent = ticks - self._seen_ticks, seconds - self._seen_tick_seconds
        self._seen_ticks, self._seen_tick_seconds = ticks, seconds
        if new <= 0:
            return
        mean = max(0.0, spent / new)
        for _ in range(min(new, 10_000)):  # a bounded loop even after a long pause
            self.tick_time.observe(mean)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return bytes(self._prom.generate_latest(self.registry))

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when absent): for tests and the CLI summary."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else float(got)


class _EngineCollector:
    """Figures the engine keeps itself, read at scrape time."""

    def __init__(self, engine: Any, prom: Any) -> None:
        self.engine = engine
        self.core = require("prometheus_client.core", "service")

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        core, engine = self.core, self.engine
        waiting = core.GaugeMetricFamily("moss_conversations_waiting", "Conversations queued for a free slot")
        waiting.add_metric([], float(getattr(engine, "waiting", 0)))
        yield waiting
        if hasattr(engine, "free_slots"):
            free = core.GaugeMetricFamily("moss_engine_slots_free", "Engine slots free now")
            free.add_metric([], float(engine.free_slots))
            yield free
        healthy = core.GaugeMetricFamily("moss_engine_healthy", "1 while the engine can serve")
        healthy.add_metric([], 1.0 if getattr(engine, "healthy", True) else 0.0)
        yield healthy
        stats = getattr(engine, "stats", None)
        if stats is None:
            return
        for name, field, help_text in (
            ("moss_engine_ticks", "ticks", "Engine ticks (one batched codec frame for every active slot)"),
            ("moss_engine_frames", "frames", "Audio frames generated"),
            ("moss_engine_busy_seconds", "tick_seconds", "Seconds the device spent in ticks"),
            ("moss_engine_failed_ticks", "failed_ticks", "Ticks that failed on the device"),
        ):
            counter = core.CounterMetricFamily(name, help_text)
            counter.add_metric([], float(getattr(stats, field)))
            yield counter
