"""The speech session WebSocket: conversations on the engine, with text streamed into each turn.

``docs/speech-protocol.md`` is the protocol's reference; ``moss_agent.speech_protocol`` its shared
constants. Each socket carries up to ``max_conversations_per_socket`` conversations, each an engine
slot, and maps every message onto the ``SpeechBackend`` contract of ``moss_agent.streaming.tts``:

- Requests carry an ``id`` and get exactly one reply with it (or an ``error`` with it).
- Per conversation, ``turn.start``, ``text`` and ``end_input`` run in order on one task: a ``text``
  is acknowledged when the engine's ``push_text`` returned, so the client's producer is paced by
  speech as in-process. ``interrupt`` and ``close`` run at once, never behind text.
- Audio leaves as binary frames, one per codec frame, only while the client holds credit for the
  turn: the engine's stream is read no faster than the client reads, so a slow reader holds its
  slot (the engine's ``max_ahead_s``) and nothing queues without bound.
- Everything untrusted is checked: JSON through ``moss_agent.wire``, message size (aiohttp closes
  with 1009), a message rate per socket (close 1008), conversations and uploads per socket, queued
  text per conversation; a full server refuses a socket with close code 1013.
- A client that vanishes frees its slots at once when its socket resets, and within
  ``1.5 * heartbeat_s`` when it just goes silent (the ping gets no pong).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
from aiohttp import WSMsgType, web

from moss_agent import speech_protocol as sp
from moss_agent.errors import ConfigError, MossError, OverloadError, SessionClosedError, TransportError
from moss_agent.events import FloatArray
from moss_agent.opus import DEFAULT_BITRATE, OpusFrameEncoder
from moss_agent.service.app import request_id
from moss_agent.service.session_history import OpenUpload, read_audio_part, read_turns
from moss_agent.streaming.tts import PastTurn, SpeechBackend, UserTurn
from moss_agent.streaming.word_timing import WordTimer, WordTiming
from moss_agent.wire import decode_json_object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    """What one socket may do; the defaults suit a bot process that multiplexes its calls."""

    max_sockets: int = 256  # sockets served at once; one more is closed with 1013
    max_conversations_per_socket: int = 16
    max_message_bytes: int = 1 << 20  # any one message, text or binary (aiohttp closes with 1009)
    max_json_bytes: int = 64 * 1024
    max_text_chars: int = 16384  # one text delta, a system prompt, a user transcript
    # Sustained message rate (token bucket) per open conversation, at least one's worth per socket:
    # an LLM streams up to ~100 tokens/s, so one socket of 16 calls may send 16 times as much.
    # Beyond it the socket is closed with 1008.
    messages_per_s: float = 200.0
    message_burst: int = 400
    max_upload_s: float = 120.0  # one upload of audio (a user turn or a voice prompt)
    max_uploads: int = 4  # uploads in progress per socket
    max_history_turns: int = 64  # earlier turns an open may carry (session_history)
    max_history_audio_s: float = 180.0  # their audio together (the engine's context is the real bound)
    max_queued_chars: int = 65536  # text received for a conversation that its engine stream has not taken
    max_audio_window: int = 256  # credit a client may hold per turn, in frames
    heartbeat_s: float = 0.5
    open_wait_s: float = 0.0  # how long an open may wait for a slot; 0: "busy" at once when none is free
    retry_after_s: float = 1.0  # suggested in "busy" errors

    def __post_init__(self) -> None:
        for name in ("max_sockets", "max_conversations_per_socket", "max_json_bytes", "max_text_chars",
                     "message_burst", "max_uploads", "max_queued_chars", "max_audio_window",
                     "max_history_turns"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"SessionLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.messages_per_s > 0 and self.heartbeat_s > 0 and self.max_upload_s > 0
                and self.max_history_audio_s > 0):  # fmt: skip
            raise ConfigError("SessionLimits rates and times must be > 0")
        if self.open_wait_s < 0:
            raise ConfigError(f"SessionLimits.open_wait_s must be >= 0, got {self.open_wait_s}")


class _NoMetrics:
    """Stands in for the service's metrics when there are none (a bare app, a test)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class SessionServer:
    """Serves the protocol on ``engine``; ``voices`` maps names to reference speech (float32 mono
    at the engine's rate, or ``(pcm, sample_rate)``)."""

    def __init__(
        self,
        engine: SpeechBackend,
        *,
        limits: SessionLimits | None = None,
        voices: Mapping[str, Any] | None = None,
        metrics: Any = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or SessionLimits()
        self.voices = voices if voices is not None else {}
        self.metrics = metrics if metrics is not None else _NoMetrics()
        self.sockets: set[_Socket] = set()
        self.sample_rate = engine.sample_rate
        self.frame_s = float(getattr(engine, "frame_s", 0.08))

    @property
    def conversations(self) -> int:
        return sum(len(sock.conversations) for sock in self.sockets)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        limits = self.limits
        if len(self.sockets) >= limits.max_sockets:
            self.metrics.rejected("sockets")
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close(
                code=sp.CLOSE_BUSY, message=f"busy: {limits.max_sockets} sockets are open".encode()
            )
            return ws
        ws = web.WebSocketResponse(
            heartbeat=limits.heartbeat_s, max_msg_size=limits.max_message_bytes, compress=False
        )
        await ws.prepare(request)
        sock = _Socket(self, ws, request_id(request))
        self.sockets.add(sock)
        try:
            await sock.run()
        finally:
            self.sockets.discard(sock)
        return ws

    async def shutdown(self, app: web.Application | None = None) -> None:
        for sock in list(self.sockets):
            await sock.ws.close(code=sp.CLOSE_GOING_AWAY, message=b"the server is shutting down")

    def voice_names(self) -> list[str]:
        names = getattr(self.voices, "names", None)  # a VoiceRegistry also lists "default" (no reference)
        return sorted(names() if names is not None else self.voices)

    def voice(self, name: str) -> FloatArray | None:
        """The reference speech of a registered voice (None: the model's own voice)."""
        lookup = getattr(self.voices, "lookup", None)  # a VoiceRegistry: its entries are at the engine's rate
        if lookup is not None:
            found = lookup(name)
            if found is not None:
                return found.pcm  # type: ignore[no-any-return]
        elif name in self.voices:
            entry = self.voices[name]
            pcm, rate = entry if isinstance(entry, tuple) else (entry, self.sample_rate)
            return _at_rate(np.asarray(pcm, dtype=np.float32), rate, self.sample_rate)
        known = ", ".join(self.voice_names()) or "none"
        raise ConfigError(f"unknown voice {name!r}; this server has: {known}")


_NEEDS_ID = frozenset({"open", "turn.start", "interrupt", "close"})

SESSION_SERVER = web.AppKey("moss_session_server", SessionServer)


def add_session_routes(
    app: web.Application,
    engine: SpeechBackend | None = None,
    *,
    limits: SessionLimits | None = None,
    voices: Mapping[str, Any] | None = None,
    metrics: Any = None,
    path: str = sp.PATH,
) -> SessionServer:
    """Serve the session protocol at ``path`` on ``app``. Without arguments the engine, voices and
    metrics come from the service app's keys (``moss_agent.service.app``)."""
    if engine is None:
        from moss_agent.service import app as service_app

        engine = cast(SpeechBackend, app[service_app.ENGINE])
        voices = voices if voices is not None else app.get(service_app.VOICES)
        metrics = metrics if metrics is not None else app.get(service_app.METRICS)
        if limits is None:
            limits = SessionLimits(retry_after_s=float(app[service_app.CONFIG].retry_after_s))
    assert engine is not None
    server = SessionServer(engine, limits=limits, voices=voices, metrics=metrics)
    app[SESSION_SERVER] = server
    app.router.add_get(path, server.handle)
    app.on_shutdown.append(server.shutdown)
    return server


def _too_many(message: str) -> OverloadError:
    """A per-socket limit was reached (error code "too_many", not the engine's "busy")."""
    error = OverloadError(message)
    error.protocol_code = "too_many"  # type: ignore[attr-defined]
    return error


def _at_rate(pcm: FloatArray, rate: int, target: int) -> FloatArray:
    if rate == target:
        return pcm
    from moss_agent.audio import resample

    return resample(pcm, rate, target)


class _Bucket:
    """A token bucket: ``take(scale)`` is False once the sender is over ``scale`` times the sustained
    rate and burst."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self, scale: int = 1) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst * scale, self.tokens + (now - self.at) * self.rate * scale)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class _Upload:
    """Audio a request declared, arriving in binary chunks; ``then`` gets it, ``failed`` runs if it never does."""

    rid: int
    samples: int
    sample_rate: int
    encoding: str
    then: Callable[[_Rated | None], None]
    failed: Callable[[], None]
    data: bytearray = field(default_factory=bytearray)
    chunks: int = 0


@dataclass
class _Turn:
    serial: int
    stream: Any  # SpeechStream
    received_at: float
    words: WordTimer  # when each word is spoken: sent as ``words`` messages
    credit: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    settling: bool = False
    sender: asyncio.Task[None] | None = None


@dataclass
class _Conversation:
    cid: int
    engine: Any  # Conversation
    encoding: str
    opus_bitrate: int = DEFAULT_BITRATE  # bit/s of its agent audio, when the encoding is opus
    ops: deque[tuple[str, int, Any]] = field(default_factory=deque)  # (kind, request id, argument)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    queued_chars: int = 0
    turns: dict[int, _Turn] = field(default_factory=dict)  # the current turn and the one before it
    last_serial: int = 0  # the latest turn.start received
    worker_serial: int = 0  # the latest turn.start the worker began
    cancelled: dict[int, tuple[int, float | None]] = field(
        default_factory=dict
    )  # interrupts of unstarted turns
    worker: asyncio.Task[None] | None = None


class _Socket:
    """One client connection: its conversations, uploads and tasks; everything ends with it."""

    def __init__(self, server: SessionServer, ws: web.WebSocketResponse, request_id: str) -> None:
        self.server = server
        self.ws = ws
        self.limits = server.limits
        self.log_extra = {"request_id": request_id}
        self.conversations: dict[int, _Conversation] = {}
        self.opening = 0
        self.uploads: dict[int, _Upload] = {}
        self.bucket = _Bucket(self.limits.messages_per_s, self.limits.message_burst)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.next_cid = 1
        self.closing = False
        self._tg: asyncio.TaskGroup | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self.send({
                    "type": "hello", "protocol": sp.PROTOCOL, "sample_rate": self.server.sample_rate,
                    "frame_s": self.server.frame_s, "encodings": sp.encodings_available(),
                    "voices": self.server.voice_names(), "limits": self._advertised_limits(),
                })  # fmt: skip
                await self._read()
                self.closing = True
                for task in list(self.tasks):
                    task.cancel()
        finally:
            self.closing = True
            # shielded: a handler cancelled again (server shutdown) still frees every slot
            await asyncio.shield(self._release_all())

    def _advertised_limits(self) -> dict[str, Any]:
        lim = self.limits
        return {
            "max_conversations": lim.max_conversations_per_socket, "max_message_bytes": lim.max_message_bytes,
            "max_json_bytes": lim.max_json_bytes, "max_text_chars": lim.max_text_chars,
            "messages_per_s": lim.messages_per_s, "max_upload_s": lim.max_upload_s,
            "max_history_turns": lim.max_history_turns, "max_history_audio_s": lim.max_history_audio_s,
            "max_queued_chars": lim.max_queued_chars, "max_audio_window": lim.max_audio_window,
        }  # fmt: skip

    async def _release_all(self) -> None:
        """Free every slot of this socket (the client closed, vanished or broke the rules)."""
        conversations = list(self.conversations.values())
        self.conversations.clear()
        for conv in conversations:
            await self._free(conv)
        self.uploads.clear()

    async def _free(self, conv: _Conversation) -> None:
        tasks = [t for t in (conv.worker, *(turn.sender for turn in conv.turns.values())) if t is not None]
        for task in tasks:
            task.cancel()
        try:
            await conv.engine.aclose()
        except Exception:
            log.warning("closing a conversation failed", extra=self.log_extra, exc_info=True)
        self.server.metrics.conversation_closed()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        assert self._tg is not None
        task = self._tg.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # the peer is gone: the reader ends
            await self.ws.send_str(json.dumps(message, separators=(",", ":")))

    async def reply_error(self, rid: int | None, exc: BaseException, **fields: Any) -> None:
        code = sp.error_code(exc)
        if code == "internal":
            log.error("session request failed", extra=self.log_extra, exc_info=exc)
            message = f"internal error ({type(exc).__name__}); the server logged it"
        else:
            message = str(exc)
        if code == "busy":
            fields.setdefault("retry_after_s", self.limits.retry_after_s)
            self.server.metrics.rejected("busy")
        elif code in ("engine", "internal"):
            self.server.metrics.error(code)
        await self.send({"type": "error", "id": rid, "code": code, "message": message, **fields})

    # -- reading ---------------------------------------------------------------------------------

    async def _read(self) -> None:
        async for msg in self.ws:
            scale = max(1, len(self.conversations))
            if not self.bucket.take(scale):
                self.server.metrics.rejected("rate")
                limit = f"over {self.limits.messages_per_s * scale:g} messages/s"
                await self.ws.close(code=sp.CLOSE_POLICY, message=limit.encode())
                return
            if msg.type == WSMsgType.TEXT:
                await self._on_json(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self._on_binary(msg.data)
            else:  # ERROR: aiohttp closed the socket (a message over max_message_bytes, a lost peer)
                return

    async def _on_json(self, data: str) -> None:
        rid = None
        try:
            message = decode_json_object(data, what="session message", max_bytes=self.limits.max_json_bytes)
            rid = sp.field_int(message, "id", optional=True, high=2**53)
            kind = message.get("type")
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise TransportError(f"unknown message type {kind!r}")
            if rid is None and kind in _NEEDS_ID:
                raise TransportError(f"a {kind!r} request needs an 'id' (its reply carries it)")
            await handler(self, rid, message)
        except MossError as exc:
            await self.reply_error(rid, exc)

    async def _on_binary(self, data: bytes) -> None:
        try:
            frame = sp.unpack_frame(data)
            if frame.kind != sp.KIND_UPLOAD:
                raise TransportError(f"a client sends binary frames of kind {sp.KIND_UPLOAD} (upload) only")
            upload = self.uploads.get(frame.a)
            if upload is None:
                raise SessionClosedError(f"no upload in progress for request {frame.a}")
        except MossError as exc:
            await self.reply_error(None, exc)
            return
        try:
            if frame.encoding != upload.encoding or frame.b != upload.chunks:
                raise TransportError(
                    f"upload {upload.rid}: expected chunk {upload.chunks} in {upload.encoding}"
                )
            upload.data += frame.payload
            upload.chunks += 1
            if len(upload.data) > upload.samples * sp.sample_bytes(upload.encoding):
                raise ConfigError(
                    f"upload {upload.rid} sent more than the {upload.samples} samples it declared"
                )
        except MossError as exc:
            del self.uploads[upload.rid]
            upload.failed()
            await self.reply_error(upload.rid, exc)
            return
        if len(upload.data) == upload.samples * sp.sample_bytes(upload.encoding):
            del self.uploads[upload.rid]
            upload.then(_Rated(sp.decode_pcm(bytes(upload.data), upload.encoding), upload.sample_rate))

    def _expect_audio(
        self, rid: int, spec: Any, encoding: str, then: Callable[[_Rated | None], None],
        failed: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        """Run ``then(audio)`` once the audio ``spec`` declares has arrived (at once without audio)."""
        if spec is None:
            then(None)
            return
        if isinstance(spec, OpenUpload):  # an open's voice and turn audio: one upload, parts checked when read
            rate, samples = 0, spec.samples
        else:
            rate = sp.field_int(spec, "sample_rate", low=8000, high=192000)
            samples = sp.field_int(spec, "samples")
            if samples > self.limits.max_upload_s * rate:
                raise ConfigError(
                    f"audio of {samples / rate:.1f} s; at most {self.limits.max_upload_s:g} s are accepted"
                )
        if samples == 0:
            then(None)
            return
        if rid in self.uploads:
            raise TransportError(f"request id {rid} already has an upload in progress")
        if len(self.uploads) >= self.limits.max_uploads:
            raise _too_many(f"at most {self.limits.max_uploads} uploads may be in progress on one socket")
        self.uploads[rid] = _Upload(rid, samples, rate, encoding, then, failed)

    # -- requests --------------------------------------------------------------------------------

    async def _open(self, rid: int, message: dict[str, Any]) -> None:
        lim = self.limits
        if len(self.conversations) + self.opening >= lim.max_conversations_per_socket:
            raise _too_many(
                f"this socket already has {lim.max_conversations_per_socket} conversations; close one or open another socket"
            )
        system_prompt = sp.field_str(message, "system_prompt", optional=True, max_chars=lim.max_text_chars)
        voice = sp.field_str(message, "voice", optional=True, max_chars=200)
        encoding = sp.field_encoding(message)
        bitrate = sp.field_opus_bitrate(message, encoding, self.server.sample_rate, self.server.frame_s)
        spec = sp.field_object(message, "voice_audio")
        if voice is not None and spec is not None:
            raise TransportError("give 'voice' (a registered name) or 'voice_audio', not both")
        voice_pcm = self.server.voice(voice) if voice is not None else None
        turns = read_turns(message, lim)
        upload = OpenUpload(read_audio_part(spec, lim.max_upload_s, "voice_audio"), turns) if turns else spec
        self.opening += 1

        def uploaded(audio: _Rated | None) -> None:
            history: list[PastTurn] = []
            if isinstance(upload, OpenUpload):
                voice_part, history = upload.split(None if audio is None else audio.pcm)
                audio = None if voice_part is None else _Rated(*voice_part)
            pcm = voice_pcm if audio is None else _at_rate(audio.pcm, audio.rate, self.server.sample_rate)
            opening = self._open_conversation(rid, system_prompt, pcm, encoding, bitrate, history)
            self.spawn(opening, f"session-open-{rid}")

        def failed() -> None:
            self.opening -= 1

        try:
            self._expect_audio(rid, upload, sp.upload_encoding(encoding), uploaded, failed)
        except BaseException:
            failed()
            raise

    async def _open_conversation(
        self, rid: int, system_prompt: str | None, voice: FloatArray | None, encoding: str, opus_bitrate: int,
        history: list[PastTurn],
    ) -> None:  # fmt: skip
        engine, lim = self.server.engine, self.limits
        try:
            if lim.open_wait_s == 0 and getattr(engine, "free_slots", 1) == 0:
                raise OverloadError("every engine slot is busy; retry later")
            try:
                async with asyncio.timeout(lim.open_wait_s or None):
                    conversation = await engine.open_conversation(
                        system_prompt=system_prompt, voice_prompt=voice, **({"history": history} if history else {})
                    )
            except TimeoutError:
                raise OverloadError(
                    f"no engine slot came free within {lim.open_wait_s:g} s; retry later"
                ) from None
        except Exception as exc:
            self.opening -= 1
            await self.reply_error(rid, exc)
            return
        self.opening -= 1
        self.server.metrics.conversation_opened()
        cid = self.next_cid
        self.next_cid += 1
        conv = _Conversation(cid, conversation, encoding, opus_bitrate)
        if self.closing:
            await self._free(conv)
            return
        self.conversations[cid] = conv
        conv.worker = self.spawn(self._work(conv), f"session-conv{cid}")
        opus = {"opus_bitrate": opus_bitrate} if encoding == "opus" else {}
        await self.send({"type": "opened", "id": rid, "conversation": cid, "sample_rate": self.server.sample_rate,
                         "frame_s": self.server.frame_s, "encoding": encoding, **opus})  # fmt: skip

    def _conversation(self, message: dict[str, Any]) -> _Conversation:
        cid = sp.field_int(message, "conversation")
        conv = self.conversations.get(cid)
        if conv is None:
            raise SessionClosedError(f"conversation {cid} is not open on this socket")
        return conv

    def _enqueue(self, conv: _Conversation, kind: str, rid: int | None, arg: Any, chars: int = 0) -> None:
        if (
            conv.queued_chars + chars > self.limits.max_queued_chars
            or len(conv.ops) >= self.limits.max_queued_chars
        ):
            raise _too_many(
                f"conversation {conv.cid} holds {conv.queued_chars} characters of text its turn has not taken; "
                "wait for the acknowledgements before sending more"
            )
        conv.queued_chars += chars
        conv.ops.append((kind, -1 if rid is None else rid, arg))
        conv.ready.set()

    async def _turn_start(self, rid: int, message: dict[str, Any]) -> None:
        conv = self._conversation(message)
        serial = sp.field_int(message, "turn", low=1)
        if serial <= conv.last_serial:
            raise TransportError(
                f"turn {serial} is not above the conversation's last turn ({conv.last_serial})"
            )
        window = sp.field_int(message, "window", low=1, high=self.limits.max_audio_window)
        user = sp.field_object(message, "user")
        text, spec = "", None
        if user is not None:
            text = sp.field_str(user, "text", max_chars=self.limits.max_text_chars)
            spec = sp.field_object(user, "audio")
        if conv.queued_chars + len(text) > self.limits.max_queued_chars:
            raise _too_many(f"conversation {conv.cid} holds too much text its turns have not taken")
        conv.last_serial = serial
        received_at = time.perf_counter()

        def uploaded(audio: _Rated | None) -> None:
            if user is None:
                turn_user = None
            elif audio is None:
                turn_user = UserTurn(text)
            else:
                turn_user = UserTurn(text, audio.pcm, audio.rate)
            conv.queued_chars += len(text)
            conv.ops.append(("start", rid, (serial, window, turn_user, received_at)))
            conv.ready.set()

        self._expect_audio(rid, spec, sp.upload_encoding(conv.encoding), uploaded)

    async def _text(self, rid: int | None, message: dict[str, Any]) -> None:
        conv = self._conversation(message)
        serial = sp.field_int(message, "turn", low=1)
        delta = sp.field_str(message, "delta", max_chars=self.limits.max_text_chars)
        self._enqueue(conv, "text", rid, (serial, delta), len(delta))

    async def _end_input(self, rid: int | None, message: dict[str, Any]) -> None:
        conv = self._conversation(message)
        self._enqueue(conv, "end", rid, sp.field_int(message, "turn", low=1))

    async def _credit(self, rid: int | None, message: dict[str, Any]) -> None:
        conv = self._conversation(message)
        turn = conv.turns.get(sp.field_int(message, "turn", low=1))
        frames = sp.field_int(message, "frames", low=1, high=self.limits.max_audio_window)
        if turn is None:
            return  # credit for a turn that already ended: harmless
        if turn.credit + frames > self.limits.max_audio_window:
            raise TransportError(f"credit over max_audio_window ({self.limits.max_audio_window} frames)")
        turn.credit += frames
        turn.wake.set()

    async def _interrupt(self, rid: int, message: dict[str, Any]) -> None:
        conv = self._conversation(message)
        serial = sp.field_int(message, "turn", low=1)
        heard_s = sp.field_float(message, "heard_s", optional=True)
        turn = conv.turns.get(serial)
        if turn is not None:
            self.spawn(self._settle(conv, turn, rid, heard_s), f"session-conv{conv.cid}-settle{serial}")
        elif conv.worker_serial <= serial <= conv.last_serial and serial not in conv.cancelled:
            # its turn.start is queued or running (a client that gave up waiting for it): the worker
            # settles it in order, before anything sent after this
            conv.cancelled[serial] = (rid, heard_s)
        else:
            raise SessionClosedError(f"turn {serial} is not open on conversation {conv.cid}")

    async def _settle(self, conv: _Conversation, turn: _Turn, rid: int, heard_s: float | None) -> None:
        turn.settling = True
        turn.wake.set()
        try:
            heard = await turn.stream.interrupt(heard_s)
        except Exception as exc:
            await self.reply_error(rid, exc)
            return
        # the words the listener heard: timed to end by the cut, within the text the kept frames covered
        words = turn.words.heard_words(
            heard.audio_s if heard_s is None else heard_s, within=heard.text
        )
        await self.send({"type": "heard", "id": rid, "conversation": conv.cid, "turn": turn.serial,
                         "frames": heard.frames, "text": heard.text, "audio_s": heard.audio_s,
                         "words": _words_json(words)})  # fmt: skip

    async def _close(self, rid: int, message: dict[str, Any]) -> None:
        conv = self._conversation(message)
        del self.conversations[conv.cid]
        self.spawn(self._close_conversation(conv, rid), f"session-close{conv.cid}")

    async def _close_conversation(self, conv: _Conversation, rid: int) -> None:
        await self._free(conv)
        await self.send({"type": "closed", "id": rid, "conversation": conv.cid})

    async def _ping(self, rid: int | None, message: dict[str, Any]) -> None:
        await self.send({"type": "pong", "id": rid})

    _handlers: ClassVar[dict[str, Callable[..., Any]]] = {
        "open": _open, "turn.start": _turn_start, "text": _text, "end_input": _end_input,
        "credit": _credit, "interrupt": _interrupt, "close": _close, "ping": _ping,
    }  # fmt: skip

    # -- one conversation's ordered work ---------------------------------------------------------

    async def _work(self, conv: _Conversation) -> None:
        while True:
            while not conv.ops:
                conv.ready.clear()
                await conv.ready.wait()
            kind, rid, arg = conv.ops.popleft()
            try:
                if kind == "start":
                    conv.queued_chars -= len(arg[2].text) if arg[2] is not None else 0
                    await self._start_unless_cancelled(conv, rid, *arg)
                elif kind == "text":
                    serial, delta = arg
                    conv.queued_chars -= len(delta)
                    dropped = await self._push(conv, serial, delta)
                    if rid >= 0:
                        await self.send({"type": "ack", "id": rid, **({"dropped": True} if dropped else {})})
                else:
                    turn = self._turn(conv, arg)
                    turn.words.end_text()
                    await turn.stream.end_input()
                    if rid >= 0:
                        await self.send({"type": "ack", "id": rid})
            except Exception as exc:
                await self.reply_error(rid if rid >= 0 else None, exc)

    def _turn(self, conv: _Conversation, serial: int) -> _Turn:
        turn = conv.turns.get(serial)
        if turn is None:
            raise SessionClosedError(f"turn {serial} is not open on conversation {conv.cid}")
        return turn

    async def _push(self, conv: _Conversation, serial: int, delta: str) -> bool:
        """Push ``delta`` into the turn; True when it was dropped (the turn is settling or over)."""
        turn = self._turn(conv, serial)
        if turn.settling:
            return True
        turn.words.push_text(delta)
        await turn.stream.push_text(delta)
        return False

    async def _start_unless_cancelled(self, conv: _Conversation, rid: int, serial: int, *args: Any) -> None:
        conv.worker_serial = serial
        cancel = conv.cancelled.pop(serial, None)
        if cancel is not None:  # interrupted before it started: it never will
            await self.reply_error(
                rid, SessionClosedError(f"turn {serial} was interrupted before it started")
            )
            await self.send({"type": "heard", "id": cancel[0], "conversation": conv.cid, "turn": serial,
                             "frames": 0, "text": "", "audio_s": 0.0})  # fmt: skip
            return
        try:
            await self._start(conv, rid, serial, *args)
        finally:
            cancel = conv.cancelled.pop(serial, None)
            if cancel is not None:
                if serial in conv.turns:
                    await self._settle(conv, conv.turns[serial], *cancel)
                else:  # the start failed: nothing to settle
                    await self.send({"type": "heard", "id": cancel[0], "conversation": conv.cid, "turn": serial,
                                     "frames": 0, "text": "", "audio_s": 0.0})  # fmt: skip

    async def _start(self, conv: _Conversation, rid: int, serial: int, window: int, user: UserTurn | None,
                     received_at: float) -> None:  # fmt: skip
        stream = await conv.engine.start_turn(user, serial)
        turn = _Turn(serial, stream, received_at, WordTimer(self.server.sample_rate), credit=window)
        # keep the turn before this one: it may still be settled
        for old in [s for s in conv.turns if s != serial][:-1]:
            del conv.turns[old]
        conv.turns[serial] = turn
        await self.send({"type": "turn.started", "id": rid, "conversation": conv.cid, "turn": serial})
        turn.sender = self.spawn(self._send_audio(conv, turn), f"session-conv{conv.cid}-audio{serial}")

    async def _send_audio(self, conv: _Conversation, turn: _Turn) -> None:
        """Stream the turn's audio, one frame per credit; tell the client how the turn ended."""
        metrics = self.server.metrics
        frames, last = 0, 0.0
        chunks = aiter(turn.stream)
        try:
            opus = None  # Opus is stateful: one encoder per turn, whose frames the client decodes in order
            if conv.encoding == "opus":
                frame_samples = round(self.server.frame_s * self.server.sample_rate)
                opus = OpusFrameEncoder(self.server.sample_rate, frame_samples, conv.opus_bitrate)
            while True:
                while turn.credit <= 0 and not turn.settling:
                    turn.wake.clear()
                    await turn.wake.wait()
                if turn.settling:
                    return
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                if opus is None:
                    payload = sp.encode_pcm(chunk.pcm, conv.encoding)
                else:  # 1-2 ms of libopus (more on a loaded CPU), which releases the GIL: off the loop
                    payload = await asyncio.to_thread(opus.encode, chunk.pcm)
                data = sp.pack_frame(
                    sp.KIND_AUDIO, conv.encoding, conv.cid, turn.serial, chunk.frame_index, payload
                )
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.send_bytes(data)
                now = time.perf_counter()
                if frames == 0:
                    metrics.observe_first_audio(now - turn.received_at)
                else:
                    metrics.observe_chunk_gap(now - last)
                frames, last = frames + 1, now
                turn.credit -= 1
                await self._send_words(conv, turn, turn.words.push_audio(chunk.pcm))
        except Exception as exc:
            if not turn.settling:
                code = sp.error_code(exc)
                metrics.error(code)
                await self.send({"type": "turn.error", "conversation": conv.cid, "turn": turn.serial,
                                 "code": code, "message": str(exc), "frames": frames})  # fmt: skip
            return
        if not turn.settling:
            completed = bool(getattr(turn.stream, "completed", True))
            if getattr(turn.stream, "stopped_by_model", completed):  # all the text was spoken: final
                turn.words.finish()
                await self._send_words(conv, turn, turn.words.words, final=True)
            await self.send({"type": "turn.end", "conversation": conv.cid, "turn": turn.serial,
                             "frames": frames, "completed": completed})  # fmt: skip

    async def _send_words(
        self, conv: _Conversation, turn: _Turn, words: list[WordTiming], *, final: bool = False
    ) -> None:
        if words:
            await self.send({"type": "words", "conversation": conv.cid, "turn": turn.serial,
                             "words": _words_json(words), "final": final})  # fmt: skip


def _words_json(words: list[WordTiming]) -> list[dict[str, Any]]:
    return [{"text": w.word, "start_s": w.start_s, "end_s": w.end_s} for w in words]


@dataclass(frozen=True)
class _Rated:
    pcm: FloatArray
    rate: int


@contextlib.asynccontextmanager
async def session_server(engine: SpeechBackend, *, host: str = "127.0.0.1", port: int = 0,
                         **options: Any) -> AsyncIterator[str]:  # fmt: skip
    """Serve only the session protocol on ``engine`` (no auth, no metrics): for tests and for
    embedding. Yields the ``ws://host:port`` URL; ``options`` go to :func:`add_session_routes`."""
    app = web.Application()
    add_session_routes(app, engine, **options)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield f"ws://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
