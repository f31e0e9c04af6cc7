"""A real mosquitto broker for tests, configured by docs/mosquitto/mosquitto.conf: 127.0.0.1, a free
port, and users with per-device roles in a dynamic-security file (moss_agent.transports.mqtt_acl)."""

from __future__ import annotations

import contextlib
import glob
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from system_requirements import MOSQUITTO, require, stop_process

from moss_agent.transports.mqtt import MqttClientSession, MqttSettings
from moss_agent.transports.mqtt_acl import dynsec_config

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "docs" / "mosquitto" / "mosquitto.conf"
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"


@dataclass
class Broker:
    host: str
    port: int
    passwords: dict[str, str]
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dynsec_plugin() -> str:
    """The plugin's path on this machine (the shipped config names Debian's amd64 one)."""
    for pattern in (
        f"/usr/lib/*/{DYNSEC_PLUGIN}",
        f"/usr/lib/{DYNSEC_PLUGIN}",
        f"/usr/local/lib/{DYNSEC_PLUGIN}",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    pytest.skip(
        f"the mosquitto dynamic-security plugin ({DYNSEC_PLUGIN}) is missing; install the Debian package mosquitto"
    )


def broker_config(port: int, plugin: str, dynsec_file: Path, tls: tuple[Path, Path] | None = None) -> str:
    """docs/mosquitto/mosquitto.conf with this machine's listener, paths and test logging; ``tls`` is
    (certfile, keyfile) for the listener, as the shipped file's comment describes."""
    text = SHIPPED_CONFIG.read_text()
    for key, value in (
        ("listener", f"{port} 127.0.0.1"),
        ("plugin", plugin),
        ("plugin_opt_config_file", str(dynsec_file)),
    ):
        text, count = re.subn(rf"^{key} .*$", f"{key} {value}", text, flags=re.M)
        assert count == 1, f"{SHIPPED_CONFIG} should set {key} once"
    if tls is not None:
        for key, path in zip(("certfile", "keyfile"), tls, strict=True):
            text, count = re.subn(rf"^# {key} .*$", f"{key} {path}", text, flags=re.M)
            assert count == 1, f"{SHIPPED_CONFIG} should show {key} in a comment once"
    return text + (
        "\n# tests\npersistence false\nlog_dest stderr\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        # mosquitto started as root drops to the 'mosquitto' user, which cannot read our temp files.
        "user root\n"
    )


@contextlib.contextmanager
def run_broker(
    tmp: Path,
    users: dict[str, str],
    workers: tuple[str, ...] = ("worker",),
    *,
    port: int | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[Broker]:
    """mosquitto on ``port`` (default: a free one); ``workers`` are worker users, every other user is a
    device; ``tls`` is (certfile, keyfile) for a TLS listener."""
    require(MOSQUITTO)
    mosquitto = MOSQUITTO.path
    assert mosquitto is not None
    dynsec_file = tmp / "dynamic-security.json"
    config = dynsec_config(
        {u: p for u, p in users.items() if u in workers}, {u: p for u, p in users.items() if u not in workers}
    )
    dynsec_file.write_text(json.dumps(config))
    dynsec_file.chmod(0o600)
    port = port or _free_port()
    config_file = tmp / "mosquitto.conf"
    config_file.write_text(broker_config(port, _dynsec_plugin(), dynsec_file, tls))
    log_path = tmp / "mosquitto.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([mosquitto, "-c", str(config_file)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start listening within 10 s")
            time.sleep(0.05)
        yield Broker("127.0.0.1", port, dict(users), log_path)
    finally:
        stop_process(proc)
        log.close()


def settings_for(broker: Broker, user: str) -> MqttSettings:
    """Client settings of one of the broker's users."""
    return MqttSettings(host=broker.host, port=broker.port, username=user, password=broker.passwords[user])


async def next_event(session: MqttClientSession, kind: str) -> dict:
    """The session's next event of one type (earlier events of other types are skipped)."""
    async for event in session.events():
        if event["type"] == kind:
            return event
    raise AssertionError(f"session ended before a {kind!r} event")
