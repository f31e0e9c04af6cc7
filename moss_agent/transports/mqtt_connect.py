"""Connecting to the MQTT broker: ``MqttSettings``, and what a failed connection means in words.

Shared by workers (``mqtt``) and devices (``mqtt_client``). ``BrokerRefusedError`` is a refusal
that retrying with the same settings cannot change; other ``TransportError``s may pass.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from moss_agent._optional import require
from moss_agent.errors import TransportError


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


class WorkerBusyError(TransportError):
    """Every worker that got this device's session requests was serving all the sessions it can."""


_REFUSED_LOGIN = {4, 5, 134, 135}
"""CONNACK codes for a refused login: MQTT 3 "bad username or password" and "not authorised",
MQTT 5 0x86 "Bad User Name or Password" and 0x87 "Not authorized"."""
_REFUSED_FOR_GOOD = _REFUSED_LOGIN | {1, 2, 132, 133, 138, 140}
"""... and the other CONNACK refusals a retry cannot change: protocol version, client id, banned,
authentication method. Server unavailable or busy, quotas and rates may pass."""


def connect_error(exc: Exception, settings: MqttSettings) -> TransportError:
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
