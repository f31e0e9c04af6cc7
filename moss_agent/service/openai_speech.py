"""OpenAI's speech API on the realtime engine.

- ``POST /v1/audio/speech``: ``model``, ``input``, ``voice``, ``response_format``, ``speed``,
  ``stream_format`` as OpenAI defines them. The audio streams (chunked transfer) as the engine makes
  it, one codec frame (80 ms) at a time, through the output limiter (-1 dBFS ceiling); ``pcm`` is
  16-bit little-endian mono at 24 kHz like OpenAI's. ``speed`` (0.25-4) changes the tempo, not the
  pitch (FFmpeg's atempo, a WSOLA time stretch). ``stream_format: "sse"`` sends
  ``speech.audio.delta`` events (base64 audio in the response format) and one ``speech.audio.done``.
  A ``model`` naming a batch engine (``batch_speech.add_batch_engines``; ``speech-server
  --batch-model``) is generated whole on it, then streamed the same way.
- ``GET /v1/models``: the model names served (batch ones with ``"engine": "batch"``), with the
  formats and voices they take.
- ``POST /v1/audio/voices`` (also ``/v1/voices``): upload a voice (OpenAI's multipart form: ``name``
  and ``audio_sample``; or a raw audio body with ``?name=NAME``); ``GET`` lists voices; ``DELETE
  /v1/audio/voices/{voice_id}`` forgets an uploaded one. With ``SharedVoices`` (the Ray Serve
  replicas) uploads and deletes go through it, and a request naming a voice this server does not
  know yet, and a voice listing, first catch up with it.

Each speech request holds one engine slot from its first byte to its last. A full engine (no free
slot and its waiting queue full) answers 503 with ``Retry-After``; a client that goes away cancels
its handler, which closes the conversation and frees the slot; a slow reader is held by the write,
which waits for the socket, so the engine's backpressure (``max_ahead_s``) pauses its slot.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import time
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web

from moss_agent.audio import StreamResampler, decode_audio_bytes
from moss_agent.engine.stitch import split_text
from moss_agent.errors import (
    AudioError,
    ConfigError,
    EngineError,
    MossError,
    OverloadError,
    SessionClosedError,
)
from moss_agent.limiter import PeakLimiter
from moss_agent.service.app import (
    CONFIG,
    ENGINE,
    METRICS,
    SENT,
    SHARED_VOICES,
    VOICES,
    request_id,
    unready_reason,
)
from moss_agent.service.batch_speech import batch_engines, batch_speech
from moss_agent.service.batch_speech import describe as describe_batch_models
from moss_agent.service.config import ServiceConfig
from moss_agent.service.encoding import (
    FORMATS,
    PyAVEncoder,
    StreamEncoder,
    Tempo,
    available_formats,
    make_encoder,
    tempo_available,
)
from moss_agent.service.http import UNAVAILABLE, ApiError, read_body, read_json
from moss_agent.service.voices import VoiceRegistry, check_name

log = logging.getLogger(__name__)

OUTPUT_RATE = 24000  # OpenAI's pcm is 24 kHz; every format here is sent at it
TURN_CHARS = 200  # text spoken as one turn at most (about 15 s of English): see _stream_speech
STREAM_FORMATS = ("audio", "sse")
_FIELDS = frozenset({"model", "input", "voice", "response_format", "speed", "stream_format", "instructions"})


def add_openai_routes(app: web.Application) -> None:
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_get("/v1/models", models)
    for path in ("/v1/audio/voices", "/v1/voices"):
        app.router.add_get(path, list_voices)
        app.router.add_post(path, upload_voice)
        app.router.add_delete(path + "/{voice_id}", delete_voice)


# -- the request --------------------------------------------------------------------------------


class SpeechRequest:
    """A validated speech request; every check answers as OpenAI would (400 naming the parameter)."""

    def __init__(
        self,
        body: dict[str, Any],
        config: ServiceConfig,
        voices: VoiceRegistry,
        batch_models: tuple[str, ...] = (),
    ) -> None:
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise _bad(
                f"unrecognized request argument supplied: {', '.join(unknown)}",
                unknown[0],
                "unknown_parameter",
            )
        self.model = _required_str(body, "model")
        if self.model not in config.model_names and self.model not in batch_models:
            served = ", ".join((*config.model_names, *batch_models))
            raise ApiError(
                404, f"the model {self.model!r} is not served here; served models: {served}",
                param="model", code="model_not_found",
            )  # fmt: skip
        text = body.get("input")
        if not isinstance(text, str):
            raise _bad("input must be a string: the text to speak", "input", "invalid_type")
        if not text.strip():
            raise _bad("input is empty: give the text to speak", "input", "empty_input")
        if len(text) > config.max_input_chars:
            raise _bad(
                f"input is {len(text)} characters long; at most {config.max_input_chars} are accepted "
                "(split longer text into several requests)", "input", "string_above_max_length",
            )  # fmt: skip
        self.input = text
        self.voice_name, self.voice = _voice(body.get("voice"), voices)
        self.response_format = body.get("response_format", "mp3")
        served = available_formats()
        if self.response_format not in served:
            known = (
                "is not one OpenAI defines"
                if self.response_format not in FORMATS
                else "cannot be encoded here"
            )
            raise _bad(
                f"response_format {self.response_format!r} {known}; this server offers: {', '.join(served)}",
                "response_format", "unsupported_value",
            )  # fmt: skip
        self.stream_format = body.get("stream_format", "audio")
        if self.stream_format not in STREAM_FORMATS:
            raise _bad(f"stream_format must be 'audio' or 'sse', got {self.stream_format!r}", "stream_format",
                       "unsupported_value")  # fmt: skip
        speed = body.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
            raise _bad(f"speed must be a number from 0.25 to 4.0, got {speed!r}", "speed", "invalid_value")
        if speed != 1.0 and not tempo_available():
            raise _bad(
                "this server's FFmpeg has no atempo filter: speed must be 1.0", "speed", "unsupported_value"
            )
        self.speed = float(speed)
        instructions = body.get("instructions")
        if instructions is not None and (not isinstance(instructions, str) or instructions.strip()):
            raise _bad(
                "instructions are not supported: MOSS-TTS-Realtime takes its voice from a reference "
                "recording; register one (POST /v1/audio/voices) and name it in voice",
                "instructions", "unsupported_parameter",
            )  # fmt: skip


def _bad(message: str, param: str | None, code: str) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _bad(f"{name} is required and must be a non-empty string", name, "missing_required_parameter")
    return value


def _voice(value: Any, voices: VoiceRegistry) -> tuple[str, np.ndarray | None]:
    """``voice`` as a name or OpenAI's ``{"id": ...}`` -> (name, reference speech or None)."""
    if isinstance(value, dict) and set(value) == {"id"}:
        value = value["id"]
    if not isinstance(value, str) or not value:
        raise _bad('voice must be a voice name or {"id": NAME}', "voice", "invalid_type")
    entry = voices.lookup(value)
    if entry is None:
        raise ApiError(
            400, f"unknown voice {value!r}; this server has: {', '.join(voices.names())} "
            "(GET /v1/audio/voices lists them; POST /v1/audio/voices uploads one)",
            param="voice", code="voice_not_found",
        )  # fmt: skip
    return entry.name, entry.pcm


async def _catch_up_on_voice(app: web.Application, value: Any) -> None:
    """A voice this server does not know may have been uploaded through another one: sync first."""
    if isinstance(value, dict) and set(value) == {"id"}:
        value = value["id"]
    if isinstance(value, str) and value and app[VOICES].lookup(value) is None:
        await _sync_shared(app)


async def _sync_shared(app: web.Application) -> None:
    """Catch up with the shared voices, if any; an unreachable store leaves this server's view as it is."""
    shared = app.get(SHARED_VOICES)
    if shared is None:
        return
    try:
        await shared.sync()
    except MossError as exc:
        log.warning("the shared voices are unreachable; answering from this server's copy",
                    extra={"error": str(exc)[:300]})  # fmt: skip


# -- POST /v1/audio/speech -----------------------------------------------------------------------


async def speech(request: web.Request) -> web.StreamResponse:
    received = time.monotonic()
    app = request.app
    config, engine, metrics = app[CONFIG], app[ENGINE], app[METRICS]
    body = await read_json(request, config.max_body_bytes)
    await _catch_up_on_voice(app, body.get("voice"))
    batch = batch_engines(app)
    spec = SpeechRequest(body, config, app[VOICES], tuple(batch))
    if spec.model in batch:  # a batch engine (moss_agent.service.batch_speech): made whole, then streamed
        return await batch_speech(request, spec, batch[spec.model], received)
    reason = unready_reason(app)
    if reason is not None:
        metrics.rejected("unready")
        raise ApiError(503, reason, type=UNAVAILABLE, code="engine_unavailable",
                       headers={"Retry-After": str(config.retry_after_s)})  # fmt: skip
    try:
        conversation = await engine.open_conversation(voice_prompt=spec.voice)
    except OverloadError as exc:
        metrics.rejected("busy")
        raise ApiError(503, f"the engine is busy: {exc}", type=UNAVAILABLE, code="engine_busy",
                       headers={"Retry-After": str(config.retry_after_s)}) from None  # fmt: skip
    except (EngineError, SessionClosedError) as exc:
        metrics.error("engine")
        raise ApiError(503, f"the engine cannot serve: {exc}", type=UNAVAILABLE, code="engine_unavailable",
                       headers={"Retry-After": str(config.retry_after_s)}) from None  # fmt: skip
    metrics.conversation_opened()
    try:
        return await _stream_speech(request, spec, conversation, received)
    except MossError as exc:
        metrics.error("engine")
        if getattr(engine, "failure", None) is not None:
            raise ApiError(
                503, f"the engine failed: {exc}", type=UNAVAILABLE, code="engine_unavailable"
            ) from None
        raise ApiError(500, f"speech generation failed: {exc}", code="generation_failed") from None
    finally:
        # Shielded: a second cancellation (server shutdown) must not leave the slot taken.
        await _shielded(_release(conversation))
        metrics.conversation_closed()


async def _release(conversation: Any) -> None:
    """Close the conversation (its open turn ends with it). On a failed engine closing fails too and
    there is no slot left to free: that is logged, not raised over the request's own answer."""
    try:
        await conversation.aclose()
    except MossError as exc:
        log.info("closing a conversation failed", extra={"error": str(exc)[:300]})


async def _shielded(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_release_failure)
        raise


def _log_release_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("releasing a conversation failed", exc_info=task.exception())


class _Output:
    """Engine audio -> resampled, time-stretched (``speed``), limited, encoded bytes. PyAV's work
    (compressed formats, the tempo filter) runs on a worker thread, one chunk at a time in order."""

    def __init__(self, response_format: str, engine_rate: int, speed: float = 1.0) -> None:
        self.encoder: StreamEncoder = make_encoder(response_format, OUTPUT_RATE)
        self.limiter = PeakLimiter(OUTPUT_RATE)
        self.resampler = None if engine_rate == OUTPUT_RATE else StreamResampler(engine_rate, OUTPUT_RATE)
        self.tempo = None if speed == 1.0 else Tempo(speed, OUTPUT_RATE)
        self.offload = isinstance(self.encoder, PyAVEncoder) or self.tempo is not None
        self._pending: concurrent.futures.Future[bytes] | None = None
        self.samples = 0

    async def encode(self, pcm: np.ndarray, *, last: bool = False) -> bytes:
        return await self._run(self._encode_now, pcm, last)

    def _encode_now(self, pcm: np.ndarray, last: bool) -> bytes:
        parts = [pcm]
        if self.resampler is not None:
            parts = [self.resampler.process(pcm), *([self.resampler.flush()] if last else [])]
        if self.tempo is not None:
            parts = [self.tempo.process(part) for part in parts] + ([self.tempo.flush()] if last else [])
        limited = [self.limiter.process(part) for part in parts] + ([self.limiter.flush()] if last else [])
        samples = np.concatenate(limited) if len(limited) > 1 else limited[0]
        self.samples += samples.shape[0]
        data = self.encoder.encode(samples)
        return data + self.encoder.finish() if last else data

    async def _run(self, fn: Any, *args: Any) -> bytes:
        if not self.offload:
            return bytes(fn(*args))
        loop = asyncio.get_running_loop()
        self._pending = concurrent.futures.Future()
        pending = self._pending

        def work() -> None:
            try:
                pending.set_result(fn(*args))
            except BaseException as exc:
                pending.set_exception(exc)

        loop.run_in_executor(None, work)
        return await asyncio.wrap_future(pending)

    def close(self) -> None:
        """Free the encoder once any encode in flight is done (it may outlive a cancelled request)."""
        close = getattr(self.encoder, "close", None)
        if close is None:
            return
        if self._pending is None or self._pending.done():
            close()
        else:
            self._pending.add_done_callback(lambda _future: close())


async def _stream_speech(
    request: web.Request, spec: SpeechRequest, conversation: Any, received: float
) -> web.StreamResponse:
    """Speak ``spec.input`` as consecutive turns of one conversation (pieces of at most TURN_CHARS
    characters, split at sentence ends, as ``moss-agent say`` does: a turn's audio is capped by the
    engine's ``max_frames_per_turn``), sending the audio as one stream."""
    engine, metrics = request.app[ENGINE], request.app[METRICS]
    output = _Output(spec.response_format, engine.sample_rate, spec.speed)
    sse = spec.stream_format == "sse"
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream" if sse else output.encoder.content_type,
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # a reverse proxy must not hold the stream back
    })  # fmt: skip
    response.enable_chunked_encoding()
    frames = 0
    last_sent: float | None = None

    async def send(data: bytes) -> None:
        nonlocal last_sent
        if not data:
            return
        if not response.prepared:
            await response.prepare(request)
        # write() waits while the socket's buffer is full: a slow reader stops this loop, and the
        # engine, whose stream is read no faster, pauses the slot once it is max_ahead_s ahead.
        await response.write(
            _sse("speech.audio.delta", audio=base64.b64encode(data).decode()) if sse else data
        )
        now = time.monotonic()
        if last_sent is None:
            metrics.observe_first_audio(now - received)
        else:
            metrics.observe_chunk_gap(now - last_sent)
        last_sent = now

    async def feed(stream: Any, text: str) -> None:
        await stream.push_text(text)
        await stream.end_input()

    cap = getattr(getattr(request.app[ENGINE], "config", None), "max_frames_per_turn", None)
    try:
        try:
            for turn_id, piece in enumerate(split_text(spec.input, TURN_CHARS), start=1):
                stream = await conversation.start_turn(None, turn_id)
                made = 0
                async with asyncio.TaskGroup() as tasks:  # the text feeder fails the turn if it fails
                    tasks.create_task(
                        feed(stream, piece), name=f"speech-{request_id(request)}-text-{turn_id}"
                    )
                    async for chunk in stream:
                        made += 1
                        await send(await output.encode(chunk.pcm))
                await stream.aclose()
                frames += made
                if made == cap:
                    log.warning("a turn reached the engine's frame cap; the rest of its text was not spoken",
                                extra={"request_id": request_id(request), "turn": turn_id, "frames": made})  # fmt: skip
            await send(await output.encode(np.zeros(0, np.float32), last=True))
        except (ExceptionGroup, MossError, ConnectionError) as exc:
            error = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
            if isinstance(error, ConnectionError):  # the client went away mid-stream
                log.info("client went away", extra={"request_id": request_id(request)})
                return response
            if not isinstance(error, MossError):
                raise error from exc
            if not response.prepared:
                raise error from None
            return await _failed_mid_stream(request, response, error, sse)
    finally:
        output.close()
    audio_s = output.samples / OUTPUT_RATE
    metrics.observe_rtf(time.monotonic() - received, audio_s)
    if not response.prepared:
        await response.prepare(request)
    if sse:
        usage = {
            "input_characters": len(spec.input),
            "output_frames": frames,
            "audio_seconds": round(audio_s, 3),
        }
        await response.write(_sse("speech.audio.done", usage=usage))
    await response.write_eof()
    request[SENT] = response.status
    log.info("speech done", extra={"request_id": request_id(request), "voice": spec.voice_name,
                                   "format": spec.response_format, "frames": frames,
                                   "audio_s": round(audio_s, 3)})  # fmt: skip
    return response


async def _failed_mid_stream(
    request: web.Request, response: web.StreamResponse, error: MossError, sse: bool
) -> web.StreamResponse:
    request.app[METRICS].error("engine" if isinstance(error, EngineError) else "stream")
    log.warning("speech failed mid-stream", extra={"request_id": request_id(request),
                                                   "error": str(error)[:300]})  # fmt: skip
    if not sse:
        # The status left with the first byte: cut the connection, so that the client sees a broken
        # (unterminated) chunked body rather than a short file that looks complete.
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write(_sse("error", error={"message": f"speech generation failed: {error}",
                                              "type": "server_error", "code": "generation_failed"}))  # fmt: skip
    await response.write_eof()
    return response


def _sse(kind: str, **fields: Any) -> bytes:
    return f"data: {json.dumps({'type': kind, **fields}, separators=(',', ':'))}\n\n".encode()


# -- GET /v1/models ------------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    config, engine = request.app[CONFIG], request.app[ENGINE]
    created = int(time.time())
    details = {
        "response_formats": list(available_formats()),
        "stream_formats": list(STREAM_FORMATS),
        "sample_rate": OUTPUT_RATE,
        "voices": request.app[VOICES].names(),
        "max_input_chars": config.max_input_chars,
        "slots": getattr(getattr(engine, "config", None), "num_slots", None),
    }
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "moss-agent",
         "alias_of": None if name == config.model else config.model, **details}
        for name in config.model_names
    ]  # fmt: skip
    data += describe_batch_models(request.app, details)
    return web.json_response({"object": "list", "data": data})


# -- voices --------------------------------------------------------------------------------------


async def list_voices(request: web.Request) -> web.Response:
    await _sync_shared(request.app)
    voices = request.app[VOICES]
    return web.json_response(
        {"object": "list", "data": [e.describe(voices.sample_rate) for e in voices.entries()]}
    )


async def upload_voice(request: web.Request) -> web.Response:
    """OpenAI's multipart form (``name``, ``audio_sample``; ``consent`` and ``type`` accepted), or a
    raw audio body with ``?name=NAME``; at most ``max_voice_bytes`` and ``max_voice_seconds``."""
    config, voices = request.app[CONFIG], request.app[VOICES]
    limit = config.max_voice_bytes
    if request.content_type == "multipart/form-data":
        name, data = await _read_voice_form(request, limit)
    else:
        name = request.query.get("name")
        data = await read_body(request, limit, what="voice sample")
    try:
        name = check_name(name)
    except ConfigError as exc:
        raise _bad(str(exc), "name", "invalid_value") from None
    if not data:
        raise _bad("the voice sample is empty: send an audio file", "audio_sample", "empty_input")
    try:
        pcm = await asyncio.to_thread(decode_audio_bytes, data, voices.sample_rate, name=f"voice sample {name!r}",
                                      max_seconds=config.max_voice_seconds)  # fmt: skip
        shared = request.app.get(SHARED_VOICES)
        if shared is None:
            entry = voices.add(name, pcm, uploaded=True)
        else:
            voices.check_upload(name)
            entry = await shared.publish(name, pcm)
    except AudioError as exc:
        request.app[METRICS].rejected("voice")
        raise _bad(str(exc), "audio_sample", "invalid_audio") from None
    except ConfigError as exc:
        request.app[METRICS].rejected("voice")
        raise _bad(str(exc), "name", "invalid_value") from None
    except EngineError as exc:
        raise _store_unavailable(exc) from None
    log.info("voice uploaded", extra={"request_id": request_id(request), "voice": name,
                                      "seconds": round(pcm.shape[0] / voices.sample_rate, 2)})  # fmt: skip
    return web.json_response(entry.describe(voices.sample_rate))


async def _read_voice_form(request: web.Request, limit: int) -> tuple[str | None, bytes]:
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise ApiError(413, f"the upload is {request.content_length} bytes; at most {limit} of audio are accepted",
                       code="body_too_large")  # fmt: skip
    reader = await request.multipart()
    fields: dict[str, str] = {}
    data = b""
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):  # a nested multipart: not part of this form
            continue
        if part.name == "audio_sample" or part.filename:
            buffer = bytearray()
            while chunk := await part.read_chunk(64 * 1024):
                buffer += chunk
                if len(buffer) > limit:
                    raise ApiError(413, f"the voice sample is larger than {limit} bytes", param="audio_sample",
                                   code="body_too_large")  # fmt: skip
            data = bytes(buffer)
        elif part.name in ("name", "consent", "type"):
            value = (await part.read_chunk(1024)).decode("utf-8", "replace")
            fields[part.name] = value
    kind = fields.get("type", "audio_sample")
    if kind != "audio_sample":
        raise _bad("only voices from an audio sample can be made here (type 'audio_sample')", "type",
                   "unsupported_value")  # fmt: skip
    if not data:
        raise _bad("audio_sample is required: the reference recording of the voice", "audio_sample",
                   "missing_required_parameter")  # fmt: skip
    return fields.get("name"), data


async def delete_voice(request: web.Request) -> web.Response:
    voice_id = request.match_info["voice_id"]
    voices, shared = request.app[VOICES], request.app.get(SHARED_VOICES)
    try:
        removed = voices.remove(voice_id) if shared is None else await shared.unpublish(voice_id)
    except EngineError as exc:
        raise _store_unavailable(exc) from None
    if not removed:
        entry = voices.lookup(voice_id)
        why = "was not uploaded (voices given at start stay)" if entry is not None else "does not exist"
        raise ApiError(404, f"voice {voice_id!r} {why}", param="voice_id", code="voice_not_found")
    return web.json_response({"id": voice_id, "object": "audio.voice.deleted", "deleted": True})


def _store_unavailable(exc: Exception) -> ApiError:
    return ApiError(503, f"the shared voices are unreachable, try again: {exc}", type=UNAVAILABLE,
                    code="voices_unavailable", headers={"Retry-After": "1"})  # fmt: skip
