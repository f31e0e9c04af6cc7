"""MQTT transport: workers that serve sessions through one broker, and the client a device runs.

``MqttWorker(handler, settings).run()`` joins the MQTT 5 shared subscription
``$share/<group>/<root>/c/+/request``: the broker hands each session request to one worker, so
capacity grows by starting workers. Per session the worker subscribes to the session's ``up``
topics, calls ``handler(conn)`` and plays ``conn.output`` paced in 20 ms packets on ``down/audio``.
A worker's last will (``<root>/w/<id>/status`` ``online: false``) tells its clients when it dies;
its shared-subscription membership ends with its connection, so new sessions go to the others.

A worker never dies of a message: each one is handled on its own, and whatever goes wrong with it
is answered to its sender (rate-limited, ``MqttLimits``) and logged. A session ends when its device
says ``close``, when that client connection's last will arrives, or when nothing has been heard on
its ``up`` topics for ``MqttLimits.session_idle_s`` (the client sends ``keepalive`` while idle).

``MqttClient(settings)`` is the device side: ``open_session()`` returns an ``MqttClientSession``
with ``send_audio``, ``send_control``, ``audio`` (AudioInput of the agent's voice) and ``events()``.
Topic scheme and payloads: ``mqtt_protocol`` and docs/mqtt.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from moss_agent._optional import require
from moss_agent.errors import ConfigError, TransportError
from moss_agent.events import FloatArray
from moss_agent.transports.capture import QueueAudioInput
from moss_agent.transports.connection import (
    Connection,
    ConnectionHandler,
    JsonDict,
    error_event,
    parse_control,
)
from moss_agent.transports.mqtt_protocol import (
    FRAME_S,
    AudioDecoder,
    AudioEncoder,
    SessionRequest,
    TokenBucket,
    Topics,
    check_audio_format,
    check_name,
    check_topic_root,
    decode_audio_packet,
    encode_json,
    packet_seconds,
    parse_client_status,
    parse_session_request,
)
from moss_agent.transports.playback import FramePacer, PlaybackBuffer
from moss_agent.wire import decode_json_object

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is and who we are to it."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    topic_root: str = "moss/v1"
    keepalive_s: int = 10
    tls_context: ssl.SSLContext | None = None

    def client(
        self, identifier: str, will: tuple[str, bytes] | None = None, max_queued: int | None = None
    ) -> Any:
        """An aiomqtt client; ``max_queued`` bounds received-but-unhandled messages (None: unbounded)."""
        aiomqtt = require("aiomqtt", "mqtt")
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(will[0], will[1], qos=1) if will else None,
            clean_start=True,
            keepalive=self.keepalive_s,
            tls_context=self.tls_context,
            max_queued_incoming_messages=max_queued,
        )


class BrokerRefusedError(TransportError):
    """The broker refused this client for good (its login, client id or TLS certificate): trying
    again with the same settings cannot help. Other connection failures may pass (a restarting broker)."""


_REFUSED_LOGIN = {4, 5, 134, 135}
"""CONNACK codes for a refused login: MQTT 3 "bad username or password" and "not authorised",
MQTT 5 0x86 "Bad User Name or Password" and 0x87 "Not authorized"."""
_REFUSED_FOR_GOOD = _REFUSED_LOGIN | {1, 2, 132, 133, 138, 140}
"""... and the other CONNACK refusals a retry cannot change: protocol version, client id, banned,
authentication method. Server unavailable or busy, quotas and rates may pass."""


def _connect_error(exc: Exception, settings: MqttSettings) -> TransportError:
    """What went wrong connecting, in words: a refused login or certificate, or an unreachable broker."""
    where = f"the MQTT broker at {settings.host}:{settings.port}"
    who = f"user {settings.username!r}" if settings.username else "an anonymous login (no username given)"
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    if isinstance(code, int) and code in _REFUSED_LOGIN:
        hint = (
            "check the username and password" if settings.username
            else "this broker wants a username and password; give them"
        )  # fmt: skip
        return BrokerRefusedError(f"{where} refused {who}: not authorized (CONNACK code {code}); {hint}")
    if isinstance(code, int) and code in _REFUSED_FOR_GOOD:
        return BrokerRefusedError(f"{where} refused the connection of {who}: {exc}")
    if rc is not None:
        return TransportError(f"{where} refused the connection of {who} for now: {exc}")
    if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
        return BrokerRefusedError(
            f"the TLS certificate of {where} is not trusted: {exc}. Give the CA that signed it "
            "(MqttSettings.tls_context; --ca-file) or check the host name."
        )
    return TransportError(
        f"could not connect to {where}: {exc}. Check the address and that the broker is running."
    )


# ---------------------------------------------------------------------------------------------------
# worker


@dataclass(frozen=True)
class MqttLimits:
    """What one device may cost a worker (docs/mqtt.md, "Limits"). Shorter values suit tests."""

    session_idle_s: float = 30.0
    """A session that hears nothing from its device (audio, control, keepalive) this long ends."""
    audio_rate: float = 2.0
    """Audio one session accepts, in multiples of real time; packets beyond it are dropped undecoded."""
    audio_burst_s: float = 2.0
    """Seconds of audio a session may send at once above that rate (a network catching up)."""
    errors_per_s: float = 5.0
    error_burst: float = 20.0
    """Error events sent to one device; beyond them errors are only counted, so bad input cannot
    turn into an unbounded stream of replies."""
    max_queued_messages: int = 10_000
    """Requests and control messages received but not yet handled; new ones beyond this are dropped."""
    max_queued_audio: int = 5_000
    """Audio packets received but not yet handled (about 1.5 s of 64 sessions). Audio has a connection
    of its own, so when a flood outruns the worker's CPU only audio is dropped, never control."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ConfigError(f"MQTT limit {name} must be positive, got {value}")


class MqttWorker:
    """Serves sessions from the shared request subscription; one ``handler(conn)`` task per session."""

    def __init__(
        self,
        handler: ConnectionHandler,
        settings: MqttSettings,
        *,
        worker_id: str | None = None,
        group: str = "moss-workers",
        input_rate: int = 24_000,
        output_rate: int = 24_000,
        max_sessions: int = 64,
        playback_buffer_s: float = 1.0,
        limits: MqttLimits | None = None,
    ) -> None:
        self._handler = handler
        self._settings = settings
        self._topics = Topics(check_topic_root(settings.topic_root))
        self.worker_id = check_name(worker_id or uuid.uuid4().hex[:12], "worker id")
        self._group = check_name(group, "group")
        self._input_rate = input_rate
        self._output_rate = output_rate
        self._max_sessions = max_sessions
        self._playback_buffer_s = playback_buffer_s
        self.limits = limits or MqttLimits()
        self._sessions: dict[tuple[str, str], _WorkerSession] = {}
        self._error_budgets: dict[str, TokenBucket] = {}
        self.errors_suppressed = 0
        self._client: Any = None
        self._audio_client: Any = None
        self._tasks: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def run(self) -> None:
        """Serve until cancelled; then tell every client this worker is gone."""
        status = self._topics.worker_status(self.worker_id)
        offline = encode_json({"worker": self.worker_id, "online": False})
        mqtt_error = require("aiomqtt", "mqtt").MqttError
        client = self._settings.client(
            f"moss-worker-{self.worker_id}",
            will=(status, offline),
            max_queued=self.limits.max_queued_messages,
        )
        audio = self._settings.client(
            f"moss-worker-{self.worker_id}-audio", max_queued=self.limits.max_queued_audio
        )
        async with contextlib.AsyncExitStack() as connections:
            try:
                await connections.enter_async_context(client)
                await connections.enter_async_context(audio)
            except mqtt_error as exc:
                raise _connect_error(exc, self._settings) from exc
            self._client, self._audio_client = client, audio
            try:
                await client.subscribe(self._topics.shared_requests(self._group), qos=1)
                await client.publish(status, encode_json({"worker": self.worker_id, "online": True}), qos=1)
                self.ready.set()
                logger.info("mqtt worker ready", extra={"worker": self.worker_id})
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    tasks.create_task(
                        self._read(audio, yield_every=64), name=f"mqtt-worker-audio-{self.worker_id}"
                    )
                    await self._read(client, yield_every=1)
            finally:
                for session in list(self._sessions.values()):
                    session.hang_up()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.publish(status, offline, qos=1), 2)

    async def _read(self, client: Any, *, yield_every: int) -> None:
        """Handle one connection's messages. A backlog is drained in slices of ``yield_every``, so a flood
        of audio on one connection never holds up control on the other."""
        handled = 0
        async for message in client.messages:
            self._handle(str(message.topic), bytes(message.payload))
            handled += 1
            if handled % yield_every == 0:
                await asyncio.sleep(0)

    def _handle(self, topic: str, payload: bytes) -> None:
        """One message. Whatever goes wrong with it is answered to its sender and logged, never raised:
        the loop in ``run`` serves every other session."""
        try:
            self._dispatch(topic, payload)
        except Exception as exc:
            logger.exception("mqtt message could not be handled", extra={"topic": topic})
            self._answer(
                topic,
                error_event(
                    f"the worker could not handle this message ({type(exc).__name__})", code="internal"
                ),
            )

    def _dispatch(self, topic: str, payload: bytes) -> None:
        levels = self._topics.parse(topic)
        if len(levels) < 3 or levels[0] != "c":
            logger.warning("message on a topic outside the protocol", extra={"topic": topic})
            return
        client_id = levels[1]
        if len(levels) == 3 and levels[2] == "request":
            self._on_request(client_id, payload)
        elif len(levels) == 3 and levels[2] == "status":
            self._on_client_status(client_id, payload)
        elif len(levels) == 6 and levels[2] == "s" and levels[4] == "up":
            session = self._sessions.get((client_id, levels[3]))
            if session is not None:
                session.on_up(levels[5], payload)
            else:
                message = f"session {levels[3]!r} is not open on this worker (it ended or never started); open a new one"
                self._answer(topic, {**error_event(message, code="unknown_session"), "session": levels[3]})
        else:
            self._answer(topic, error_event(f"topic {topic!r} is not part of the protocol; see docs/mqtt.md"))

    def _answer(self, topic: str, event: JsonDict) -> None:
        """Send ``event`` to whoever published on ``topic``: its session's ``down/event`` if that session
        is open here, else its client's ``event`` topic. Nothing is sent for a topic with no client."""
        levels = self._topics.parse(topic)
        if len(levels) < 2 or levels[0] != "c":
            return
        session = (
            self._sessions.get((levels[1], levels[3])) if len(levels) >= 4 and levels[2] == "s" else None
        )
        target = session.event_topic if session is not None else self._topics.client_event(levels[1])
        self._send_error(levels[1], target, event)

    def _send_error(self, client_id: str, topic: str, event: JsonDict) -> None:
        """Publish an error event within ``client_id``'s error budget; beyond it, only count it."""
        budget = self._error_budgets.get(client_id)
        if budget is None:
            if len(self._error_budgets) >= 4096:  # forget devices whose budgets have refilled
                self._error_budgets = {c: b for c, b in self._error_budgets.items() if not b.full}
            budget = self._error_budgets[client_id] = TokenBucket(
                self.limits.errors_per_s, self.limits.error_burst
            )
        if budget.admit():
            self._publish_soon(topic, event)
            return
        self.errors_suppressed += 1
        if self.errors_suppressed % 1000 == 1:
            logger.warning(
                "error events over budget; not sent",
                extra={"client": client_id, "suppressed": self.errors_suppressed},
            )

    def _on_client_status(self, client_id: str, payload: bytes) -> None:
        """A client connection's last will: end the sessions that connection opened."""
        try:
            online, instance = parse_client_status(decode_json_object(payload, what="client status"))
        except TransportError as exc:
            self._send_error(client_id, self._topics.client_event(client_id), error_event(str(exc)))
            return
        if online:
            return
        for (owner, _), session in list(self._sessions.items()):
            if owner == client_id and session.instance == instance:
                session.hang_up()

    def _on_request(self, client_id: str, payload: bytes) -> None:
        try:
            request = parse_session_request(decode_json_object(payload, what="session request"))
        except TransportError as exc:
            self._send_error(client_id, self._topics.client_event(client_id), error_event(str(exc)))
            return
        key = (client_id, request.session)
        if key in self._sessions:
            return  # a retried request this worker already serves
        if len(self._sessions) >= self._max_sessions:
            self._send_error(
                client_id,
                self._topics.client_event(client_id),
                {
                    **error_event("all sessions of this worker are busy; retry", code="busy"),
                    "session": request.session,
                },
            )
            return
        session = _WorkerSession(self, client_id, request)
        self._sessions[key] = session
        assert self._tasks is not None
        self._tasks.create_task(session.run(), name=f"mqtt-session-{client_id}-{request.session}")

    def _publish_soon(self, topic: str, message: JsonDict) -> None:
        assert self._tasks is not None
        self._tasks.create_task(self._publish_quietly(topic, encode_json(message), 1), name="mqtt-publish")

    async def _publish_quietly(self, topic: str, payload: bytes, qos: int) -> None:
        try:
            await self._client.publish(topic, payload, qos=qos)
        except Exception as exc:  # a lost broker ends run(); a single publish failure must not
            logger.warning("mqtt publish failed", extra={"topic": topic, "error": repr(exc)})


class _WorkerSession:
    def __init__(self, worker: MqttWorker, client_id: str, request: SessionRequest) -> None:
        self._worker = worker
        self._topics = worker._topics
        self.client_id = client_id
        self.session_id = request.session
        self.instance = request.instance
        self.codec = request.codec
        self.rate = request.sample_rate
        self.event_topic = self._topics.down_event(client_id, self.session_id)
        self._decoder = AudioDecoder(self.codec, self.rate)
        limits = worker.limits
        self._audio_budget = TokenBucket(limits.audio_rate, limits.audio_burst_s)
        self._over_audio_limit = False
        self.dropped_audio_s = 0.0
        self._last_heard = asyncio.get_running_loop().time()
        self.input = QueueAudioInput(worker._input_rate)
        self.output = PlaybackBuffer(
            self.rate, sample_rate=worker._output_rate, max_buffer_s=worker._playback_buffer_s
        )
        self.conn = Connection(
            f"{client_id}/{self.session_id}",
            self.input,
            self.output,
            self._send_event,
            client_id=client_id,
            info={
                "session": self.session_id,
                "worker": worker.worker_id,
                "codec": self.codec,
                "sample_rate": self.rate,
            },
        )

    async def _send_event(self, message: JsonDict) -> None:
        await self._worker._publish_quietly(self.event_topic, encode_json(message), 1)

    def on_up(self, kind: str, payload: bytes) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        try:
            if kind == "audio":
                self._on_audio(payload)
            elif kind == "control":
                message = decode_json_object(payload, what="control message")
                if message.get("type") == "keepalive":
                    return  # transport-level: it only keeps the session from idling out
                message = parse_control(message)
                self.conn.deliver_control(message)
                if message["type"] == "close":
                    self.hang_up()
            else:
                raise TransportError(f"unknown up topic {kind!r}; use 'audio' or 'control'")
        except TransportError as exc:
            self._worker._send_error(self.client_id, self.event_topic, error_event(str(exc)))

    def _on_audio(self, payload: bytes) -> None:
        """Decode within the session's audio budget; packets over it are dropped before decoding, so a
        flood costs no codec time and no memory, and the device hears about it once per episode."""
        header, body = decode_audio_packet(payload)
        if self._over_audio_limit and self._audio_budget.full:
            self._over_audio_limit = False
        seconds = packet_seconds(header, body)
        if not self._audio_budget.admit(seconds):
            self.dropped_audio_s += seconds
            if not self._over_audio_limit:
                self._over_audio_limit = True
                limits = self._worker.limits
                logger.warning(
                    "audio over the session's rate limit; dropping", extra={"connection": self.conn.id}
                )
                message = (
                    f"audio arrives faster than {limits.audio_rate:g}x real time (burst {limits.audio_burst_s:g} s); "
                    "packets beyond that are dropped. Send audio at the pace it is recorded."
                )
                self._worker._send_error(
                    self.client_id, self.event_topic, error_event(message, code="rate_limited")
                )
            return
        pcm = self._decoder.decode_payload(header, body)
        if len(pcm):
            self.input.feed(pcm, self.rate)

    def hang_up(self) -> None:
        """The client left (or the worker stops): end input and control; the handler winds down."""
        self.input.close()
        self.output.close()
        self.conn.mark_closed()

    async def run(self) -> None:
        client, audio = self._worker._client, self._worker._audio_client
        control = self._topics.up_control(self.client_id, self.session_id)
        up_audio = self._topics.up_audio(self.client_id, self.session_id)
        status = self._topics.client_status(self.client_id)
        try:
            await audio.subscribe(up_audio, qos=0)
            await client.subscribe(control, qos=1)
            await client.subscribe(status, qos=1)
            await self._send_event(
                {
                    "type": "session.started",
                    "session": self.session_id,
                    "worker": self._worker.worker_id,
                    "codec": self.codec,
                    "sample_rate": self.rate,
                    "idle_timeout_s": self._worker.limits.session_idle_s,
                }
            )
            async with asyncio.TaskGroup() as tasks:
                helpers = [
                    tasks.create_task(self._send_audio(), name=f"mqtt-audio-{self.conn.id}"),
                    tasks.create_task(self._end_when_idle(), name=f"mqtt-idle-{self.conn.id}"),
                ]
                try:
                    await self._worker._handler(self.conn)
                except Exception as exc:
                    logger.exception("connection handler failed", extra={"connection": self.conn.id})
                    await self._send_event(
                        error_event(f"the agent failed: {exc}", code="internal", fatal=True)
                    )
                finally:
                    for helper in helpers:
                        helper.cancel()
            await self._send_event({"type": "session.ended", "session": self.session_id})
        finally:
            self.hang_up()
            self._worker._sessions.pop((self.client_id, self.session_id), None)
            with contextlib.suppress(Exception):
                await client.unsubscribe(control)
            with contextlib.suppress(Exception):
                await audio.unsubscribe(up_audio)
            if not any(c == self.client_id for c, _ in self._worker._sessions):
                with contextlib.suppress(Exception):
                    await client.unsubscribe(status)

    async def _end_when_idle(self) -> None:
        """A device that left without ``close`` or a last will (a clean disconnect) frees its session."""
        idle_s = self._worker.limits.session_idle_s
        loop = asyncio.get_running_loop()
        while (remaining := self._last_heard + idle_s - loop.time()) > 0:
            await asyncio.sleep(remaining)
        logger.info("session idle; ending it", extra={"connection": self.conn.id, "idle_s": idle_s})
        message = (
            f"nothing heard from the device for {idle_s:g} s; the session ended (send keepalive while idle)"
        )
        await self._send_event(
            {**error_event(message, code="idle_timeout", fatal=True), "session": self.session_id}
        )
        self.hang_up()

    async def _send_audio(self) -> None:
        """The session's clock: every 20 ms, publish one packet of queued agent audio (if any)."""
        frame = round(self.rate * FRAME_S)
        pacer = FramePacer(frame, self.rate)
        encoder = AudioEncoder(self.codec, self.rate)
        topic = self._topics.down_audio(self.client_id, self.session_id)
        client = self._worker._client
        while not self.output.closed:
            await pacer.next()
            if self.output.queued_s == 0:
                continue
            pcm, turn_id = self.output.pull(frame)
            for packet in encoder.encode(pcm, turn_id):
                await client.publish(topic, packet, qos=0)


# ---------------------------------------------------------------------------------------------------
# device side


class MqttClientSession:
    """One conversation with a worker, as the device sees it."""

    def __init__(self, owner: MqttClient, session_id: str, codec: str, sample_rate: int) -> None:
        self._owner = owner
        self.id = session_id
        self.codec = codec
        self.sample_rate = sample_rate
        self.worker_id = ""
        self.audio = QueueAudioInput(sample_rate)
        """The agent's voice as an AudioInput at ``sample_rate`` (play it on the device)."""
        self.started: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self.ended = asyncio.Event()
        self._events: asyncio.Queue[JsonDict | None] = asyncio.Queue()
        self._encoder = AudioEncoder(codec, sample_rate)
        self._decoder = AudioDecoder(codec, sample_rate)
        self._last_sent = asyncio.get_running_loop().time()
        self._keepalive: asyncio.Task[None] | None = None

    async def send_audio(self, pcm: FloatArray, turn_id: int = -1) -> None:
        """Microphone audio, mono float32 [n] at ``sample_rate``; sent in 20 ms packets."""
        topic = self._owner._topics.up_audio(self._owner.client_id, self.id)
        for packet in self._encoder.encode(pcm, turn_id):
            await self._owner.mqtt.publish(topic, packet, qos=0)
            self._last_sent = asyncio.get_running_loop().time()

    async def send_control(self, message: JsonDict) -> None:
        """``{"type": "interrupt"}``, ``{"type": "text", "text": ...}``, ``{"type": "close"}``..."""
        topic = self._owner._topics.up_control(self._owner.client_id, self.id)
        await self._owner.mqtt.publish(topic, encode_json(message), qos=1)
        self._last_sent = asyncio.get_running_loop().time()

    async def interrupt(self) -> None:
        await self.send_control({"type": "interrupt"})

    async def events(self) -> AsyncIterator[JsonDict]:
        """The worker's events for this session; ends when the session ends or its worker dies."""
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)
                return
            yield event

    async def close(self) -> None:
        if not self.ended.is_set():
            with contextlib.suppress(Exception):
                await self.send_control({"type": "close"})
        self._end()

    def _on_audio(self, payload: bytes) -> None:
        try:
            pcm, _ = self._decoder.decode(payload)
        except TransportError as exc:
            self._events.put_nowait(error_event(f"bad audio from the worker: {exc}"))
            return
        if len(pcm):
            self.audio.feed(pcm, self.sample_rate)

    def _on_event(self, event: JsonDict) -> None:
        kind = event.get("type")
        if kind == "session.started":
            self.worker_id = str(event.get("worker", ""))
            if not self.started.done():
                self.started.set_result(event)
            idle_s = event.get("idle_timeout_s")
            if isinstance(idle_s, int | float) and idle_s > 0 and self._keepalive is None:
                self._keepalive = asyncio.create_task(
                    self._keep_alive(float(idle_s)), name=f"mqtt-keepalive-{self.id}"
                )
            return
        self._events.put_nowait(event)
        if kind == "session.ended" or (kind == "error" and event.get("fatal")):
            self._end()

    async def _keep_alive(self, idle_s: float) -> None:
        """While the device sends nothing else, a ``keepalive`` every third of the worker's idle timeout."""
        loop = asyncio.get_running_loop()
        interval = idle_s / 3
        while not self.ended.is_set():
            due = self._last_sent + interval - loop.time()
            if due > 0:
                await asyncio.sleep(due)
                continue
            try:
                await self.send_control({"type": "keepalive"})
            except Exception as exc:  # the broker is gone: the session ends with the connection
                logger.warning("mqtt keepalive failed", extra={"session": self.id, "error": repr(exc)})
                return

    def _end(self) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.audio.close()
        self._events.put_nowait(None)
        self._owner._sessions.pop(self.id, None)


class MqttClient:
    """A device's connection: ``async with MqttClient(settings) as c: s = await c.open_session()``."""

    def __init__(self, settings: MqttSettings, *, client_id: str | None = None) -> None:
        chosen = client_id or settings.username
        if not chosen:
            raise ConfigError("MqttClient needs a client_id (by default the broker username)")
        self.client_id = check_name(chosen, "client id")
        self.instance = uuid.uuid4().hex[:12]
        """This connection's id: its last will ends its own sessions, never another app's of the device."""
        self._settings = settings
        self._topics = Topics(check_topic_root(settings.topic_root))
        self._sessions: dict[str, MqttClientSession] = {}
        self._abandoned: set[str] = set()
        self._client_events: asyncio.Queue[JsonDict] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._mqtt: Any = None

    @property
    def mqtt(self) -> Any:
        """The underlying aiomqtt client (for extra topics of your own)."""
        if self._mqtt is None:
            raise TransportError("not connected; use 'async with MqttClient(...)'")
        return self._mqtt

    async def __aenter__(self) -> MqttClient:
        will = (
            self._topics.client_status(self.client_id),
            encode_json({"online": False, "instance": self.instance}),
        )
        client = self._settings.client(f"moss-client-{self.client_id}-{self.instance}", will=will)
        try:
            await client.__aenter__()
        except require("aiomqtt", "mqtt").MqttError as exc:
            raise _connect_error(exc, self._settings) from exc
        self._mqtt = client
        await client.subscribe(self._topics.down_filter(self.client_id), qos=1)
        await client.subscribe(self._topics.client_event(self.client_id), qos=1)
        await client.subscribe(self._topics.all_worker_status(), qos=1)
        self._reader = asyncio.create_task(self._read(), name=f"mqtt-client-{self.client_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in list(self._sessions.values()):
            await session.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._mqtt.__aexit__(None, None, None)
        self._mqtt = None

    async def open_session(
        self, *, codec: str = "opus", sample_rate: int = 24_000, timeout_s: float = 5.0, attempts: int = 3
    ) -> MqttClientSession:
        """Ask the worker pool for a session; retried (with a new id) if no worker answers in time."""
        check_audio_format(codec, sample_rate)
        for _ in range(attempts):
            session = MqttClientSession(self, uuid.uuid4().hex[:12], codec, sample_rate)
            self._sessions[session.id] = session
            request = {
                "type": "session.request", "session": session.id, "codec": codec, "sample_rate": sample_rate,
                "instance": self.instance,
            }  # fmt: skip
            await self.mqtt.publish(self._topics.request(self.client_id), encode_json(request), qos=1)
            try:
                await asyncio.wait_for(asyncio.shield(session.started), timeout_s)
                return session
            except TimeoutError:
                self._sessions.pop(session.id, None)
                self._abandoned.add(session.id)
            except TransportError:
                self._sessions.pop(session.id, None)
                raise
        raise TransportError(
            f"no worker answered {attempts} session requests in {attempts * timeout_s:g} s: is a worker "
            f"(moss-agent mqtt-worker) running on this broker, with topic root {self._topics.root!r}?"
        )

    async def client_events(self) -> AsyncIterator[JsonDict]:
        """Events not tied to a session (e.g. a rejected request)."""
        while True:
            yield await self._client_events.get()

    async def _read(self) -> None:
        async for message in self.mqtt.messages:
            try:
                self._route(str(message.topic), bytes(message.payload))
            except TransportError as exc:
                self._client_events.put_nowait(error_event(str(exc)))
            except Exception as exc:  # one bad message must not end the device's connection
                logger.exception("mqtt message could not be handled", extra={"topic": str(message.topic)})
                self._client_events.put_nowait(
                    error_event(f"could not handle a message: {exc!r}", code="internal")
                )

    def _route(self, topic: str, payload: bytes) -> None:
        levels = self._topics.parse(topic)
        if len(levels) == 3 and levels[0] == "w" and levels[2] == "status":
            status = decode_json_object(payload, what="worker status")
            if status.get("online") is False:
                for session in list(self._sessions.values()):
                    if session.worker_id == levels[1]:
                        session._on_event(
                            error_event(
                                f"worker {levels[1]} went away; open a new session",
                                code="worker_lost",
                                fatal=True,
                            )
                        )
        elif len(levels) == 3 and levels[2] == "event":
            event = decode_json_object(payload, what="event")
            pending = self._sessions.get(str(event.get("session", "")))
            if pending is not None and not pending.started.done():
                pending.started.set_exception(TransportError(str(event.get("message", event))))
            else:
                self._client_events.put_nowait(event)
        elif len(levels) == 6 and levels[2] == "s" and levels[4] == "down":
            target = self._sessions.get(levels[3])
            if levels[5] == "audio":
                if target is not None:
                    target._on_audio(payload)
                return
            event = decode_json_object(payload, what="event")
            if target is not None:
                target._on_event(event)
            elif event.get("type") == "session.started" and levels[3] in self._abandoned:
                # A late answer to a request we gave up on: release that worker's session. Sessions
                # of another client of this device (same username) are none of our business.
                self._abandoned.discard(levels[3])
                task = asyncio.create_task(self._close_orphan(levels[3]), name="mqtt-close-orphan")
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _close_orphan(self, session_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.mqtt.publish(
                self._topics.up_control(self.client_id, session_id), encode_json({"type": "close"}), qos=1
            )


if __name__ == "__main__":
    # ``python -m moss_agent.transports.mqtt --handler pkg.mod:func``: the worker process lives in mqtt_process.
    from moss_agent.transports.mqtt_process import main

    sys.exit(main())
