"""``POST /v1/audio/speech`` on the batch engines (MOSS-TTS Delay / Local) for the ``model`` names
that select them.

A batch engine shares the realtime engine's codec and device thread (``ModelRegistry``); its jobs
run there as low-priority work between realtime ticks, one job at a time in submission order. Its
audio is not incremental: the whole request is generated, then sent as a stream of chunks
(``CHUNK_SECONDS`` each) through the same output path as the realtime model (formats, ``speed``,
the limiter, SSE). The voice's reference speech is cloned as the Delay / Local models do.
A client that goes away while its audio is made stops the job at its next step. At most
``max_pending`` batch requests are made or queued at once; one more is answered 503 (busy) with
``Retry-After``, as a full realtime engine answers.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from moss_agent.errors import ConfigError, MossError
from moss_agent.service.app import CONFIG, METRICS, SENT, request_id
from moss_agent.service.http import UNAVAILABLE, ApiError

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
    from moss_agent.service.openai_speech import OUTPUT_RATE, _Output, _sse

    metrics, models = request.app[METRICS], request.app[BATCH_MODELS]
    item: dict[str, Any] = {"kind": "tts", "text": spec.input}
    if spec.voice is not None:
        item["reference"] = Waveform(spec.voice, engine.sample_rate)
    if models.pending >= models.max_pending:
        metrics.rejected("busy")
        retry = str(request.app[CONFIG].retry_after_s)
        raise ApiError(503, f"the batch models are busy: {models.pending} requests are being made or queued",
                       type=UNAVAILABLE, code="engine_busy", headers={"Retry-After": retry})  # fmt: skip
    models.pending += 1
    try:
        params = None
        if models.min_frames:
            params = dataclasses.replace(engine.default_params("tts"), min_frames=models.min_frames)
        results = await engine.agenerate([item], progress=False, params=params)
    except ConfigError as exc:
        raise ApiError(
            400, f"the model cannot speak this input: {exc}", param="input", code="invalid_value"
        ) from None
    except MossError as exc:
        metrics.error("engine")
        raise ApiError(
            503, f"the batch engine failed: {exc}", type=UNAVAILABLE, code="engine_unavailable"
        ) from None
    finally:
        models.pending -= 1
    pcm = results[0].pcm
    output = _Output(spec.response_format, engine.sample_rate, spec.speed)
    sse = spec.stream_format == "sse"
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream" if sse else output.encoder.content_type,
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })  # fmt: skip
    response.enable_chunked_encoding()
    await response.prepare(request)
    step = max(1, round(CHUNK_SECONDS * engine.sample_rate))
    first = True
    try:
        for start in range(0, max(pcm.shape[0], 1), step):
            last = start + step >= pcm.shape[0]
            data = await output.encode(np.ascontiguousarray(pcm[start : start + step]), last=last)
            if data:
                await response.write(_sse("speech.audio.delta", audio=_b64(data)) if sse else data)
                if first:
                    metrics.observe_first_audio(time.monotonic() - received)
                    first = False
    except ConnectionError:
        return response  # the client went away
    finally:
        output.close()
    audio_s = output.samples / OUTPUT_RATE
    metrics.observe_rtf(time.monotonic() - received, audio_s)
    if sse:
        usage = {"input_characters": len(spec.input), "output_frames": results[0].frames,
                 "audio_seconds": round(audio_s, 3)}  # fmt: skip
        await response.write(_sse("speech.audio.done", usage=usage))
    await response.write_eof()
    request[SENT] = response.status
    log.info(
        "speech done", extra={"request_id": request_id(request), "model": spec.model, "voice": spec.voice_name,
                              "format": spec.response_format, "audio_s": round(audio_s, 3)},
    )  # fmt: skip
    return response


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
