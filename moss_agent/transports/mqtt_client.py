"""The device side of the MQTT transport: ``MqttClient`` and its ``MqttClientSession``s.

``async with MqttClient(settings) as c: s = await c.open_session()`` asks the worker pool for a
session; the session has ``send_audio``, ``send_control``, ``audio`` (an AudioInput of the agent's
voice) and ``events()``. A session whose worker dies gets a fatal ``worker_lost`` error event, and a
new session goes to a surviving worker. Topic scheme and payloads: ``mqtt_protocol``, docs/mqtt.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from moss_agent._optional import require
from moss_agent.errors import ConfigError, TransportError
from moss_agent.events import FloatArray
from moss_agent.transports.capture import QueueAudioInput
from moss_agent.transports.connection import JsonDict, error_event
from moss_agent.transports.mqtt_connect import MqttSettings, WorkerBusyError, connect_error
from moss_agent.transports.mqtt_protocol import (
    AudioDecoder,
    AudioEncoder,
    Topics,
    check_audio_format,
    check_name,
    check_topic_root,
    encode_json,
)
from moss_agent.wire import decode_json_object

logger = logging.getLogger(__name__)


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
            raise connect_error(exc, self._settings) from exc
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
        """Ask the worker pool for a session; retried (with a new id) if no worker answers in time or
        the one that got the request was full (the broker may hand the next one to another worker)."""
        check_audio_format(codec, sample_rate)
        busy: WorkerBusyError | None = None
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
            except WorkerBusyError as exc:
                self._sessions.pop(session.id, None)
                busy = exc
            except TransportError:
                self._sessions.pop(session.id, None)
                raise
        if busy is not None:
            raise WorkerBusyError(f"{busy} (asked {attempts} times; every worker that got a request was full)")
        raise TransportError(
            f"no worker answered {attempts} session requests in {attempts * timeout_s:g} s: is a worker "
            f"(moss-agent mqtt-worker) running on this broker, with topic root {self._topics.root!r}?"
        )

    async def client_events(self) -> AsyncIterator[JsonDict]:
        """Events not tied to a session (e.g. a rejected request)."""
        while True:
            yield await self._client_events.get()

    async def _read(self) -> None:
        try:
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
        except require("aiomqtt", "mqtt").MqttError as exc:
            # Nothing more can arrive: end every session now rather than leave its reader waiting.
            logger.warning("mqtt client lost the broker", extra={"client": self.client_id, "error": str(exc)})
            lost = error_event(f"lost the connection to the MQTT broker ({exc}); reconnect", code="broker_lost", fatal=True)
            for session in list(self._sessions.values()):
                if not session.started.done():
                    session.started.set_exception(TransportError(lost["message"]))
                session._on_event(dict(lost))
            self._client_events.put_nowait(lost)

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
                refused = WorkerBusyError if event.get("code") == "busy" else TransportError
                pending.started.set_exception(refused(str(event.get("message", event))))
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
