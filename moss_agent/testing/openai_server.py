"""A real local HTTP server speaking the OpenAI protocol, for tests that exercise the network path.

- ``POST /v1/chat/completions``: streams scripted replies as server-sent events, token by token,
  or fails on cue: ``reset`` (connection dropped mid-stream), ``http500`` (before streaming),
  ``stall`` (stops sending until the client gives up).
- ``POST /v1/audio/transcriptions``: multipart upload; the audio is decoded and handed to a
  pluggable ``transcribe(pcm, sample_rate)`` (a real recognizer, or a script).
- ``GET /v1/models``.

Every request body is kept in ``chat_requests`` / ``transcriptions`` for assertions;
``tokens_sent`` counts streamed tokens and ``aborted`` the replies the client hung up on.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from moss_agent.audio import decode_audio_bytes
from moss_agent.events import FloatArray

Failure = Literal["reset", "http500", "stall"]


@dataclass(frozen=True, slots=True)
class ScriptedReply:
    """One chat completion: ``text`` streamed in word tokens ``token_delay_s`` apart.

    ``fail`` happens after ``fail_after`` tokens (``http500`` always before the first).
    """

    text: str
    token_delay_s: float = 0.0
    fail: Failure | None = None
    fail_after: int = 0

    def tokens(self) -> list[str]:
        return re.findall(r"\s*\S+", self.text) or [self.text]


Responder = Callable[[list[dict[str, Any]]], "ScriptedReply | str"]
TranscribeFn = Callable[[FloatArray, int], "str | Awaitable[str]"]


def echo_responder(messages: list[dict[str, Any]]) -> ScriptedReply:
    last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    return ScriptedReply(f"You said: {last}" if last else "Hello.")


class FakeOpenAIServer:
    """``async with FakeOpenAIServer(["first reply", ScriptedReply("x", fail="reset")]) as server:``

    Scripted replies are used in order, then ``responder`` (default: echo the last user message).
    """

    def __init__(
        self,
        replies: Iterable[ScriptedReply | str] = (),
        *,
        responder: Responder | None = None,
        transcribe: TranscribeFn | None = None,
        transcribe_rate: int = 16000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._script: deque[ScriptedReply] = deque()
        self.script(*replies)
        self.responder = responder or echo_responder
        self.transcribe = transcribe
        self.transcribe_rate = transcribe_rate
        self.host = host
        self.port = port
        self.chat_requests: list[dict[str, Any]] = []
        self.transcriptions: list[tuple[FloatArray, str]] = []
        self.tokens_sent = 0
        self.aborted = 0
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    def script(self, *replies: ScriptedReply | str) -> None:
        for reply in replies:
            self._script.append(ScriptedReply(reply) if isinstance(reply, str) else reply)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def __aenter__(self) -> FakeOpenAIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def aclose(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start_in_thread(self) -> None:
        """Serve from a thread with its own event loop, like a separate server process would.

        Keeps the server's own CPU work off the caller's loop (benchmarks); stop with ``stop_thread``.
        """
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            self._stopping = asyncio.Event()
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.aclose())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-openai-server", daemon=True)
        self._thread.start()
        ready.wait()

    def stop_thread(self) -> None:
        if self._thread is None or self._thread_loop is None:
            return
        self._thread_loop.call_soon_threadsafe(self._stopping.set)
        self._thread_loop.call_soon_threadsafe(self._thread_loop.stop)
        self._thread.join()
        self._thread = None

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def _next_reply(self, messages: list[dict[str, Any]]) -> ScriptedReply:
        if self._script:
            return self._script.popleft()
        reply = self.responder(messages)
        return ScriptedReply(reply) if isinstance(reply, str) else reply

    def _chunk(self, cid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body)}\n\n".encode()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.chat_requests.append(body)
        reply = self._next_reply(body.get("messages", []))
        if reply.fail == "http500":
            return web.json_response(
                {"error": {"message": "scripted server error", "type": "server_error"}}, status=500
            )
        model = body.get("model", "fake-model")
        cid = f"chatcmpl-fake-{next(self._ids)}"
        if not body.get("stream"):
            message = {"role": "assistant", "content": reply.text}
            return web.json_response(
                {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(self._chunk(cid, model, {"role": "assistant", "content": ""}))
        try:
            for index, token in enumerate(reply.tokens()):
                if reply.fail is not None and index >= reply.fail_after:
                    break
                if reply.token_delay_s:
                    await asyncio.sleep(reply.token_delay_s)
                await response.write(self._chunk(cid, model, {"content": token}))
                self.tokens_sent += 1
        except (ConnectionResetError, ConnectionError):
            self.aborted += 1  # the client hung up mid-reply (an interrupt closes the stream)
            return response
        if reply.fail == "reset":
            transport = request.transport
            if transport is not None:
                transport.abort()
            return response
        if reply.fail == "stall":
            await self._stopping.wait()
            return response
        await response.write(self._chunk(cid, model, {}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _transcriptions(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            return web.json_response({"error": {"message": "multipart field 'file' is missing"}}, status=400)
        data = upload.file.read()
        audio = decode_audio_bytes(data, self.transcribe_rate, name=getattr(upload, "filename", "upload"))
        text = ""
        if self.transcribe is not None:
            result = self.transcribe(audio, self.transcribe_rate)
            text = await result if inspect.isawaitable(result) else result
        self.transcriptions.append((audio, text))
        if str(form.get("response_format", "json")) == "text":
            return web.Response(text=text)
        return web.json_response({"text": text})
