"""WebRTC transport: an aiohttp server that answers browser (or aiortc) offers, one handler per peer.

Routes: ``GET /`` the voice page (``web/index.html`` + ``web/app.js``), ``GET /ice`` the STUN/TURN
servers for the page (token-protected: TURN credentials), ``POST /offer`` signaling
(JSON ``{"sdp", "type": "offer"}`` -> answer; bearer token or ``?token=``). Audio: one sendrecv
audio transceiver; inbound Opus is decoded by aiortc and fed, resampled, to ``conn.input``; outbound
audio is pulled from ``conn.output`` (a PlaybackBuffer at 48 kHz) by a track paced at 20 ms.
Events and control travel as JSON over the RTCDataChannel the client opens (label ``events``).

Track pacing follows aiortc's own AudioStreamTrack (wall-clock schedule in ``recv()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import hmac
import itertools
import json
import logging
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moss_agent._optional import require
from moss_agent.audio import float_to_pcm16
from moss_agent.errors import ConfigError, TransportError
from moss_agent.transports.capture import QueueAudioInput, av_frame_to_mono
from moss_agent.transports.connection import (
    Connection,
    ConnectionHandler,
    JsonDict,
    error_event,
    parse_control,
)
from moss_agent.transports.playback import FramePacer, PlaybackBuffer

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger(__name__)

RTC_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz: what Opus in WebRTC expects per packet
WEB_DIR = Path(__file__).with_name("web")
LOOPBACK = "127.0.0.1"
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", re.IGNORECASE)
_EVENT_BACKLOG = 256


def restrict_ice_to_loopback() -> None:
    """Make aiortc gather and accept ICE on 127.0.0.1 only (process-wide; for tests and local demos).

    aioice skips loopback addresses on purpose and offers every LAN address instead; this replaces its
    host address lookup and ignores connectivity checks that do not come from 127.0.0.1, so the only
    pair that can succeed is 127.0.0.1 <-> 127.0.0.1. Idempotent.
    """
    ice: Any = require("aioice.ice", "webrtc")
    if getattr(ice, "_moss_loopback_only", False):
        return
    original_request_received = ice.Connection.request_received

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [LOOPBACK] if use_ipv4 else []

    def request_received(self: Any, message: Any, addr: tuple[str, int], protocol: Any) -> None:
        if addr[0] != LOOPBACK:
            return
        original_request_received(self, message, addr, protocol)

    ice.get_host_addresses = host_addresses
    ice.Connection.request_received = request_received
    ice._moss_loopback_only = True


def filter_candidates(sdp: str, allowed: set[str]) -> str:
    """Drop ``a=candidate`` lines whose address is not in ``allowed`` (e.g. LAN or mDNS ones)."""
    kept = []
    for line in sdp.splitlines():
        match = _CANDIDATE.match(line)
        if match and match.group(1) not in allowed:
            continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


def _track_base() -> type:
    return require("aiortc", "webrtc").MediaStreamTrack  # type: ignore[no-any-return]


def make_paced_track(buffer: PlaybackBuffer, *, pacer: FramePacer | None = None) -> Any:
    """An aiortc audio track that plays ``buffer`` (48 kHz) in 20 ms stereo s16 frames.

    Silence when the buffer is starved; pts advances by 960 per frame in 1/48000 units. Stereo,
    because aiortc's Opus encoder upmixes mono with a -3 dB gain.
    """
    av = require("av", "webrtc")
    if buffer.play_rate != RTC_RATE:
        raise ConfigError(f"a WebRTC track plays 48 kHz audio; the buffer plays at {buffer.play_rate} Hz")
    paced = pacer or FramePacer(FRAME_SAMPLES, RTC_RATE)
    time_base = fractions.Fraction(1, RTC_RATE)

    class PacedAudioTrack(_track_base()):  # type: ignore[misc]
        kind = "audio"

        async def recv(self) -> Any:
            if self.readyState != "live":
                raise require("aiortc.mediastreams", "webrtc").MediaStreamError
            pts = await paced.next()
            pcm, _ = buffer.pull(FRAME_SAMPLES)
            stereo = np.repeat(float_to_pcm16(pcm), 2).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
            frame.sample_rate = RTC_RATE
            frame.pts = pts
            frame.time_base = time_base
            return frame

    return PacedAudioTrack()


async def pump_track(track: Any, sink: QueueAudioInput, on_frame: Callable[[Any], None] | None = None) -> None:
    """Feed every frame of a remote audio track into ``sink`` until the track ends; then close it.

    ``on_frame`` sees each decoded PyAV frame first (statistics: pts, rate, size).
    """
    media_error = require("aiortc.mediastreams", "webrtc").MediaStreamError
    try:
        while True:
            try:
                frame = await track.recv()
            except media_error:
                return
            if on_frame is not None:
                on_frame(frame)
            sink.feed(av_frame_to_mono(frame), frame.sample_rate)
    finally:
        sink.close()


class EventChannel:
    """JSON messages over an RTCDataChannel; messages sent before it opens wait in a small backlog."""

    def __init__(self) -> None:
        self._channel: Any = None
        self._backlog: deque[str] = deque(maxlen=_EVENT_BACKLOG)

    def attach(self, channel: Any) -> None:
        self._channel = channel

        @channel.on("open")  # type: ignore[untyped-decorator]
        def _opened() -> None:
            self._drain()

        self._drain()

    async def send(self, message: JsonDict) -> None:
        self._backlog.append(json.dumps(message))
        self._drain()

    @property
    def pending(self) -> bool:
        """Messages not yet handed to the network: waiting for the channel, or in its send buffer."""
        channel = self._channel
        return bool(self._backlog) or (channel is not None and channel.bufferedAmount > 0)

    def _drain(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        while self._backlog:
            channel.send(self._backlog.popleft())


def _bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("token", "")


def ice_servers_from_urls(urls: list[str], username: str | None = None, credential: str | None = None) -> list[Any]:
    """``aiortc.RTCIceServer`` objects from ``stun:``/``turn:``/``turns:`` URLs; the username and
    credential go with the TURN ones (STUN takes none)."""
    aiortc = require("aiortc", "webrtc")
    servers = []
    for url in urls:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("stun", "turn", "turns"):
            raise ConfigError(f"ICE server {url!r}: expected a stun:, turn: or turns: URL")
        if scheme == "stun":
            servers.append(aiortc.RTCIceServer(urls=url))
        elif not username or not credential:
            raise ConfigError(f"TURN server {url!r} needs a username and a credential")
        else:
            servers.append(aiortc.RTCIceServer(urls=url, username=username, credential=credential))
    return servers


def ice_server_json(server: Any) -> JsonDict:
    """An ``aiortc.RTCIceServer`` in the browser's RTCIceServer dictionary form."""
    entry: JsonDict = {"urls": server.urls}
    if server.username:
        entry["username"] = server.username
        entry["credential"] = server.credential
    return entry


class WebRTCServer:
    """Serves the voice page and WebRTC signaling; calls ``handler(conn)`` once per connected peer.

    ``token=None`` disables authentication (only sensible on 127.0.0.1). ``loopback_only`` keeps ICE
    on 127.0.0.1 (tests, local demos); ``ice_servers`` is a list of ``aiortc.RTCIceServer`` (STUN/
    TURN) for real networks and defaults to none. A peer whose media has not connected within
    ``connect_timeout_s`` of its offer is hung up, so abandoned offers do not hold handlers. ``input_rate`` is the rate ``conn.input`` yields;
    ``output_rate`` the rate ``conn.output`` advertises (any rate is accepted and resampled to 48 kHz).
    """

    def __init__(
        self,
        handler: ConnectionHandler,
        *,
        token: str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        input_rate: int = 24_000,
        output_rate: int = 24_000,
        ice_servers: list[Any] | None = None,
        loopback_only: bool = False,
        max_peers: int = 32,
        max_offer_bytes: int = 64 * 1024,
        playback_buffer_s: float = 1.0,
        handler_grace_s: float = 2.0,
        connect_timeout_s: float = 30.0,
    ) -> None:
        if token is not None and not token:
            raise ConfigError("token must be a non-empty string, or None to disable authentication")
        self._handler = handler
        self._token = token
        self._host = host
        self._port = port
        self._input_rate = input_rate
        self._output_rate = output_rate
        self._ice_servers = list(ice_servers or [])
        self._loopback_only = loopback_only
        self._max_peers = max_peers
        self._max_offer_bytes = max_offer_bytes
        self._playback_buffer_s = playback_buffer_s
        self._grace_s = handler_grace_s
        self._connect_timeout_s = connect_timeout_s
        self._runner: web.AppRunner | None = None
        self._peers: dict[str, _Peer] = {}
        self._ids = itertools.count(1)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}/"

    @property
    def connections(self) -> list[Connection]:
        return [peer.conn for peer in self._peers.values()]

    async def start(self) -> str:
        """Bind and serve; returns the page URL."""
        web: Any = require("aiohttp.web", "webrtc")
        require("aiortc", "webrtc")
        if self._loopback_only:
            restrict_ice_to_loopback()
        app = web.Application(client_max_size=self._max_offer_bytes)
        app.router.add_get("/", self._page)
        app.router.add_get("/app.js", self._script)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/ice", self._ice)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        if server is not None and getattr(server, "sockets", None):
            self.port = server.sockets[0].getsockname()[1]
        logger.info("webrtc server listening", extra={"url": self.url})
        return self.url

    async def stop(self) -> None:
        """Hang up every peer (their handlers are cancelled after the grace period) and stop serving."""
        await asyncio.gather(*(peer.close() for peer in list(self._peers.values())), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebRTCServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return self._static("index.html")

    async def _script(self, request: web.Request) -> web.StreamResponse:
        return self._static("app.js")

    def _static(self, name: str) -> web.StreamResponse:
        aio_web: Any = require("aiohttp.web", "webrtc")
        response: web.StreamResponse = aio_web.FileResponse(WEB_DIR / name, headers={"Cache-Control": "no-store"})
        return response

    async def _ice(self, request: web.Request) -> web.StreamResponse:
        """The STUN/TURN servers the page's RTCPeerConnection should use, in the browser's
        ``iceServers`` form; behind the token because TURN credentials are secrets."""
        aio_web: Any = require("aiohttp.web", "webrtc")
        if not self._authorized(request):
            return aio_web.json_response(error_event("missing or wrong token", code="unauthorized"), status=401)
        servers = [ice_server_json(server) for server in self._ice_servers]
        response: web.StreamResponse = aio_web.json_response({"iceServers": servers})
        return response

    def _authorized(self, request: web.Request) -> bool:
        return self._token is None or hmac.compare_digest(_bearer_token(request).encode(), self._token.encode())

    async def _offer(self, request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse = await self._answer_offer(request)
        return response

    async def _answer_offer(self, request: web.Request) -> Any:
        web: Any = require("aiohttp.web", "webrtc")
        if not self._authorized(request):
            return web.json_response(error_event("missing or wrong token", code="unauthorized"), status=401)
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response(
                error_event(f"offer larger than {self._max_offer_bytes} bytes", code="too_large"), status=413
            )
        except (ValueError, UnicodeDecodeError):
            return web.json_response(error_event("the body is not JSON"), status=400)
        if (
            not isinstance(body, dict)
            or body.get("type") != "offer"
            or not isinstance(body.get("sdp"), str)
            or not body["sdp"].startswith("v=0")
        ):
            return web.json_response(
                error_event('expected JSON {"type": "offer", "sdp": "v=0..."}'), status=400
            )
        if len(self._peers) >= self._max_peers:
            return web.json_response(
                error_event("server is at its peer limit; retry later", code="busy"), status=503
            )
        peer = _Peer(self, f"rtc-{next(self._ids)}", request.query.get("client", ""))
        try:
            answer = await peer.answer(body["sdp"])
        except TransportError as exc:
            await peer.close()
            return web.json_response(error_event(str(exc)), status=400)
        except Exception as exc:  # aiortc raises many kinds on bad SDP; none may take the server down
            logger.info("offer rejected", extra={"reason": repr(exc)})
            await peer.close()
            return web.json_response(error_event(f"the offer could not be used: {exc}"), status=400)
        self._peers[peer.conn.id] = peer
        peer.start_handler()
        return web.json_response(answer)


class _Peer:
    """One RTCPeerConnection, its Connection and the tasks that serve it."""

    def __init__(self, server: WebRTCServer, peer_id: str, client_id: str) -> None:
        aiortc = require("aiortc", "webrtc")
        self._server = server
        self._pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=server._ice_servers))
        self._events = EventChannel()
        self.output = PlaybackBuffer(
            RTC_RATE, sample_rate=server._output_rate, max_buffer_s=server._playback_buffer_s
        )
        self.input = QueueAudioInput(server._input_rate)
        self.conn = Connection(peer_id, self.input, self.output, self._events.send, client_id=client_id)
        self.client_stats: JsonDict = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._handler_task: asyncio.Task[None] | None = None
        self._closing = False
        self._connected = asyncio.Event()
        self._pc.on("datachannel", self._on_datachannel)
        self._pc.on("track", self._on_track)
        self._pc.on("connectionstatechange", self._on_state)

    async def answer(self, offer_sdp: str) -> JsonDict:
        aiortc = require("aiortc", "webrtc")
        if self._server._loopback_only:
            offer_sdp = filter_candidates(offer_sdp, {LOOPBACK})
        await self._pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=offer_sdp, type="offer"))
        audio = [t for t in self._pc.getTransceivers() if t.kind == "audio"]
        if not audio:
            raise TransportError("the offer has no audio m-line; add an audio transceiver or track")
        audio[0].sender.replaceTrack(make_paced_track(self.output))
        audio[0].direction = "sendrecv"
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        local = self._pc.localDescription
        return {"sdp": local.sdp, "type": local.type, "connection_id": self.conn.id}

    def start_handler(self) -> None:
        self._handler_task = self._spawn(self._run_handler(), f"webrtc-handler-{self.conn.id}")
        self._spawn(self._watch_connect(), f"webrtc-connect-{self.conn.id}")

    async def _watch_connect(self) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), self._server._connect_timeout_s)
        except TimeoutError:
            logger.info("peer never connected; hanging up", extra={"connection": self.conn.id})
            await self.close()

    async def _run_handler(self) -> None:
        try:
            await self._server._handler(self.conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("connection handler failed", extra={"connection": self.conn.id})
            with contextlib.suppress(Exception):
                await self.conn.send_event(error_event(f"the agent failed: {exc}", code="internal", fatal=True))
        finally:
            self._spawn(self._close_when_flushed(), f"webrtc-close-{self.conn.id}")

    async def _close_when_flushed(self) -> None:
        """Hang up once the handler's last events reached the network: its goodbye or refusal may
        be sent before the client's data channel is even open. Bounded by the connect timeout
        (the media must connect first) and then by the grace period."""
        if self._events.pending and not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), self._server._connect_timeout_s)
                async with asyncio.timeout(self._server._grace_s):
                    while self._events.pending and not self._closing:
                        await asyncio.sleep(0.02)
        await self.close()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_datachannel(self, channel: Any) -> None:
        self._events.attach(channel)

        @channel.on("message")  # type: ignore[untyped-decorator]
        def _message(raw: object) -> None:
            self._on_message(raw)

    def _on_message(self, raw: object) -> None:
        try:
            if not isinstance(raw, str) or len(raw) > 65_536:
                raise TransportError("control messages are JSON text of at most 64 KiB")
            try:
                message = json.loads(raw)
            except ValueError:
                raise TransportError("a control message is not valid JSON") from None
            if isinstance(message, dict) and message.get("type") == "stats":
                # Client-side figures (page playback energy, latency) kept for inspection, not control.
                self.client_stats = message
                self.conn.info["client_stats"] = message
                return
            control = parse_control(message)
            self.conn.deliver_control(control)
            if control["type"] == "close":
                # The client is leaving: end input and control so the handler winds down.
                self.input.close()
                self.conn.mark_closed()
        except TransportError as exc:
            self._spawn(self.conn.send_event(error_event(str(exc))), f"webrtc-error-{self.conn.id}")

    def _on_track(self, track: Any) -> None:
        if track.kind == "audio":
            self._spawn(pump_track(track, self.input), f"webrtc-inbound-{self.conn.id}")

    async def _on_state(self) -> None:
        if self._pc.connectionState == "connected":
            self._connected.set()
        if self._pc.connectionState in ("failed", "closed"):
            await self.close()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._server._peers.pop(self.conn.id, None)
        self.input.close()
        self.output.close()
        self.conn.mark_closed()
        await self._pc.close()
        task = self._handler_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            done, _ = await asyncio.wait({task}, timeout=self._server._grace_s)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
