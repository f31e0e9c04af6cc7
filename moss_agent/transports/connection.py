"""One client connection as a transport hands it to the application's handler.

Every network transport (WebRTC, MQTT) accepts clients and calls an injected
``async def handler(conn: Connection)`` once per client. The handler reads the user's audio from
``conn.input``, writes agent audio to ``conn.output``, sends JSON events with ``conn.send_event`` and
reads the client's control messages (``interrupt``, ``text``, ``close``...) from ``conn.control``.
When the handler returns, the transport hangs up; when the client hangs up, ``conn.input`` and
``conn.control`` end and ``conn.closed`` is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from moss_agent.errors import TransportError
from moss_agent.events import AudioChunk, Event
from moss_agent.transports.base import AudioInput, AudioOutput

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]
EventSender = Callable[[JsonDict], Awaitable[None]]
ConnectionHandler = Callable[["Connection"], Awaitable[None]]

CONTROL_TYPES = frozenset({"interrupt", "text", "close", "config", "ping"})
"""Control messages a client may send; anything else is answered with an error event."""

_CONTROL_QUEUE_LIMIT = 256
_CONTROL_TEXT_LIMIT = 16_384


class Connection:
    """A connected client: its audio both ways, an event sender and its control messages."""

    def __init__(
        self,
        connection_id: str,
        input: AudioInput,
        output: AudioOutput,
        send: EventSender,
        *,
        client_id: str = "",
        info: JsonDict | None = None,
    ) -> None:
        self.id = connection_id
        self.client_id = client_id
        self.input = input
        self.output = output
        self.info: JsonDict = dict(info or {})
        self.closed = asyncio.Event()
        self._send = send
        # Control is small and must never wait behind audio, so it has its own queue.
        self._control: asyncio.Queue[JsonDict | None] = asyncio.Queue(_CONTROL_QUEUE_LIMIT)

    async def send_event(self, event: JsonDict | Event) -> None:
        """Send a JSON event (a dict with a ``type``, or one of moss_agent.events) to the client.

        Events sent after the client left are dropped quietly: the handler may still be unwinding.
        """
        message = event if isinstance(event, dict) else event_to_json(event)
        if "type" not in message:
            raise TransportError("an event needs a 'type' field, e.g. {'type': 'transcript', ...}")
        if self.closed.is_set():
            return
        await self._send(message)

    @property
    def control(self) -> AsyncIterator[JsonDict]:
        """The client's control messages, in order; ends when the client disconnects."""
        return self._iter_control()

    async def _iter_control(self) -> AsyncIterator[JsonDict]:
        while True:
            message = await self._control.get()
            if message is None:
                return
            yield message

    def deliver_control(self, message: JsonDict) -> None:
        """Transport side: queue a validated control message (see ``parse_control``)."""
        if self.closed.is_set():
            return
        try:
            self._control.put_nowait(message)
        except asyncio.QueueFull:
            # A client flooding control messages loses the newest ones, never the connection.
            logger.warning("control queue full; message dropped", extra={"connection": self.id})

    def mark_closed(self) -> None:
        """Transport side: the client is gone; end ``control`` (``input`` is ended by its owner)."""
        if self.closed.is_set():
            return
        self.closed.set()
        while True:
            try:
                self._control.put_nowait(None)
                break
            except asyncio.QueueFull:
                self._control.get_nowait()


def parse_control(message: object) -> JsonDict:
    """Validate a decoded control message; raise TransportError saying what is wrong."""
    if not isinstance(message, dict):
        raise TransportError("a control message must be a JSON object like {'type': 'interrupt'}")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in CONTROL_TYPES:
        raise TransportError(
            f"unknown control message type {kind!r}; expected one of {sorted(CONTROL_TYPES)}"
        )
    if kind == "text":
        text = message.get("text")
        if not isinstance(text, str):
            raise TransportError("a 'text' control message needs a string 'text' field")
        if len(text) > _CONTROL_TEXT_LIMIT:
            raise TransportError(f"'text' is longer than {_CONTROL_TEXT_LIMIT} characters")
    return message


def error_event(message: str, *, code: str = "bad_request", fatal: bool = False) -> JsonDict:
    """The JSON error event every transport sends for a rejected message or a failure."""
    return {"type": "error", "code": code, "message": message, "fatal": fatal}


def event_to_json(event: Event) -> JsonDict:
    """A moss_agent event as a JSON-safe dict with a snake_case ``type`` (audio is summarised)."""
    if isinstance(event, AudioChunk):
        return {
            "type": "audio",
            "turn_id": event.turn_id,
            "duration_s": event.duration_s,
            "sample_rate": event.sample_rate,
        }
    name = type(event).__name__
    kind = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    body: JsonDict = {"type": kind}
    for field in dataclasses.fields(event):
        body[field.name] = _json_value(getattr(event, field.name))
    return body


def _json_value(value: Any) -> Any:
    """Arrays as lists, nested dataclasses (``WordTiming``) as dicts, tuples as lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_json_value(item) for item in value]
    return value
