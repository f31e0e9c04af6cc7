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

The figures above are the realtime engine's. Batch requests (``/v1/audio/speech`` on a
``--batch-model`` model, ``batch_speech.py``) have their own, labelled by ``model`` (every batch
model is listed at 0 from the start):

- ``batch_requests_queued{model}`` (gauge): batch requests waiting for the device (their job is
  queued behind another batch job; the device runs one at a time).
- ``batch_requests_active{model}`` (gauge): batch requests whose job runs on the device, or whose
  audio is being sent.
- ``batch_queue_seconds{model}`` (histogram): request received to its job starting on the device.
- ``batch_first_audio_seconds{model}`` (histogram): request received to its first audio byte sent.
- ``batch_request_seconds{model}`` (histogram): request received to its last byte sent, for the
  requests answered in full.
- ``batch_audio_seconds_total{model}`` (counter): audio sent by batch requests answered in full.
- ``batch_errors_total{model, kind}`` (counter): ``busy`` (refused: too many batch requests made
  or queued), ``input`` (the model cannot speak the input), ``engine`` (the job failed),
  ``client_gone`` (the client left before the end), ``internal`` (a bug; see the log).

Batch requests are in none of the realtime figures, only in ``requests_total`` (every HTTP request).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from moss_agent._optional import require

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5, 1.0)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 4.0)
# A batch request is generated whole before its first byte: seconds to minutes.
_BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

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
        self.batch_queued = prom.Gauge(
            "moss_batch_requests_queued", "Batch speech requests waiting for the device, by model", ["model"],
            registry=registry,
        )  # fmt: skip
        self.batch_active = prom.Gauge(
            "moss_batch_requests_active",
            "Batch speech requests generating on the device or sending their audio, by model",
            ["model"],
            registry=registry,
        )
        self.batch_queue_time = prom.Histogram(
            "moss_batch_queue_seconds", "Batch request received to its job starting on the device", ["model"],
            buckets=_BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_first_audio = prom.Histogram(
            "moss_batch_first_audio_seconds", "Batch request received to its first audio sent", ["model"],
            buckets=_BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_duration = prom.Histogram(
            "moss_batch_request_seconds", "Batch request received to its last byte sent (answered in full)",
            ["model"], buckets=_BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_audio = prom.Counter(
            "moss_batch_audio_seconds", "Audio sent by batch requests answered in full", ["model"],
            registry=registry,
        )  # fmt: skip
        self.batch_errors = prom.Counter(
            "moss_batch_errors", "Batch requests refused or failed, by model and kind", ["model", "kind"],
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

    def batch_model(self, model: str) -> None:
        """List ``model`` at 0 in the batch figures before its first request."""
        for metric in (self.batch_queued, self.batch_active, self.batch_queue_time, self.batch_first_audio,
                       self.batch_duration, self.batch_audio):  # fmt: skip
            metric.labels(model=model)

    def batch_error(self, model: str, kind: str) -> None:
        self.batch_errors.labels(model=model, kind=kind).inc()

    def batch_request(self, model: str, received: float) -> BatchRequestMetrics:
        """A batch request on ``model`` received at ``received`` (``time.monotonic()``), queued from now."""
        return BatchRequestMetrics(self, model, received)

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


class BatchRequestMetrics:
    """One batch request through the batch figures: queued, then active (``started``), then gone
    (``close``, whatever happened; idempotent). Event-loop only."""

    def __init__(self, metrics: ServiceMetrics, model: str, received: float) -> None:
        self.metrics, self.model, self.received = metrics, model, received
        self.state = "queued"
        self.failure: str | None = None  # the kind it failed with, once it did
        metrics.batch_queued.labels(model=model).inc()

    def started(self) -> None:
        """Its job began on the device."""
        if self.state != "queued":  # closed meanwhile (the job started as its client left)
            return
        self.state = "active"
        m = self.metrics
        m.batch_queued.labels(model=self.model).dec()
        m.batch_active.labels(model=self.model).inc()
        m.batch_queue_time.labels(model=self.model).observe(max(0.0, time.monotonic() - self.received))

    def first_audio(self) -> None:
        self.metrics.batch_first_audio.labels(model=self.model).observe(
            max(0.0, time.monotonic() - self.received)
        )

    def failed(self, kind: str) -> None:
        """Count it as failed with ``kind`` (once: a later call is ignored)."""
        if self.failure is None:
            self.failure = kind
            self.metrics.batch_error(self.model, kind)

    def answered(self, audio_s: float) -> None:
        """Its last byte left."""
        m = self.metrics
        m.batch_duration.labels(model=self.model).observe(max(0.0, time.monotonic() - self.received))
        m.batch_audio.labels(model=self.model).inc(audio_s)

    def close(self) -> None:
        if self.state == "queued":
            self.metrics.batch_queued.labels(model=self.model).dec()
        elif self.state == "active":
            self.metrics.batch_active.labels(model=self.model).dec()
        self.state = "closed"


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
