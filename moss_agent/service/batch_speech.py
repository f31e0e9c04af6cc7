"""``POST /v1/audio/speech`` on the batch engines (MOSS-TTS Delay / Local) for the ``model`` names
that select them.

A batch engine shares the realtime engine's codec and device thread (``ModelRegistry``); its jobs
run there as low-priority work between realtime ticks, one job at a time in submission order. Its
audio is not incremental: the whole request is generated, then sent as a stream of chunks
(``CHUNK_SECONDS`` each) through the same output path as the realtime model (formats, ``speed``,
the limiter, SSE). The voice's reference speech is cloned as the Delay / Local models do.
A client that goes away while its audio is made stops the job at its next step. At most
``max_pending`` batch requests are made or queued at once; one more is answered 503 (busy) with
``Retry-After``, as a full realtime engine answers. Batch requests are counted in the
``moss_batch_*`` figures of ``/metrics`` (``metrics.py``: queued for the device, active, queue time,
first audio, duration, errors by kind), labelled by model and apart from the realtime ones.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from moss_agent.errors import ConfigError, MossError
from moss_agent.service.app import CONFIG, METRICS, SENT, request_id
from moss_agent.service.http import UNAVAILABLE, ApiError
from moss_agent.service.metrics import BatchRequestMetrics

log = logging.getLogger(__name__)

CHUNK_SECONDS = 0.2


@dataclass
class BatchModels:
    """The batch engines an app serves, and its bound on batch requests in flight."""

    engines: dict[str, Any]
    max_pending: int = 8
    min_frames: int = 0  # the shortest audio a request may get (the tiny random models may stop at once)
    pending: int = 0


BATCH_MODELS = web.AppKey("moss_batch_models", BatchModels)


def add_batch_engines(
    app: web.Application, engines: Mapping[str, Any], *, max_pending: int = 8, min_frames: int = 0
) -> None:
    """Serve ``engines`` (name -> ``BatchEngine``) under their names in ``/v1/audio/speech`` and
    ``/v1/models``; before the app starts. ``max_pending``: batch requests made or queued at once
    (their jobs run one at a time). ``min_frames``: codec frames every answer has at least (the
    sampling minimum; 0 leaves the model's own end). Closing the engines stays the caller's business."""
    if max_pending < 1:
        raise ConfigError(f"max_pending must be >= 1, got {max_pending}")
    if min_frames < 0:
        raise ConfigError(f"min_frames must be >= 0, got {min_frames}")
    app[BATCH_MODELS] = BatchModels(dict(engines), max_pending, min_frames)
    for name in engines:
        app[METRICS].batch_model(name)


def load_batch_engines(
    models: Sequence[tuple[str, str]], engine: Any, dtype: str | None = None
) -> dict[str, Any]:
    """Load ``models`` ((name, checkpoint folder or hub id; "tiny": the tiny random Delay)) on the
    realtime ``engine``'s device, sharing its codec and device thread. Loads weights: call it off
    the event loop."""
    from moss_agent.engine.batch import BatchEngine
    from moss_agent.models.tts_loading import load_tts
    from moss_agent.options import ensure_tiny_batch_checkpoint

    engines = {}
    for name, path in models:
        folder = ensure_tiny_batch_checkpoint() if path == "tiny" else path
        tts = load_tts(folder, device=engine.codec.device, dtype=dtype)
        engines[name] = BatchEngine(tts, engine.codec, device_thread=engine.device_thread)
    return engines


def batch_engines(app: web.Application) -> dict[str, Any]:
    models = app.get(BATCH_MODELS)
    return models.engines if models is not None else {}


def describe(app: web.Application, details: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``/v1/models`` entries of the batch engines."""
    created = int(time.time())
    return [
        {"id": name, "object": "model", "created": created, "owned_by": "moss-agent", "alias_of": None,
         **details, "engine": "batch", "architecture": getattr(engine.tts, "architecture", None),
         "streaming": "after generation", "slots": None}
        for name, engine in batch_engines(app).items()
    ]  # fmt: skip


async def batch_speech(request: web.Request, spec: Any, engine: Any, received: float) -> web.StreamResponse:
    """Generate ``spec.input`` on ``engine`` whole, then stream it (see the module docstring)."""
    from moss_agent.engine.batch import Waveform

    metrics, models = request.app[METRICS], request.app[BATCH_MODELS]
    item: dict[str, Any] = {"kind": "tts", "text": spec.input}
    if spec.voice is not None:
        item["reference"] = Waveform(spec.voice, engine.sample_rate)
    if models.pending >= models.max_pending:
        metrics.batch_error(spec.model, "busy")
        retry = str(request.app[CONFIG].retry_after_s)
        raise ApiError(503, f"the batch models are busy: {models.pending} requests are being made or queued",
                       type=UNAVAILABLE, code="engine_busy", headers={"Retry-After": retry})  # fmt: skip
    tracked = metrics.batch_request(spec.model, received)
    try:
        return await _generate_and_send(request, spec, engine, item, tracked)
    except (asyncio.CancelledError, ConnectionError):
        tracked.failed("client_gone")
        raise
    except BaseException:
        if tracked.failure is None:
            tracked.failed("internal")
        raise
    finally:
        if request.get(SENT) is None and tracked.failure is None:  # it returned without its last byte
            tracked.failed("client_gone")
        tracked.close()


async def _generate_and_send(
    request: web.Request, spec: Any, engine: Any, item: dict[str, Any], tracked: BatchRequestMetrics
) -> web.StreamResponse:
    from moss_agent.service.openai_speech import OUTPUT_RATE, _Output, _sse

    models = request.app[BATCH_MODELS]
    loop = asyncio.get_running_loop()
    models.pending += 1
    try:
        params = None
        if models.min_frames:
            params = dataclasses.replace(engine.default_params("tts"), min_frames=models.min_frames)
        results = await engine.agenerate(
            [item], progress=False, params=params, on_start=lambda: loop.call_soon_threadsafe(tracked.started)
        )
    except ConfigError as exc:
        tracked.failed("input")
        raise ApiError(
            400, f"the model cannot speak this input: {exc}", param="input", code="invalid_value"
        ) from None
    except MossError as exc:
        tracked.failed("engine")
        raise ApiError(
            503, f"the batch engine failed: {exc}", type=UNAVAILABLE, code="engine_unavailable"
        ) from None
    finally:
        models.pending -= 1
    tracked.started()  # already, unless the job's own call is still on its way to the loop
    pcm = results[0].pcm
    output = _Output(spec.response_format, engine.sample_rate, spec.speed)
    sse = spec.stream_format == "sse"
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream" if sse else output.encoder.content_type,
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })  # fmt: skip
    response.enable_chunked_encoding()
    step = max(1, round(CHUNK_SECONDS * engine.sample_rate))
    first = True
    try:
        await response.prepare(request)
        for start in range(0, max(pcm.shape[0], 1), step):
            last = start + step >= pcm.shape[0]
            data = await output.encode(np.ascontiguousarray(pcm[start : start + step]), last=last)
            if data:
                await response.write(_sse("speech.audio.delta", audio=_b64(data)) if sse else data)
                if first:
                    tracked.first_audio()
                    first = False
        audio_s = output.samples / OUTPUT_RATE
        if sse:
            usage = {"input_characters": len(spec.input), "output_frames": results[0].frames,
                     "audio_seconds": round(audio_s, 3)}  # fmt: skip
            await response.write(_sse("speech.audio.done", usage=usage))
        await response.write_eof()
    except ConnectionError:
        log.info("client went away", extra={"request_id": request_id(request)})
        return response
    finally:
        output.close()
    request[SENT] = response.status
    tracked.answered(audio_s)
    log.info(
        "speech done", extra={"request_id": request_id(request), "model": spec.model, "voice": spec.voice_name,
                              "format": spec.response_format, "audio_s": round(audio_s, 3)},
    )  # fmt: skip
    return response


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
