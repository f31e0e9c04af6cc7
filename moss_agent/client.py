"""The speech service's Python client: a ``SpeechBackend`` on a remote engine.

``RemoteSpeechBackend`` speaks the session protocol (``docs/speech-protocol.md``) to a
``moss-agent speech-server``, so ``Session``, the CLI (``--engine-url``) and the transports run
unchanged on an engine in another process or on another machine::

    async with RemoteSpeechBackend("ws://gpu-box:8000", token="...") as backend:
        async with Session(backend, llm=llm, output=speaker) as session:
            await session.say("Hello from a shared GPU.")

The streams keep the contract of ``moss_agent.streaming.tts`` over the network: ``push_text``
returns once the server's engine took the text (at most ``text_window_chars`` may be in flight
unacknowledged), so a fast LLM is paced by speech; audio flows while this side reads it (the server
sends one frame per credit, ``audio_window`` frames ahead), so a slow reader holds the engine slot
instead of filling memory; errors arrive as the exceptions the in-process engine raises.

Conversations share sockets: one socket carries up to the server's ``max_conversations`` (a
bot process serving many calls opens few connections); more open further sockets. Needs aiohttp
(the ``[service]`` extra), never torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from moss_agent import speech_protocol as sp
from moss_agent._optional import require
from moss_agent.errors import (
    AudioError,
    ConfigError,
    EngineError,
    MossError,
    OverloadError,
    SessionClosedError,
    TransportError,
)
from moss_agent.events import AudioChunk, FloatArray
from moss_agent.opus import MAX_BITRATE, MIN_BITRATE, OpusFrameDecoder, opus_available
from moss_agent.streaming.tts import HeardResult, PastTurn, UserTurn, check_history
from moss_agent.wire import decode_json_object

log = logging.getLogger(__name__)

_END = object()  # end-of-turn marker in a stream's queue
UPLOAD_CHUNK_SAMPLES = 24000  # one second at 24 kHz per binary upload message


def session_url(url: str) -> str:
    """``ws://host:port`` (or http://, https://, wss://) -> the session endpoint's WebSocket URL."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ConfigError(f"engine URL {url!r} must look like ws://host:port (or wss://, http://, https://)")
    path = parts.path if parts.path not in ("", "/") else sp.PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _close_error(code: int | None, reason: str, url: str) -> MossError:
    why = f" ({reason})" if reason else ""
    if code == sp.CLOSE_BUSY:
        return OverloadError(f"the speech server at {url} is full{why}; retry later")
    if code == sp.CLOSE_POLICY:
        return TransportError(f"the speech server closed the connection{why}: this client broke a limit")
    if code == sp.CLOSE_TOO_BIG:
        return TransportError(
            f"the speech server closed the connection: a message was over its size limit{why}"
        )
    if code == sp.CLOSE_GOING_AWAY:
        return EngineError(f"the speech server at {url} is shutting down{why}")
    return EngineError(f"lost the connection to the speech server at {url} (close code {code}){why}")


class RemoteSpeechBackend:
    """A SpeechBackend on a speech server. ``url``: ``ws://host:port`` (the session path is added).

    ``token``: the server's bearer token. ``voice``: a voice registered on the server, used when
    ``open_conversation`` gets no voice prompt. ``encoding``: ``pcm_s16le`` (half the bytes) or
    ``pcm_f32le`` (exactly the engine's samples), both directions; or ``opus`` (agent audio as Opus
    at ``opus_bitrate`` bit/s, default the server's 32000: a twelfth of pcm_s16le, decoded here to
    float32; uploads stay pcm_s16le). ``audio_window``: frames the
    server may send ahead of what this side read. ``text_window_chars``: text that may be in flight
    unacknowledged (0: every ``push_text`` waits for its acknowledgement).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        voice: str | None = None,
        encoding: str = "pcm_s16le",
        opus_bitrate: int | None = None,
        audio_window: int = 12,
        text_window_chars: int = 64,
        request_timeout_s: float = 30.0,
        heartbeat_s: float = 5.0,
        sample_rate: int = 24000,
    ) -> None:
        if encoding not in sp.ENCODINGS:
            raise ConfigError(f"encoding must be one of {sorted(sp.ENCODINGS)}, got {encoding!r}")
        if encoding == "opus" and not opus_available():
            raise ConfigError("encoding opus needs PyAV with libopus (not on this machine); use pcm_s16le")
        if opus_bitrate is not None and not MIN_BITRATE <= opus_bitrate <= MAX_BITRATE:
            raise ConfigError(f"opus_bitrate must be from {MIN_BITRATE} to {MAX_BITRATE}, got {opus_bitrate}")
        if audio_window < 1 or text_window_chars < 0:
            raise ConfigError("audio_window must be >= 1 and text_window_chars >= 0")
        self.url = session_url(url)
        self.token = token
        self.voice = voice
        self.encoding = encoding
        self.upload_encoding = sp.upload_encoding(encoding)
        self.opus_bitrate = opus_bitrate
        self.audio_window = audio_window
        self.text_window_chars = text_window_chars
        self.request_timeout_s = request_timeout_s
        self.heartbeat_s = heartbeat_s
        self.sample_rate = sample_rate
        self.frame_s = 0.08
        self.voices: list[str] = []
        self._connections: list[_Connection] = []
        self._connecting = asyncio.Lock()
        self._http: Any = None
        self._closed = False
        self._failure_callbacks: list[Callable[[EngineError], None]] = []

    # -- lifecycle (like RealtimeEngine: ``async with``, health, failure callbacks) ---------------

    async def start(self) -> RemoteSpeechBackend:
        """Connect now, so a wrong URL or token fails here rather than at the first conversation."""
        async with self._connecting:
            if not any(conn.alive for conn in self._connections):
                self._connections.append(await self._connect())
        return self

    async def aclose(self) -> None:
        """Close every connection (their conversations end on the server)."""
        if self._closed:
            return
        self._closed = True
        for conn in self._connections:
            await conn.close()
        self._connections.clear()
        if self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> RemoteSpeechBackend:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def healthy(self) -> bool:
        return not self._closed

    @property
    def failure(self) -> EngineError | None:
        """Always None: a lost server fails its conversations, and the next open reconnects."""
        return None

    def on_failure(self, callback: Callable[[EngineError], None]) -> None:
        """Accepted for parity with RealtimeEngine; a remote backend never fails for good."""
        self._failure_callbacks.append(callback)

    # -- SpeechBackend ---------------------------------------------------------------------------

    async def open_conversation(
        self,
        *,
        system_prompt: str | None = None,
        voice_prompt: FloatArray | None = None,
        voice_sample_rate: int | None = None,
        voice: str | None = None,
        history: Sequence[PastTurn] | None = None,
    ) -> RemoteConversation:
        """Open a conversation on the server. ``voice_prompt`` (float32 mono at ``voice_sample_rate``,
        default the backend's rate) is uploaded; else ``voice`` (or the backend's) names a server voice.
        ``history``: earlier turns the conversation starts with (the open's ``turns``; their audio
        is uploaded after the voice's, in the same upload).

        Raises OverloadError when the server has no slot free, SessionClosedError after ``aclose()``,
        ConfigError for a history the server refuses (over its limits or its engine's context).
        """
        turns = check_history(history)
        if self._closed:
            raise SessionClosedError("the remote speech backend is closed")
        conn = await self._reserve()
        message: dict[str, Any] = {"type": "open", "encoding": self.encoding, "system_prompt": system_prompt}
        if self.encoding == "opus" and self.opus_bitrate is not None:
            message["opus_bitrate"] = self.opus_bitrate
        upload = None
        if voice_prompt is not None:
            upload = sp.encode_pcm(voice_prompt, self.upload_encoding)
            message["voice_audio"] = {
                "samples": len(upload) // sp.sample_bytes(self.upload_encoding),
                "sample_rate": voice_sample_rate or self.sample_rate,
            }
        elif voice or self.voice:
            message["voice"] = voice or self.voice
        if turns:
            message["turns"], audio = _turns_message(turns, self.upload_encoding)
            upload = b"".join([upload or b"", *audio])
        try:
            reply = await conn.request(message, upload, on_abandoned=conn.close_opened)
        except BaseException:
            conn.reserved -= 1
            raise
        conversation = RemoteConversation(conn, int(reply["conversation"]), int(reply["sample_rate"]))
        conn.conversations[conversation.cid] = conversation
        return conversation

    async def _reserve(self) -> _Connection:
        async with self._connecting:
            self._connections = [conn for conn in self._connections if conn.alive]
            for conn in self._connections:
                if conn.reserved < conn.capacity:
                    conn.reserved += 1
                    return conn
            conn = await self._connect()
            self._connections.append(conn)
            conn.reserved += 1
            return conn

    async def _connect(self) -> _Connection:
        aiohttp = require("aiohttp", "service")
        if self._http is None:
            self._http = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            ws = await self._http.ws_connect(
                self.url, headers=headers, heartbeat=self.heartbeat_s, compress=0, max_msg_size=4 << 20,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise TransportError(
                    f"the speech server at {self.url} refused the token ({exc.status}); pass its --token"
                ) from None
            if exc.status in (429, 503):
                raise OverloadError(
                    f"the speech server at {self.url} is busy ({exc.status}); retry later"
                ) from None
            raise EngineError(
                f"the speech server at {self.url} refused the session socket ({exc.status} {exc.message})"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EngineError(
                f"cannot reach the speech server at {self.url}: {exc or type(exc).__name__}"
            ) from None
        try:
            hello = await ws.receive(timeout=self.request_timeout_s)
        except TimeoutError:
            await ws.close()
            raise EngineError(
                f"the speech server at {self.url} did not greet within {self.request_timeout_s:g} s"
            ) from None
        if hello.type != aiohttp.WSMsgType.TEXT:
            await ws.close()
            raise _close_error(ws.close_code, str(hello.extra or ""), self.url)
        greeting = decode_json_object(hello.data, what="hello from the speech server", max_bytes=1 << 20)
        if greeting.get("type") != "hello" or greeting.get("protocol") != sp.PROTOCOL:
            await ws.close()
            raise TransportError(
                f"{self.url} does not speak the session protocol {sp.PROTOCOL}: {str(greeting)[:200]}"
            )
        self.sample_rate = int(greeting["sample_rate"])
        self.frame_s = float(greeting["frame_s"])
        self.voices = list(greeting.get("voices", []))
        return _Connection(self, ws, greeting)


def _turns_message(turns: list[PastTurn], encoding: str) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The ``turns`` of an open and their audio in ``encoding``, in upload order."""
    entries, audio = [], []
    for turn in turns:
        entry: dict[str, Any] = {"role": turn.role, "text": turn.text}
        if turn.has_audio:
            data = sp.encode_pcm(turn.audio, encoding)  # type: ignore[arg-type]
            entry["audio"] = {"samples": len(data) // sp.sample_bytes(encoding), "sample_rate": turn.sample_rate}
            audio.append(data)
        entries.append(entry)
    return entries, audio


class _Connection:
    """One socket: a writer task sends queued messages in order, a reader task dispatches replies
    (by request id), audio (by conversation) and turn endings; a lost socket fails all of them."""

    def __init__(self, backend: RemoteSpeechBackend, ws: Any, hello: dict[str, Any]) -> None:
        self.backend = backend
        self.ws = ws
        limits = hello.get("limits", {})
        self.capacity = int(limits.get("max_conversations", 1))
        self.max_text_chars = int(limits.get("max_text_chars", 4096))
        self.max_bytes = int(limits.get("max_message_bytes", 1 << 20))
        self.reserved = 0
        self.conversations: dict[int, RemoteConversation] = {}
        self.error: MossError | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._outbox: deque[str | bytes] = deque()
        self._outbox_ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="speech-client-reader")
        self._writer = asyncio.create_task(self._write(), name="speech-client-writer")

    @property
    def alive(self) -> bool:
        return self.error is None

    # -- sending ---------------------------------------------------------------------------------

    def post(
        self, message: dict[str, Any], upload: bytes | None = None
    ) -> asyncio.Future[dict[str, Any]] | None:
        """Queue ``message`` (and its upload) to send; with an ``id`` slot, return its reply's future."""
        if self.error is not None:
            raise self.error
        future = None
        if message.get("type") in ("open", "turn.start", "text", "end_input", "interrupt", "close"):
            rid = message["id"] = self._next_id
            self._next_id += 1
            future = asyncio.get_running_loop().create_future()
            self._pending[rid] = future
        self._outbox.append(json.dumps(message, separators=(",", ":")))
        if upload:
            encoding = self.backend.upload_encoding
            step = UPLOAD_CHUNK_SAMPLES * sp.sample_bytes(encoding)
            for number, start in enumerate(range(0, len(upload), step)):
                chunk = upload[start : start + step]
                self._outbox.append(sp.pack_frame(sp.KIND_UPLOAD, encoding, message["id"], number, 0, chunk))
        self._outbox_ready.set()
        return future

    async def request(
        self, message: dict[str, Any], upload: bytes | None = None, *, timeout: float | None = -1.0,
        on_abandoned: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Send a request and wait for its reply (raising the mapped error). ``on_abandoned(reply)``
        runs when the caller was cancelled or timed out but the server went on and succeeded."""
        future = self.post(message, upload)
        assert future is not None
        limit = self.backend.request_timeout_s if timeout == -1.0 else timeout
        try:
            async with asyncio.timeout(limit):
                return await asyncio.shield(future)
        except (asyncio.CancelledError, TimeoutError) as exc:
            if on_abandoned is not None:
                future.add_done_callback(
                    lambda f: (
                        on_abandoned(f.result()) if not f.cancelled() and f.exception() is None else None
                    )
                )
            else:
                future.add_done_callback(_consume)
            if isinstance(exc, TimeoutError):
                raise _NoAnswer(
                    f"the speech server did not answer {message['type']!r} within {limit:g} s"
                ) from None
            raise

    def close_opened(self, reply: dict[str, Any]) -> None:
        """A conversation opened for a caller that gave up: close it at once."""
        with contextlib.suppress(MossError):
            future = self.post({"type": "close", "conversation": reply["conversation"]})
            if future is not None:
                future.add_done_callback(_consume)

    async def _write(self) -> None:
        try:
            while True:
                while not self._outbox:
                    self._outbox_ready.clear()
                    await self._outbox_ready.wait()
                item = self._outbox.popleft()
                if isinstance(item, str):
                    await self.ws.send_str(item)
                else:
                    await self.ws.send_bytes(item)
        except (ConnectionError, RuntimeError) as exc:
            self._lost(EngineError(f"lost the connection to the speech server at {self.backend.url}: {exc}"))

    # -- receiving -------------------------------------------------------------------------------

    async def _read(self) -> None:
        aiohttp = require("aiohttp", "service")
        error: MossError | None = None
        reason = ""
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._on_json(
                        decode_json_object(msg.data, what="speech server message", max_bytes=self.max_bytes)
                    )
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._on_audio(sp.unpack_frame(msg.data))
                else:  # CLOSE (with the server's reason), CLOSED, ERROR
                    reason = str(msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else ""
                    break
        except MossError as exc:  # the server sent something malformed: nothing on this socket is trusted
            error = exc
        finally:
            self._lost(error or _close_error(self.ws.close_code, reason, self.backend.url))
            if error is not None:
                await self.ws.close()

    def _on_json(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        rid = message.get("id")
        if kind in ("error", "turn.error"):
            retry = message.get("retry_after_s")
            error = sp.remote_error(str(message.get("code")), str(message.get("message")), retry)
            if kind == "turn.error":
                self._conversation_event(message, error)
                return
            future = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if future is None:
                log.warning("speech server error", extra={"code": message.get("code"), "error": str(error)})
            elif not future.done():
                future.set_exception(error)
            return
        if kind == "turn.end":
            self._conversation_event(message, None)
            return
        if isinstance(rid, int) and kind in ("opened", "turn.started", "ack", "heard", "closed"):
            future = self._pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_result(message)
        # anything else (a newer server's messages, "pong", "words") is ignored

    def _conversation_event(self, message: dict[str, Any], error: MossError | None) -> None:
        conversation = self.conversations.get(message.get("conversation"))  # type: ignore[arg-type]
        if conversation is not None:
            conversation._turn_ended(message.get("turn"), error, bool(message.get("completed", True)))

    def _on_audio(self, frame: sp.Frame) -> None:
        if frame.kind != sp.KIND_AUDIO:
            raise TransportError(f"the speech server sent a binary frame of kind {frame.kind}")
        conversation = self.conversations.get(frame.a)
        if conversation is not None:
            conversation._audio(frame)
            stream = conversation._stream
            if stream is not None and len(stream._queue) > stream._window + 1:  # +1: the end marker
                raise TransportError("the speech server sent more audio than this client gave it credit for")

    def _lost(self, error: MossError) -> None:
        if self.error is not None:
            return
        self.error = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
                future.add_done_callback(_consume)
        self._pending.clear()
        for conversation in list(self.conversations.values()):
            conversation._lost(error)
        for task in (self._reader, self._writer):
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        self._lost(SessionClosedError("the remote speech backend was closed"))
        with contextlib.suppress(Exception):
            await self.ws.close()
        for task in (self._reader, self._writer):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _NoAnswer(EngineError):
    """The server did not answer a request in time (it may still carry it out)."""


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a future's exception nobody waits for (a reply a caller gave up on)."""
    if not future.cancelled():
        future.exception()


class RemoteConversation:
    """One conversation (one engine slot) on the server. Implements ``Conversation``."""

    def __init__(self, conn: _Connection, cid: int, sample_rate: int) -> None:
        self.conn = conn
        self.cid = cid
        self.sample_rate = sample_rate
        self._stream: RemoteStream | None = None
        self._serial = 0
        self._closed = False
        self._error: MossError | None = None

    async def start_turn(self, user: UserTurn | None, turn_id: int) -> RemoteStream:
        if self._closed:
            raise SessionClosedError("the conversation is closed")
        if self._error is not None:
            raise EngineError(f"the conversation's connection is gone: {self._error}")
        if self._stream is not None and not self._stream.done:
            raise EngineError(
                f"turn {self._stream.turn_id} is still open on this conversation; "
                "interrupt() or aclose() it before starting another"
            )
        backend = self.conn.backend
        self._serial += 1
        stream = RemoteStream(self, turn_id, self._serial)
        message: dict[str, Any] = {"type": "turn.start", "conversation": self.cid, "turn": stream.serial,
                                   "window": backend.audio_window}  # fmt: skip
        upload = None
        if user is not None:
            message["user"] = {"text": user.text}
            if user.audio is not None and np.size(user.audio):
                upload = sp.encode_pcm(user.audio, backend.upload_encoding)
                samples = len(upload) // sp.sample_bytes(backend.upload_encoding)
                message["user"]["audio"] = {"samples": samples, "sample_rate": user.sample_rate}
        self._stream = stream  # audio may arrive right behind the reply
        try:
            await self.conn.request(message, upload)
        except (asyncio.CancelledError, _NoAnswer):
            # The caller gave up; the turn may start anyway: settle it at nothing heard. The server
            # applies this before anything this conversation sends later (such as the next turn.start).
            with contextlib.suppress(MossError):
                future = self.conn.post(stream._message("interrupt", heard_s=0.0))
                if future is not None:
                    future.add_done_callback(_consume)
            stream._finish(None)
            raise
        except BaseException:
            stream._finish(None)
            raise
        return stream

    async def aclose(self) -> None:
        """Free the slot on the server (waits for it, so the slot is free when this returns)."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream._finish(None)
        try:
            if self._error is None:
                await self.conn.request({"type": "close", "conversation": self.cid})
        except MossError:
            pass  # the connection is gone, and the server freed the slot with it
        finally:
            self.conn.conversations.pop(self.cid, None)
            self.conn.reserved -= 1

    # -- from the reader -------------------------------------------------------------------------

    def _audio(self, frame: sp.Frame) -> None:
        stream = self._stream
        if stream is None or stream.serial != frame.b or stream._speech_over:
            return  # stale: an earlier turn's, or a turn that ended (or failed) here
        try:
            pcm = stream._decode(frame)
        except MossError as exc:  # a bad packet fails its turn; the socket and the conversation go on
            stream._end(exc, False)
            return
        stream._receive(AudioChunk(pcm, self.sample_rate, stream.turn_id, frame.c))

    def _turn_ended(self, serial: Any, error: MossError | None, completed: bool) -> None:
        stream = self._stream
        if stream is not None and stream.serial == serial:
            stream._end(error, completed)

    def _lost(self, error: MossError) -> None:
        self._error = error
        if self._stream is not None:
            self._stream._end(error, False)


class RemoteStream:
    """One agent turn on the server. Implements ``SpeechStream`` and its contract."""

    def __init__(self, conversation: RemoteConversation, turn_id: int, serial: int) -> None:
        self.conversation = conversation
        self.turn_id = turn_id
        self.serial = serial
        backend = conversation.conn.backend
        self._window = backend.audio_window
        self._text_window = backend.text_window_chars
        self._queue: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._text_room = asyncio.Event()
        self._in_flight = 0  # characters sent, not yet acknowledged
        self._text_error: BaseException | None = None
        self._unreported = 0  # frames read but not yet credited back
        self._settling = asyncio.Lock()
        self._input_closed = False
        self._speech_over = False
        self._heard: HeardResult | None = None
        self._opus: OpusFrameDecoder | None = None  # Opus is stateful: a decoder per turn, fed in order
        self.done = False
        self.completed = False

    @property
    def _conn(self) -> _Connection:
        return self.conversation.conn

    def _message(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "conversation": self.conversation.cid, "turn": self.serial, **fields}

    async def push_text(self, delta: str) -> None:
        if self._input_closed:
            raise SessionClosedError(f"push_text after end_input() or aclose() on turn {self.turn_id}")
        if self._speech_over or not delta:
            return
        step = self._conn.max_text_chars
        try:
            for start in range(0, len(delta), step):
                piece = delta[start : start + step]
                future = self._conn.post(self._message("text", delta=piece))
                assert future is not None
                self._in_flight += len(piece)
                future.add_done_callback(functools.partial(self._acked, chars=len(piece)))
        except MossError:  # the connection is gone: the turn ended with it
            return
        while self._in_flight > self._text_window and not self._speech_over and self._text_error is None:
            self._text_room.clear()
            await self._text_room.wait()
        if self._text_error is not None and not self._speech_over:
            error, self._text_error = self._text_error, None
            raise error

    def _acked(self, future: asyncio.Future[dict[str, Any]], chars: int) -> None:
        self._in_flight -= chars
        if not future.cancelled() and future.exception() is not None and self._text_error is None:
            self._text_error = future.exception()
        self._text_room.set()

    async def end_input(self) -> None:
        if self._input_closed:
            return
        self._input_closed = True
        if not self._speech_over:
            with contextlib.suppress(MossError):
                future = self._conn.post(self._message("end_input"))
                if future is not None:
                    future.add_done_callback(_consume)

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> AudioChunk:
        while not self._queue:
            if self.done:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        item = self._queue.popleft()
        if item is _END:
            self.done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self._unreported += 1
        if self._unreported >= max(1, self._window // 2) and not self._speech_over:
            with contextlib.suppress(MossError):
                self._conn.post(self._message("credit", frames=self._unreported))
            self._unreported = 0
        return item  # type: ignore[no-any-return]

    async def interrupt(self, heard_s: float | None = None) -> HeardResult:
        """Stop generating, drop unplayed audio, cut the server's context to ``heard_s``."""
        async with self._settling:
            if self._heard is None:
                self._finish(None)
                if self.conversation._error is not None:
                    raise EngineError(f"cannot settle turn {self.turn_id}: {self.conversation._error}")
                reply = await self._conn.request(self._message("interrupt", heard_s=heard_s))
                self._heard = HeardResult(int(reply["frames"]), str(reply["text"]), float(reply["audio_s"]))
        return self._heard

    async def aclose(self) -> None:
        """Release the stream; a turn still running is settled as heard in full."""
        self._input_closed = True
        if not self.done:
            await self.interrupt(None)
        self._finish(None)

    # -- from the connection ---------------------------------------------------------------------

    def _decode(self, frame: sp.Frame) -> FloatArray:
        """The frame's samples; AudioError for a malformed Opus packet (about 0.3 ms to decode one)."""
        if frame.encoding != "opus":
            return sp.decode_pcm(frame.payload, frame.encoding)
        if self.conversation.conn.backend.encoding != "opus":
            raise AudioError("the speech server sent opus audio on a conversation opened for PCM")
        if self._opus is None:
            rate = self.conversation.sample_rate
            self._opus = OpusFrameDecoder(rate, round(self.conversation.conn.backend.frame_s * rate))
        return self._opus.decode(frame.payload)

    def _receive(self, chunk: AudioChunk) -> None:
        if not self.done:
            self._queue.append(chunk)
            self._ready.set()

    def _end(self, error: MossError | None, completed: bool) -> None:
        """The server said the turn's audio ended (or failed): queued audio is still read first."""
        if self._speech_over:
            return
        self._speech_over = True
        self.completed = completed
        self._text_room.set()
        if not self.done:
            self._queue.append(error if error is not None else _END)
            self._ready.set()

    def _finish(self, error: BaseException | None) -> None:
        """End the stream now (an interrupt or a close): queued audio is dropped, being stale."""
        self._speech_over = True
        self._text_room.set()
        if self.done:
            return
        self.done = True
        self._queue.clear()
        self._ready.set()
