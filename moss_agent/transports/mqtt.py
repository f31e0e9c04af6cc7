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

``MqttClient(settings)`` is the device side (``mqtt_client``): ``open_session()`` returns an
``MqttClientSession`` with ``send_audio``, ``send_control``, ``audio`` (AudioInput of the agent's
voice) and ``events()``. Broker settings and connection errors: ``mqtt_connect``. Topic scheme and
payloads: ``mqtt_protocol`` and docs/mqtt.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from dataclasses import dataclass
from typing import Any

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
from moss_agent.transports.mqtt_client import MqttClient, MqttClientSession
from moss_agent.transports.mqtt_connect import (
    BrokerRefusedError,
    MqttSettings,
    WorkerBusyError,
    connect_error,
)
from moss_agent.transports.mqtt_protocol import (
    FRAME_S,
    AudioDecoder,
    AudioEncoder,
    SessionRequest,
    TokenBucket,
    Topics,
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

__all__ = [
    "BrokerRefusedError",
    "MqttClient",
    "MqttClientSession",
    "MqttLimits",
    "MqttSettings",
    "MqttWorker",
    "WorkerBusyError",
]

logger = logging.getLogger(__name__)


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
    sessions_per_device: int = 8
    """Sessions one device (MQTT username) may hold on a worker at once; a request beyond it is refused
    with ``too_many_sessions``, so one device cannot take every slot of a worker."""

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
        self._offline = (  # this worker's status topic and its goodbye (also its last will)
            self._topics.worker_status(self.worker_id), encode_json({"worker": self.worker_id, "online": False})
        )
        self._said_offline = False
        self.ready = asyncio.Event()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def run(self) -> None:
        """Serve until cancelled; then tell every client this worker is gone."""
        status = self._offline[0]
        mqtt_error = require("aiomqtt", "mqtt").MqttError
        client = self._settings.client(
            f"moss-worker-{self.worker_id}",
            will=self._offline,
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
                raise connect_error(exc, self._settings) from exc
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
                    try:
                        await self._read(client, yield_every=1)
                    finally:
                        await self._wind_down()  # before the task group waits for the sessions
            finally:
                await self._wind_down()

    async def _wind_down(self) -> None:
        """Goodbye, then hang up every session, so that each one ends by itself. Cancelling them is
        not enough: Python 3.11's ``asyncio.wait_for`` (inside aiomqtt's publish) can swallow a
        cancellation that arrives as its wait completes, and a session would then serve on."""
        await self.say_offline()
        for session in list(self._sessions.values()):
            session.hang_up()

    async def say_offline(self) -> None:
        """Tell every client this worker is going (once; bounded to 5 s). A clean disconnect sends no
        last will, so this is the only word clients get: say it before stopping anything (stopping
        the sessions can take long on a busy machine), as ``serve_workers`` does on a signal."""
        if self._said_offline or self._client is None:
            return
        self._said_offline = True
        try:
            await asyncio.wait_for(self._client.publish(*self._offline, qos=1), 5)
            logger.info("mqtt worker said it goes offline", extra={"worker": self.worker_id})
        except Exception as exc:
            logger.warning("mqtt worker could not say it goes offline", extra={"error": repr(exc)})

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
        held = sum(1 for owner, _ in self._sessions if owner == client_id)
        if held >= self.limits.sessions_per_device:
            message = (
                f"this device already holds {held} sessions on this worker (the limit); close one first"
            )
            self._send_error(
                client_id,
                self._topics.client_event(client_id),
                {**error_event(message, code="too_many_sessions"), "session": request.session},
            )
            return
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
                    self.output.close()  # ends _send_audio's loop even if its cancellation is swallowed
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


if __name__ == "__main__":
    # ``python -m moss_agent.transports.mqtt --handler pkg.mod:func``: the worker process lives in mqtt_process.
    from moss_agent.transports.mqtt_process import main

    sys.exit(main())
