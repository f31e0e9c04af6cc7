"""HTTP hardening for the WebRTC signaling server: connection limits, a header deadline, JSON errors.

aiohttp keeps a connection open for as long as its client trickles request headers (before 3.10 it
had no deadline at all before the first request), and it accepts any number of connections from one
address. So every accepted socket is wrapped in :class:`GuardedConnection`, a plain asyncio protocol
in front of aiohttp's: it refuses a connection past the per-address or total limit with a 503 JSON
answer, and closes a connection whose first request's headers have not arrived within
``header_timeout_s``. Later requests on a kept-alive connection are bounded by aiohttp's keep-alive
timer, which the server sets to the same value (it closes a connection waiting for a complete
request). Bodies are bounded where they are read, with ``body_timeout_s``.

:func:`error_middleware` turns every refusal (:class:`HttpError`, or any TransportError: 400) into ``{"type": "error", "code", "message"}`` with its
HTTP status and closes the connection after it; nothing reaches the client as a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from moss_agent._optional import require
from moss_agent.errors import ConfigError, TransportError
from moss_agent.transports.connection import error_event

logger = logging.getLogger(__name__)

LINGER_S = 1.0
"""After an error answer, how long the client's remaining input is still read (and dropped) before
the connection closes: closing a socket with unread input resets it, and the reset can discard the
answer before the client reads it."""

_STATUS_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
                 413: "too_large", 503: "busy"}  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class HttpLimits:
    """How long and how many: the HTTP side of the signaling server.

    Behind a reverse proxy every client shares the proxy's address, so raise
    ``max_connections_per_address`` to what the proxy may open at once.
    """

    header_timeout_s: float = 10.0
    """A connection whose next request's headers are not complete in this time is closed."""
    body_timeout_s: float = 20.0
    """A request body that has not fully arrived in this time is answered 408 and the connection closed."""
    max_connections_per_address: int = 32
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "max_connections_per_address", "max_connections"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"HttpLimits.{name} must be positive, got {getattr(self, name)!r}")


class HttpError(TransportError):
    """A request refused with an HTTP status; :func:`error_middleware` answers it as a JSON error."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _STATUS_CODES.get(status, "bad_request")


def raw_error_response(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 JSON error answer for a connection that never reaches aiohttp."""
    body = json.dumps(error_event(message, code=code)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGuard:
    """Counts open connections per client address and makes the guarded protocol for each socket."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self._per_address: Counter[str] = Counter()
        self.lingering = 0
        """Refused connections still draining their request; bounded by ``max_connections``."""

    @property
    def open_connections(self) -> int:
        return sum(self._per_address.values())

    def connections_from(self, address: str) -> int:
        return self._per_address[address]

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """What ``loop.create_server`` takes: ``inner`` (aiohttp's server) behind the guard."""
        return lambda: GuardedConnection(self, inner)

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address``; or the reason it is refused (and not counted)."""
        if self._per_address[address] >= self.limits.max_connections_per_address:
            return f"too many open connections from {address}; close some and retry"
        if self.open_connections >= self.limits.max_connections:
            return "the server has too many open connections; retry later"
        self._per_address[address] += 1
        return None

    def release(self, address: str) -> None:
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    @staticmethod
    def request_arrived(transport: asyncio.BaseTransport | None) -> None:
        """A complete request head arrived on ``transport``: its header deadline no longer applies."""
        protocol = transport.get_protocol() if transport is not None else None
        if isinstance(protocol, GuardedConnection):
            protocol.request_arrived()


class GuardedConnection(asyncio.Protocol):
    """One accepted socket: admitted by the guard, then handed to aiohttp's protocol unchanged."""

    def __init__(self, guard: ConnectionGuard, inner_factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._inner_factory = inner_factory
        self._inner: asyncio.Protocol | None = None
        self._address: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        refusal = self._guard.admit(address)
        if refusal is not None:
            self._refuse(transport, address, refusal)
            return
        self._address = address
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.limits.header_timeout_s, self._headers_overdue)
        self._inner = self._inner_factory()
        self._inner.connection_made(transport)

    def _refuse(self, transport: asyncio.BaseTransport, address: str, refusal: str) -> None:
        """Answer 503 and close after at most ``LINGER_S`` of reading and dropping the client's request."""
        logger.info("connection refused", extra={"address": address, "reason": refusal})
        if not isinstance(transport, asyncio.Transport) or self._guard.lingering >= self._guard.limits.max_connections:
            transport.close()
            return
        self._guard.lingering += 1
        self._lingering = True
        transport.write(raw_error_response(503, "Service Unavailable", refusal, "busy"))
        if transport.can_write_eof():
            transport.write_eof()
        self._deadline = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)

    def request_arrived(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_overdue(self) -> None:
        self._deadline = None
        logger.info("request headers too slow; closing", extra={"address": self._address})
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None  # refused: close

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.request_arrived()  # cancels the deadline (or the linger)
        if self._lingering:
            self._guard.lingering -= 1
        if self._address is not None:
            self._guard.release(self._address)
            self._address = None
        if self._inner is not None:
            self._inner.connection_lost(exc)
        self._transport = None


Handler = Callable[[Any], Awaitable[Any]]


def error_middleware() -> Any:
    """aiohttp middleware: marks each request's headers as arrived for the guard, answers
    :class:`HttpError`, aiohttp's HTTP errors and any failure as a JSON error, and closes the
    connection after an error (a client that sent a bad request gets no second chance on it)."""
    web: Any = require("aiohttp.web", "webrtc")

    def json_error(status: int, code: str, message: str) -> Any:
        response = web.json_response(error_event(message, code=code), status=status)
        response.force_close()
        return response

    @web.middleware  # type: ignore[untyped-decorator]
    async def middleware(request: Any, handler: Handler) -> Any:
        ConnectionGuard.request_arrived(request.transport)
        try:
            return await handler(request)
        except TransportError as exc:  # a malformed request, unless the refusal names its status
            if isinstance(exc, HttpError):
                return json_error(exc.status, exc.code, str(exc))
            return json_error(400, "bad_request", str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_error(exc.status, _STATUS_CODES.get(exc.status, "bad_request"), exc.text or exc.reason)
        except Exception:
            logger.exception("request failed", extra={"path": request.path})
            return json_error(500, "internal", "the server failed on this request; its log says why")

    return middleware
