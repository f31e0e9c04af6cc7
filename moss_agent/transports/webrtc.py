"""WebRTC transport: an aiohttp server that answers browser (or aiortc) offers, one handler per peer.

Routes: ``GET /`` the voice page (``web/index.html`` + ``web/app.js``), ``GET /ice`` the STUN/TURN
servers for the page (token-protected: TURN credentials), ``POST /offer`` signaling
(JSON ``{"sdp", "type": "offer"}`` -> answer; bearer token or ``?token=``). Audio: one sendrecv
audio transceiver; inbound Opus is decoded by aiortc and fed, resampled, to ``conn.input``; outbound
audio is pulled from ``conn.output`` (a PlaybackBuffer at 48 kHz) by a track paced at 20 ms.
Events and control travel as JSON over the RTCDataChannel the client opens (label ``events``).

Everything from the network is untrusted: bodies and data-channel messages go through the guarded
decoder (``moss_agent.wire``), the SDP is checked before aiortc parses it, the HTTP side is bounded
by ``webrtc_http`` (deadlines, connections per address) and every refusal is a JSON error.

The tracks (outbound pacing, its start buffer and figures) live in ``webrtc_track``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import re
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moss_agent._optional import require
from moss_agent.errors import ConfigError, TransportError
from moss_agent.transports.capture import QueueAudioInput
from moss_agent.transports.connection import (
    Connection,
    ConnectionHandler,
    JsonDict,
    error_event,
    parse_control,
)
from moss_agent.transports.playback import PlaybackBuffer
from moss_agent.transports.webrtc_http import (
    LINGER_S,
    ConnectionGuard,
    HttpError,
    HttpLimits,
    error_middleware,
)
from moss_agent.transports.webrtc_track import (
    RTC_RATE,
    StartBuffer,
    make_paced_track,
    outbound_stats,
    pump_track,
)
from moss_agent.wire import decode_json_object

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")
LOOPBACK = "127.0.0.1"
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", re.IGNORECASE)
_EVENT_BACKLOG = 256
_CONGESTED_BYTES = 256 * 1024
_SDP_CONTROL_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_SDP_CHARS = 32 * 1024
MAX_MEDIA_SECTIONS = 8
MAX_CLIENT_ID_CHARS = 128
MAX_CONTROL_BYTES = 64 * 1024


NO_NETWORK_MESSAGE = (
    "this server found no network address for WebRTC audio (no interface but loopback); "
    "restart it with --loopback-only for a browser on the same machine"
)
NO_NETWORK_HINT = (
    "WebRTC found no network interface to offer (only loopback); offers are refused until the server "
    "is started with --loopback-only (a browser on this machine) or the host has a network"
)
ICE_FAILED_HINT = (
    "a WebRTC peer did not connect (ICE failed or timed out); on a host without a usable network "
    "interface start the server with --loopback-only, across NAT give it --ice-server"
)
NO_OFFER_CANDIDATES = (
    "the browser offered no network address (ICE candidate); the audio will probably not connect"
)
NO_OFFER_CANDIDATES_LOOPBACK = (
    "the browser offered no 127.0.0.1 address and this server (--loopback-only) accepts no other; "
    "restart it without --loopback-only if this machine has a network"
)
_LLM_FAILURES = frozenset({"connection", "status", "timeout", "protocol"})


def _host_addresses() -> list[str]:
    """The addresses aioice would offer as host candidates (it leaves out loopback)."""
    ice: Any = require("aioice.ice", "webrtc")
    return list(ice.get_host_addresses(use_ipv4=True, use_ipv6=True))


def candidate_addresses(sdp: str) -> list[str]:
    """The addresses of the ``a=candidate`` lines of ``sdp``, in order."""
    return [match.group(1) for line in sdp.splitlines() if (match := _CANDIDATE.match(line))]


def browser_safe(message: JsonDict, connection_id: str = "") -> JsonDict:
    """``message`` as a browser user may see it: the session's error events (their text can name the
    LLM or speech server and its address) become a generic error; the detail goes to the log."""
    if message.get("type") != "error_event":
        return message
    detail = message.get("detail") if isinstance(message.get("detail"), dict) else {}
    kind = detail.get("kind") if isinstance(detail, dict) else None
    if kind in _LLM_FAILURES:
        text = "the language model did not answer; try again (the server log says why)"
    elif kind == "stt":
        text = "speech recognition failed on that; try again (the server log says why)"
    else:
        text = "the agent hit a problem on the server; the server log says why"
    # A fixed template with the detail as an argument: the operator needs the text, which the
    # CLI's log format would not show from ``extra``.
    logger.warning("agent error (the browser got a generic message): %s", message.get("message"),
                   extra={"connection": connection_id, "kind": kind})  # fmt: skip
    safe: JsonDict = {"type": "error", "code": "agent", "message": text, "fatal": bool(message.get("fatal"))}
    if isinstance(message.get("turn_id"), int) and message["turn_id"] >= 0:
        safe["turn_id"] = message["turn_id"]
    return safe


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

    @property
    def attached(self) -> bool:
        return self._channel is not None

    async def send(self, message: JsonDict) -> None:
        self.post(message)

    def post(self, message: JsonDict) -> None:
        """Send without waiting (the channel buffers)."""
        self._backlog.append(json.dumps(message))
        self._drain()

    @property
    def pending(self) -> bool:
        """Messages the client has not acknowledged yet: waiting for the channel, in its send buffer or
        in flight. A zero ``bufferedAmount`` only means aiortc's SCTP association took the data;
        closing then would abort what it has not sent or not had acknowledged, so its queues (private,
        hence read defensively) count too."""
        channel = self._channel
        if self._backlog:
            return True
        if channel is None:
            return False
        association = getattr(channel, "transport", None)
        in_flight = getattr(association, "_outbound_queue", None) or getattr(association, "_sent_queue", None)
        return channel.bufferedAmount > 0 or bool(in_flight)

    @property
    def congested(self) -> bool:
        """The client is not reading what it is sent; replies to its own bad messages are then dropped
        rather than buffered without bound."""
        channel = self._channel
        return len(self._backlog) >= _EVENT_BACKLOG // 2 or (
            channel is not None and channel.bufferedAmount > _CONGESTED_BYTES
        )

    def _drain(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        while self._backlog:
            channel.send(self._backlog.popleft())


def parse_offer(body: JsonDict) -> str:
    """The SDP of a signaling request ``{"type": "offer", "sdp": "v=0..."}``, checked before aiortc
    parses it (aiortc's parser is not written for hostile input); TransportError says what is wrong."""
    sdp = body.get("sdp")
    if body.get("type") != "offer" or not isinstance(sdp, str):
        raise TransportError('expected JSON {"type": "offer", "sdp": "v=0..."}')
    if len(sdp) > MAX_SDP_CHARS:
        raise TransportError(f"the offer's SDP has {len(sdp)} characters; at most {MAX_SDP_CHARS} are accepted")
    if not sdp.startswith("v=0"):
        raise TransportError("the offer's SDP must start with 'v=0'")
    if not sdp.isascii():
        raise TransportError("the offer's SDP must be ASCII text")
    control = _SDP_CONTROL_CHAR.search(sdp)
    if control is not None:
        raise TransportError(f"the offer's SDP holds control character {control.group()!r} at {control.start()}")
    media = [line for line in sdp.splitlines() if line.startswith("m=")]
    if len(media) > MAX_MEDIA_SECTIONS:
        raise TransportError(f"the offer has {len(media)} m-lines; at most {MAX_MEDIA_SECTIONS} are accepted")
    if not any(line.startswith("m=audio ") for line in media):
        raise TransportError("the offer has no audio m-line; add an audio transceiver or track")
    return sdp


def _client_id(request: web.Request) -> str:
    client = request.query.get("client", "")
    if len(client) > MAX_CLIENT_ID_CHARS or not client.isprintable():
        raise TransportError(f"'client' must be printable text of at most {MAX_CLIENT_ID_CHARS} characters")
    return client


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
    TURN) for real networks and defaults to none. ``input_rate`` is the rate ``conn.input`` yields;
    ``output_rate`` the rate ``conn.output`` advertises (any rate is accepted and resampled to 48 kHz).

    Limits: at most ``max_peers`` peers at once, counted from the moment an offer is accepted until
    everything started for it is released; the handler runs only once a peer's media connects, and a
    peer not connected within ``connect_timeout_s`` of its offer is hung up. ``http_limits`` bounds
    the HTTP side (header and body deadlines, connections per address), ``max_offer_bytes`` the body.

    Outbound audio: a frame every 20 ms, silence between turns; the start of each turn's audio is
    held back by up to ``start_buffer_max_s`` when the producer was seen to run late (see
    ``webrtc_track.StartBuffer``; 0 never holds). ``conn.info["outbound"]`` has the track's figures.
    A host with no network interface for WebRTC refuses offers with a 503 saying to use
    ``loopback_only``; a peer whose ICE fails is logged with the same advice.
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
        http_limits: HttpLimits | None = None,
        start_buffer_max_s: float = 0.3,
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
        if start_buffer_max_s < 0:
            raise ConfigError(f"start_buffer_max_s must be >= 0, got {start_buffer_max_s}")
        self._start_buffer_max_s = start_buffer_max_s
        self._guard = ConnectionGuard(http_limits or HttpLimits())
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._peers: dict[str, _Peer] = {}
        self._ids = itertools.count(1)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}/"

    @property
    def connections(self) -> list[Connection]:
        """The peers being served (not those hanging up)."""
        return [peer.conn for peer in self._peers.values() if not peer.closing]

    @property
    def peers_held(self) -> int:
        """Peers holding resources, from their accepted offer until everything they started is released."""
        return len(self._peers)

    @property
    def http_connections(self) -> int:
        """Open HTTP connections (signaling and page), as the connection guard counts them."""
        return self._guard.open_connections

    async def start(self) -> str:
        """Bind and serve; returns the page URL."""
        web: Any = require("aiohttp.web", "webrtc")
        require("aiortc", "webrtc")
        if self._loopback_only:
            restrict_ice_to_loopback()
        elif not _host_addresses():
            logger.warning(NO_NETWORK_HINT)  # say it now, not only when the first browser calls
        app = web.Application(client_max_size=self._max_offer_bytes, middlewares=[error_middleware()])
        app.router.add_get("/", self._page)
        app.router.add_get("/app.js", self._script)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/ice", self._ice)
        # aiohttp's keep-alive timer closes a connection waiting for a complete request: with the
        # header deadline as its period it bounds every request's headers after the first.
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=self._guard.limits.header_timeout_s, lingering_time=LINGER_S
        )
        await self._runner.setup()
        aiohttp_server = self._runner.server
        assert aiohttp_server is not None  # set by setup()
        self._listener = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(aiohttp_server), self._host, self._port
        )
        self.port = self._listener.sockets[0].getsockname()[1]
        logger.info("webrtc server listening", extra={"url": self.url})
        return self.url

    async def stop(self) -> None:
        """Stop accepting, hang up every peer (their handlers are cancelled after the grace period)
        and close every HTTP connection."""
        if self._listener is not None:
            self._listener.close()
        results = await asyncio.gather(*(peer.close() for peer in list(self._peers.values())), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                logger.error("peer did not close cleanly", exc_info=result)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None

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
        self._check_token(request)
        servers = [ice_server_json(server) for server in self._ice_servers]
        response: web.StreamResponse = aio_web.json_response({"iceServers": servers})
        return response

    def _check_token(self, request: web.Request) -> None:
        if self._token is not None and not hmac.compare_digest(_bearer_token(request).encode(), self._token.encode()):
            raise HttpError(401, "missing or wrong token")

    async def _offer(self, request: web.Request) -> web.StreamResponse:
        """Signaling. The token, the body's size and arrival time, its JSON, the SDP and the peer limit
        are all checked before anything is started for the offer; refusals are JSON errors
        (error_middleware)."""
        aio_web: Any = require("aiohttp.web", "webrtc")
        self._check_token(request)
        body = decode_json_object(await self._read_body(request), what="the offer body", max_bytes=self._max_offer_bytes)
        sdp = parse_offer(body)
        client_id = _client_id(request)
        # The limit check and the registration happen with no await between them, so concurrent
        # offers cannot all pass the check before any of them is counted.
        if len(self._peers) >= self._max_peers:
            raise HttpError(503, f"the server is at its limit of {self._max_peers} peers; retry later", code="busy")
        peer = _Peer(self, f"rtc-{next(self._ids)}", client_id)
        self._peers[peer.conn.id] = peer
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                answer = await peer.answer(sdp)
        except TransportError:
            peer.begin_close()
            raise
        except TimeoutError:
            peer.begin_close()
            raise HttpError(503, "the offer could not be answered in time; retry later", code="busy") from None
        except asyncio.CancelledError:
            peer.begin_close()
            raise
        except Exception as exc:  # aiortc raises many kinds on SDP it cannot use
            logger.info("offer rejected", extra={"reason": repr(exc)[:200]})
            peer.begin_close()
            raise HttpError(400, f"the offer could not be used: {str(exc)[:200]}") from None
        response: web.StreamResponse = aio_web.json_response(answer)
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        declared = request.content_length
        if declared is not None and declared > self._max_offer_bytes:
            raise HttpError(413, f"the body is {declared} bytes; at most {self._max_offer_bytes} are accepted")
        timeout_s = self._guard.limits.body_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await request.read()
        except TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {timeout_s} s") from None


class _Peer:
    """One RTCPeerConnection, its Connection and the tasks that serve it; all of them end in ``close``."""

    def __init__(self, server: WebRTCServer, peer_id: str, client_id: str) -> None:
        aiortc = require("aiortc", "webrtc")
        self._server = server
        self._pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=server._ice_servers))
        self._events = EventChannel()
        self.output = PlaybackBuffer(
            RTC_RATE, sample_rate=server._output_rate, max_buffer_s=server._playback_buffer_s
        )
        self.input = QueueAudioInput(server._input_rate)
        self.conn = Connection(peer_id, self.input, self.output, self._send_event, client_id=client_id)
        self.client_stats: JsonDict = {}
        self.outbound = outbound_stats()
        self.conn.info["outbound"] = self.outbound
        self._tasks: set[asyncio.Task[None]] = set()
        self._handler_task: asyncio.Task[None] | None = None
        self._inbound_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._dropped_errors = 0
        self._connected = asyncio.Event()
        self._pc.on("datachannel", self._on_datachannel)
        self._pc.on("track", self._on_track)
        self._pc.on("connectionstatechange", self._on_state)

    @property
    def closing(self) -> bool:
        return self._close_task is not None

    async def answer(self, offer_sdp: str) -> JsonDict:
        aiortc = require("aiortc", "webrtc")
        if self._server._loopback_only:
            offer_sdp = filter_candidates(offer_sdp, {LOOPBACK})
        await self._pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=offer_sdp, type="offer"))
        audio = [t for t in self._pc.getTransceivers() if t.kind == "audio"]
        if not audio:
            raise TransportError("the offer has no audio m-line; add an audio transceiver or track")
        start_buffer = StartBuffer(max_s=self._server._start_buffer_max_s)
        audio[0].sender.replaceTrack(
            make_paced_track(self.output, start_buffer=start_buffer, stats=self.outbound)
        )
        audio[0].direction = "sendrecv"
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        local = self._pc.localDescription
        if not candidate_addresses(local.sdp):
            logger.warning(NO_NETWORK_HINT)
            raise HttpError(503, NO_NETWORK_MESSAGE, code="no_network")
        answer: JsonDict = {"sdp": local.sdp, "type": local.type, "connection_id": self.conn.id}
        if not candidate_addresses(offer_sdp):
            # Peer-reflexive candidates may still connect, so this is a warning, not a refusal.
            answer["warning"] = (
                NO_OFFER_CANDIDATES_LOOPBACK if self._server._loopback_only else NO_OFFER_CANDIDATES
            )
            logger.warning(
                "the offer has no ICE candidate this server can use", extra={"connection": self.conn.id}
            )
        self._spawn(self._watch_connect(), "connect")
        return answer

    async def _watch_connect(self) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), self._server._connect_timeout_s)
        except TimeoutError:
            logger.warning(
                ICE_FAILED_HINT, extra={"connection": self.conn.id, "state": self._pc.iceConnectionState}
            )
            self.begin_close()

    def _on_state(self) -> None:
        state = self._pc.connectionState
        if state == "connected" and self._handler_task is None and not self.closing:
            # The handler (a Session, a VAD, an engine slot) starts only for a peer that connected.
            self._connected.set()
            self._handler_task = self._spawn(self._run_handler(), "handler")
        elif state in ("failed", "closed"):
            if state == "failed" and not self._connected.is_set() and not self.closing:
                logger.warning(ICE_FAILED_HINT, extra={"connection": self.conn.id, "state": state})
            self.begin_close()

    async def _run_handler(self) -> None:
        try:
            await self._server._handler(self.conn)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("connection handler failed", extra={"connection": self.conn.id})
            with contextlib.suppress(Exception):  # the channel may be gone already
                message = "the agent failed; the server log says why"
                await self.conn.send_event(error_event(message, code="internal", fatal=True))
        finally:
            if not self.closing:
                self._spawn(self._close_when_flushed(), "flush")

    async def _close_when_flushed(self) -> None:
        """Hang up once the handler's last events reached the network (its goodbye or refusal may be
        sent before the client's data channel is even open), or after the grace period."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._server._grace_s):
                while self._events.pending:
                    await asyncio.sleep(0.02)
        self.begin_close()

    async def _send_event(self, message: JsonDict) -> None:
        await self._events.send(browser_safe(message, self.conn.id))

    def _spawn(self, coro: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"webrtc-{role}-{self.conn.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("peer task failed", exc_info=task.exception(), extra={"task": task.get_name()})

    def _on_datachannel(self, channel: Any) -> None:
        if self._events.attached:  # one control channel per peer; more would only multiply work
            channel.close()
            return
        self._events.attach(channel)

        @channel.on("message")  # type: ignore[untyped-decorator]
        def _message(raw: object) -> None:
            self._on_message(raw)

    def _on_message(self, raw: object) -> None:
        """One data-channel message. Nothing it holds may escape: an exception raised here would end
        aiortc's SCTP task, and with it this peer's data channel."""
        try:
            self._apply_message(raw)
        except TransportError as exc:
            self._reply_error(str(exc), code="bad_request")
        except Exception:
            logger.exception("control message failed", extra={"connection": self.conn.id})
            self._reply_error("the control message could not be handled; the server log says why", code="internal")

    def _apply_message(self, raw: object) -> None:
        if not isinstance(raw, str | bytes):
            raise TransportError("control messages are JSON objects sent as text")
        message = decode_json_object(raw, what="the control message", max_bytes=MAX_CONTROL_BYTES)
        if message.get("type") == "stats":
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

    def _reply_error(self, message: str, *, code: str) -> None:
        if self.conn.closed.is_set():
            return
        if self._events.congested:
            self._dropped_errors += 1
            if self._dropped_errors == 1:
                logger.warning("client is not reading; error replies dropped", extra={"connection": self.conn.id})
            return
        self._events.post(error_event(message, code=code))

    def _on_track(self, track: Any) -> None:
        # The answer sends and receives on the first audio transceiver only; other tracks are ignored.
        if track.kind == "audio" and self._inbound_task is None and not self.closing:
            self._inbound_task = self._spawn(pump_track(track, self.input), "inbound")

    def begin_close(self) -> asyncio.Task[None]:
        """Start hanging up (once); the returned task ends when everything this peer started is released."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(
                self._release(), name=f"webrtc-close-{self.conn.id}"
            )
        return self._close_task

    async def close(self) -> None:
        await asyncio.shield(self.begin_close())

    async def _release(self) -> None:
        """Hang up, give the handler its grace period, then cancel and await every task of this peer.

        aiortc never ends the inbound track of a peer that did not connect, so its pump is cancelled
        here like every other task; the peer's place under ``max_peers`` is given back last.
        """
        try:
            self.input.close()
            self.output.close()
            self.conn.mark_closed()
            try:
                await self._pc.close()
            except Exception:
                logger.warning("peer connection did not close cleanly", exc_info=True, extra={"connection": self.conn.id})
            handler = self._handler_task
            if handler is not None and not handler.done():
                await asyncio.wait({handler}, timeout=self._server._grace_s)
            while self._tasks:
                pending = set(self._tasks)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
        finally:
            self._server._peers.pop(self.conn.id, None)
