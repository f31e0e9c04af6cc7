"""A Python WebRTC peer for a WebRTCServer: what a browser does, for tests, bots and load tools.

``client.output`` is the microphone (write AudioChunks; they are sent paced at 20 ms), ``client.input``
yields the agent's audio, ``client.events()`` the server's JSON events and ``send_control`` sends
``interrupt`` / ``text`` / ``close`` messages over the data channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from moss_agent._optional import require
from moss_agent.errors import TransportError
from moss_agent.transports.capture import QueueAudioInput
from moss_agent.transports.connection import JsonDict
from moss_agent.transports.playback import PlaybackBuffer
from moss_agent.transports.webrtc import LOOPBACK, filter_candidates, restrict_ice_to_loopback
from moss_agent.transports.webrtc_track import RTC_RATE, make_paced_track, pump_track
from moss_agent.wire import decode_json_object

logger = logging.getLogger(__name__)

_MAX_SERVER_MESSAGE_BYTES = 1024 * 1024


async def _read_at_most(response: Any, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes (enough for the decoder to say it is too large)."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


class WebRTCClient:
    """Connects to ``url`` (a WebRTCServer page URL) and exchanges audio and events with it."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        client_id: str = "",
        input_rate: int = 24_000,
        output_rate: int = 24_000,
        ice_servers: list[Any] | None = None,
        loopback_only: bool = False,
        timeout_s: float = 15.0,
        on_frame: Callable[[Any], None] | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._token = token
        self._client_id = client_id
        self._ice_servers = list(ice_servers or [])
        self._loopback_only = loopback_only
        self._timeout_s = timeout_s
        self._on_frame = on_frame
        self.output = PlaybackBuffer(RTC_RATE, sample_rate=output_rate)
        self.input = QueueAudioInput(input_rate)
        self.connection_id = ""
        self._events: asyncio.Queue[JsonDict | None] = asyncio.Queue()
        self._pc: Any = None
        self._channel: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()

    async def connect(self) -> None:
        """Offer, get the answer, and wait until media and the data channel are up."""
        aiortc = require("aiortc", "webrtc")
        aiohttp = require("aiohttp", "webrtc")
        if self._loopback_only:
            restrict_ice_to_loopback()
        pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=self._ice_servers))
        self._pc = pc
        pc.addTransceiver(make_paced_track(self.output), direction="sendrecv")
        channel = pc.createDataChannel("events")
        self._channel = channel
        opened = asyncio.Event()
        channel.on("open", opened.set)
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._events.put_nowait(None))

        @pc.on("track")  # type: ignore[untyped-decorator]
        def _track(track: Any) -> None:
            task = asyncio.get_running_loop().create_task(pump_track(track, self.input, self._on_frame), name="webrtc-client-inbound")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        if self._loopback_only:
            sdp = filter_candidates(sdp, {LOOPBACK})
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        params = {"client": self._client_id} if self._client_id else {}
        async with aiohttp.ClientSession() as http, http.post(
            f"{self._url}/offer", json={"sdp": sdp, "type": "offer"}, headers=headers, params=params
        ) as response:
            raw = await _read_at_most(response, _MAX_SERVER_MESSAGE_BYTES + 1)
        try:
            body = decode_json_object(raw, what="the signaling answer", max_bytes=_MAX_SERVER_MESSAGE_BYTES)
        except TransportError as exc:
            await pc.close()
            raise TransportError(f"signaling failed ({response.status}): {exc}") from None
        if response.status != 200:
            await pc.close()
            raise TransportError(f"signaling refused ({response.status}): {body.get('message', body)}")
        if not isinstance(body.get("sdp"), str):
            await pc.close()
            raise TransportError("the signaling answer has no 'sdp' string")
        self.connection_id = body.get("connection_id", "")
        answer = body["sdp"]
        if self._loopback_only:
            answer = filter_candidates(answer, {LOOPBACK})
        await pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=answer, type="answer"))
        try:
            await asyncio.wait_for(opened.wait(), self._timeout_s)
        except TimeoutError:
            await self.close()
            raise TransportError(f"the data channel did not open within {self._timeout_s} s") from None
        self.connected.set()

    def _on_message(self, raw: object) -> None:
        try:
            if not isinstance(raw, str | bytes):
                raise TransportError("server events are JSON text")
            message = decode_json_object(raw, what="a server event", max_bytes=_MAX_SERVER_MESSAGE_BYTES)
        except TransportError as exc:
            logger.warning("malformed event from server dropped", extra={"reason": str(exc)})
            return
        self._events.put_nowait(message)

    async def events(self) -> AsyncIterator[JsonDict]:
        """The server's events until the connection closes."""
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)
                return
            yield event

    async def send_control(self, message: JsonDict) -> None:
        if self._channel is None or self._channel.readyState != "open":
            raise TransportError("not connected; call connect() first")
        self._channel.send(json.dumps(message))

    async def send_raw(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message as is (for tests of the server's input validation)."""
        if self._channel is None:
            raise TransportError("not connected; call connect() first")
        self._channel.send(message)

    async def close(self) -> None:
        self.output.close()
        if self._pc is not None:
            await self._pc.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.input.close()
        self._events.put_nowait(None)

    async def __aenter__(self) -> WebRTCClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
