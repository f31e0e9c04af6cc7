"""Language-model text sources: any OpenAI-compatible chat-completions endpoint, and an offline echo.

Deltas are yielded the moment they arrive; the TTS stream does its own text pacing, so nothing is
held back for sentence boundaries here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from moss_agent._optional import require
from moss_agent.config import LLMConfig
from moss_agent.errors import LLMError
from moss_agent.streaming.clock import Clock, MonotonicClock
from moss_agent.streaming.history import ChatMessage

log = logging.getLogger(__name__)

# How much of an answer that is not an event stream is read: enough for a whole non-streamed
# completion, or to quote the start of an HTML page in the error.
_MAX_PLAIN_ANSWER_BYTES = 1024 * 1024
_QUOTED_BYTES = 120


class LLMRequestError(LLMError):
    """An LLM request failed; ``kind`` is connection, status, timeout or protocol; ``status`` the HTTP code."""

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@runtime_checkable
class LLM(Protocol):
    """Anything that turns chat messages into a stream of text deltas; raises LLMError on failure."""

    def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]: ...


class OpenAIChatLLM:
    """Streams chat completions from an OpenAI-compatible server with the ``openai`` package.

    Failures (connection refused or reset, HTTP errors, a stalled stream past
    ``config.idle_timeout_s``, an answer with no text at all) raise ``LLMRequestError`` (an
    ``LLMError``) with ``kind`` in ``connection``, ``status``, ``timeout``, ``protocol`` or ``empty``;
    retries are left to the caller because a retried turn would repeat words already spoken.

    ``model_from_server``: ignore ``config.model`` and use the one model the server lists at
    ``/models`` (asked once, by ``check()`` or the first request); a server that lists several, or
    none, is an error that names them.
    """

    def __init__(
        self, config: LLMConfig | None = None, *, client: Any | None = None, model_from_server: bool = False
    ) -> None:
        self.config = config or LLMConfig()
        self._model: str | None = None if model_from_server else self.config.model
        if client is None:
            openai = require("openai", "llm")
            client = openai.AsyncOpenAI(
                base_url=self.config.base_url,
                api_key=self.config.api_key,
                timeout=self.config.request_timeout_s,
                max_retries=0,
            )
        self._client = client

    def _request_kwargs(self, messages: list[ChatMessage]) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {"model": self._model or cfg.model, "messages": messages, "stream": True}
        if cfg.temperature is not None:
            kwargs["temperature"] = cfg.temperature
        if cfg.top_p is not None:
            kwargs["top_p"] = cfg.top_p
        if cfg.max_tokens is not None:
            kwargs["max_tokens"] = cfg.max_tokens
        if cfg.extra_body:
            kwargs["extra_body"] = dict(cfg.extra_body)
        return kwargs

    def _wrap(self, exc: Exception) -> LLMRequestError:
        openai = require("openai", "llm")
        if isinstance(exc, TimeoutError | openai.APITimeoutError):
            kind = "timeout"
        elif isinstance(exc, openai.APIStatusError):
            kind = "status"
        elif isinstance(exc, openai.APIConnectionError):
            kind = "connection"
        else:
            kind = "protocol"
        if isinstance(exc, json.JSONDecodeError):
            return LLMRequestError(
                f"the LLM server at {self.config.base_url} sent a stream event that is not JSON ({exc.msg} at "
                f"column {exc.colno}); check that the URL is an OpenAI-compatible /v1 endpoint",
                kind=kind,
            )
        status = getattr(exc, "status_code", None)
        if kind == "connection":
            return LLMRequestError(
                f"cannot connect to the LLM server at {self.config.base_url} ({_connection_failure(exc)}); "
                "start the server, or correct the URL",
                kind=kind,
            )
        return LLMRequestError(
            f"LLM request to {self.config.base_url} failed ({kind}"
            + (f", HTTP {status}" if status else "")
            + f"): {exc or type(exc).__name__}; check that the server is up and the model name is right",
            kind=kind,
            status=status if isinstance(status, int) else None,
        )

    @property
    def model(self) -> str | None:
        """The model asked for: ``config.model``, or the server's (None until it was asked)."""
        return self._model

    async def check(self) -> None:
        """Raise LLMRequestError now if the server cannot be reached (one GET of ``/models``), so a
        command fails before it loads models rather than at its first turn. An HTTP error passes
        (some servers have no ``/models``) unless the model is to come from the server; a
        successful answer that is not JSON (a web page at a mistyped URL) does not."""
        openai = require("openai", "llm")
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                raw = await self._client.models.with_raw_response.list()
        except openai.APIStatusError as exc:
            if self._model is None:
                raise LLMRequestError(
                    f"the LLM server at {self.config.base_url} does not list its models (HTTP {exc.status_code} "
                    f"for /models{'; is /v1 missing from the URL?' if _no_path(self.config.base_url) else ''}); "
                    "give the model name (--llm-model, LLMConfig.model)",
                    kind="status",
                    status=exc.status_code,
                ) from None
            return
        except Exception as exc:
            raise self._wrap(exc) from exc
        content_type = str(raw.headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type and not content_type.endswith("json"):
            raise LLMRequestError(
                f"the LLM server at {self.config.base_url} answered HTTP {raw.status_code} with "
                f"{content_type!r} where an OpenAI-compatible server sends JSON; the answer begins "
                f"{raw.content[:_QUOTED_BYTES]!r}; check that the URL is an OpenAI-compatible /v1 endpoint",
                kind="protocol",
            )
        if self._model is None:
            self._model = self._only_model(raw)

    def _only_model(self, raw: Any) -> str:
        """The id of the one model a ``/models`` answer lists; LLMRequestError naming them otherwise."""
        try:
            listed = raw.parse()
            names = [str(model.id) for model in listed.data if getattr(model, "id", None)]
        except Exception:
            names = []
        where = f"the LLM server at {self.config.base_url}"
        if len(names) == 1:
            return names[0]
        if not names:
            raise LLMRequestError(
                f"{where} lists no models at /models; give the model name (--llm-model, LLMConfig.model)",
                kind="protocol",
            )
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        raise LLMRequestError(
            f"{where} serves several models ({shown}); choose one with --llm-model (LLMConfig.model)",
            kind="protocol",
        )

    async def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]:
        if self._model is None:
            await self.check()
        idle = self.config.idle_timeout_s
        response: Any = None
        finish_reason: str | None = None
        try:
            async with asyncio.timeout(idle):
                response = await self._client.chat.completions.create(**self._request_kwargs(messages))
            content_type = _content_type(response)
            if content_type and content_type != "text/event-stream":
                # Not a stream: a server that ignored "stream": true (JSON), or no LLM at all (HTML).
                async with asyncio.timeout(idle):
                    body = await _read_at_most(response.response, _MAX_PLAIN_ANSWER_BYTES)
                text = self._plain_answer(content_type, response.response.status_code, body)
                if not text.strip():
                    raise self._empty("a chat completion whose message has no text", None)
                yield text
                return
            iterator = response.__aiter__()
            said = False
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish_reason = getattr(choice, "finish_reason", None) or finish_reason
                delta = choice.delta.content if choice.delta is not None else None
                if delta:
                    said = said or bool(delta.strip())
                    yield delta
            if not said:
                raise self._empty("a stream with no text", finish_reason)
        except LLMError:
            raise
        except Exception as exc:  # every transport/protocol failure becomes one error type
            raise self._wrap(exc) from exc
        finally:
            if response is not None:
                close = getattr(response, "close", None)
                if close is not None:
                    try:
                        await close()
                    except Exception:
                        log.debug("closing the LLM response failed", exc_info=True)

    def _empty(self, what: str, finish_reason: str | None) -> LLMRequestError:
        """The error of an answer with nothing to say: a voice agent would speak silence."""
        why = f" (finish_reason {finish_reason!r})" if finish_reason else ""
        hint = (
            "; a reasoning model may have spent max_tokens thinking: raise LLMConfig.max_tokens or turn thinking off"
            if finish_reason == "length"
            else "; check that the URL is an OpenAI-compatible /v1 endpoint and the model name is right"
        )
        return LLMRequestError(f"the LLM server at {self.config.base_url} answered with {what}{why}{hint}", kind="empty")

    def _plain_answer(self, content_type: str, status: int, body: bytes) -> str:
        """The reply text of a complete (non-streamed) JSON chat completion; LLMRequestError for
        anything else, quoting the content type and the body's first bytes."""
        from moss_agent.wire import decode_json_object

        where = f"the LLM server at {self.config.base_url}"
        if content_type.endswith("json"):
            try:
                answer = decode_json_object(
                    body, what=f"the answer of {where}", max_bytes=_MAX_PLAIN_ANSWER_BYTES, error=LLMError
                )
            except LLMError as exc:
                raise LLMRequestError(str(exc), kind="protocol") from None
            error = answer.get("error")
            if error is not None:
                detail = error.get("message", error) if isinstance(error, dict) else error
                raise LLMRequestError(f"{where} answered with an error: {str(detail)[:200]}", kind="protocol")
            choices = answer.get("choices")
            message = (
                choices[0].get("message")
                if isinstance(choices, list) and choices and isinstance(choices[0], dict)
                else None
            )
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                return content
        raise LLMRequestError(
            f"{where} answered HTTP {status} with {content_type!r}, not a chat completion stream "
            "(text/event-stream); "
            f"the answer begins {body[:_QUOTED_BYTES]!r}; check that the URL is an OpenAI-compatible "
            "/v1 endpoint",
            kind="protocol",
        )

    async def aclose(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            await close()


def _content_type(response: Any) -> str:
    """The media type of a stream's HTTP answer ("" when unknown, e.g. from a test double)."""
    headers = getattr(getattr(response, "response", None), "headers", None)
    if headers is None:
        return ""
    value = headers.get("content-type") or ""
    return str(value).split(";")[0].strip().lower()


async def _read_at_most(http: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes of an HTTP response body."""
    body = bytearray()
    async for chunk in http.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _no_path(url: str) -> bool:
    from urllib.parse import urlsplit

    return urlsplit(url).path.strip("/") == ""


def _connection_failure(exc: BaseException) -> str:
    """Why a connection failed, from the innermost cause: refused, unknown host, or the library's words."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused: is the server running?"
        if isinstance(cause, socket.gaierror):
            return "unknown host"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


class EchoResponder:
    """OFFLINE DEMO RESPONDER, NOT A LANGUAGE MODEL: repeats the user's last message back.

    Lets the voice pipeline run end to end without any LLM server; ``delay_s`` per word imitates
    token streaming.
    """

    def __init__(self, prefix: str = "You said: ", delay_s: float = 0.0, clock: Clock | None = None) -> None:
        self.prefix = prefix
        self.delay_s = delay_s
        self.clock = clock or MonotonicClock()

    async def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        reply = f"{self.prefix}{last_user}" if last_user else "I did not catch that. Could you say it again?"
        for word in re.findall(r"\S+\s*", reply):
            if self.delay_s:
                await self.clock.sleep(self.delay_s)
            yield word
