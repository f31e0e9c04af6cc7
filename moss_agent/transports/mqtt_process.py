"""Running MQTT workers from a command line: the broker and limit options, and the serve loop.

``moss-agent mqtt-worker`` (the MOSS voice agent) and ``python -m moss_agent.transports.mqtt
--handler pkg.mod:func`` (your own ``async def handler(conn)``) share them: the same flags, and
``serve_workers``, which prints ``ready <worker id>`` once subscribed, starts over with a fresh MQTT
session after a lost broker (backing off up to 30 s), and raises on a refused login.
This module is command-line code: it reads the password from a file or ``$MOSS_MQTT_PASSWORD``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moss_agent.errors import ConfigError, MossError, TransportError

if TYPE_CHECKING:  # imported when used: the moss-agent CLI builds these options for every command
    from moss_agent.transports.connection import ConnectionHandler
    from moss_agent.transports.mqtt import MqttLimits, MqttSettings, MqttWorker

logger = logging.getLogger(__name__)

PASSWORD_ENV = "MOSS_MQTT_PASSWORD"

# flag, MqttLimits field, default (kept equal to MqttLimits' by a unit test), type, help
_LIMIT_FLAGS: tuple[tuple[str, str, float, type, str], ...] = (
    ("--idle-timeout", "session_idle_s", 30.0, float,
     "end a session when its device has sent nothing (audio, control, keepalive) for this many seconds"),
    ("--audio-rate", "audio_rate", 2.0, float,
     "audio one session may send, in multiples of real time; packets beyond it are dropped"),
    ("--audio-burst", "audio_burst_s", 2.0, float, "seconds of audio a session may send at once above --audio-rate"),
    ("--error-rate", "errors_per_s", 5.0, float, "error events sent to one device per second on average"),
    ("--error-burst", "error_burst", 20.0, float, "error events sent to one device at once"),
    ("--max-queued-messages", "max_queued_messages", 10_000, int,
     "requests and control messages received but not yet handled; more are dropped"),
    ("--max-queued-audio", "max_queued_audio", 5_000, int,
     "audio packets received but not yet handled; more are dropped (never control)"),
    ("--sessions-per-device", "sessions_per_device", 8, int,
     "sessions one device (MQTT username) may hold on this worker at once; more are refused"),
)  # fmt: skip


def add_broker_options(parser: argparse.ArgumentParser) -> None:
    """``--broker``, ``--username``, ``--password-file``, TLS, pool and topic options, and the MQTT limits."""
    group = parser.add_argument_group("MQTT broker")
    group.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT", help="broker host:port (default 127.0.0.1:1883)")
    group.add_argument("--username", default=None, help="broker username (default: none, an anonymous login)")
    group.add_argument(
        "--password-file", type=Path, default=None, metavar="FILE", help=f"file holding the password (else ${PASSWORD_ENV})"
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS, checking the broker's certificate")
    group.add_argument("--ca-file", type=Path, default=None, metavar="FILE", help="CA certificate of the broker's TLS (implies --tls)")
    group.add_argument("--group", default="moss-workers", help="worker pool name (shared subscription group)")
    group.add_argument("--topic-root", default="moss/v1", help="topic prefix (default moss/v1)")
    group.add_argument("--worker-id", default=None, help="this worker's id (default: random)")
    limits = parser.add_argument_group("MQTT limits per device (docs/mqtt.md, Limits)")
    for flag, field, default, kind, text in _LIMIT_FLAGS:
        limits.add_argument(
            flag, dest=f"mqtt_{field}", metavar="S" if field.endswith("_s") else "N", type=kind, default=default,
            help=f"{text} (default {default:g})",
        )  # fmt: skip


def parse_broker(spec: str) -> tuple[str, int]:
    """``host:port`` (or ``host``, port 1883) -> (host, port)."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, 1883
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--broker must look like host:port (e.g. 127.0.0.1:1883), got {spec!r}")
    return host, int(port)


def read_password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None:
        try:
            return str(args.password_file.read_text()).strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --password-file {args.password_file}: {exc.strerror}") from exc
    return os.environ.get(PASSWORD_ENV)


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.ca_file is None:
        return ssl.create_default_context() if args.tls else None
    try:
        return ssl.create_default_context(cafile=str(args.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use --ca-file {args.ca_file}: {exc}") from exc


def settings_from_args(args: argparse.Namespace) -> MqttSettings:
    """The broker options as settings; a bad address or unreadable password file is a ConfigError."""
    from moss_agent.transports.mqtt import MqttSettings

    host, port = parse_broker(args.broker)
    return MqttSettings(
        host=host, port=port, username=args.username, password=read_password(args), topic_root=args.topic_root,
        tls_context=_tls_context(args),
    )  # fmt: skip


def limits_from_args(args: argparse.Namespace) -> MqttLimits:
    from moss_agent.transports.mqtt import MqttLimits

    for flag, field, *_ in _LIMIT_FLAGS:
        if not getattr(args, f"mqtt_{field}") > 0:
            raise ConfigError(f"{flag} must be positive, got {getattr(args, f'mqtt_{field}')}")
    return MqttLimits(**{field: getattr(args, f"mqtt_{field}") for _, field, *_ in _LIMIT_FLAGS})


def describe_login(args: argparse.Namespace) -> str:
    """Who the worker logs in as, for its first log line."""
    return f"user {args.username!r}" if args.username else "an anonymous login (no --username)"


async def serve_workers(make_worker: Callable[[], MqttWorker], stop: asyncio.Future[Any]) -> None:
    """Run ``make_worker()`` until ``stop`` is done, printing ``ready <worker id>`` each time one is
    subscribed. A broker that cannot be reached, or is lost, is tried again with a fresh worker (and
    MQTT session), backing off from 1 s to 30 s, and said on stderr. A refusal for good (a wrong
    login or TLS certificate, BrokerRefusedError) is raised: the same settings cannot succeed later."""
    from moss_agent.transports.mqtt import BrokerRefusedError

    backoff_s = 1.0
    while not stop.done():
        worker = make_worker()
        try:
            if await _serve_until_stopped(worker, stop):
                return
            problem = "lost the MQTT broker"
        except BrokerRefusedError:
            raise
        except TransportError as exc:  # unreachable: not started yet, restarting, or a network outage
            problem = str(exc).rstrip(".")
        if worker.ready.is_set():
            backoff_s = 1.0  # it was serving; this is a new outage
        logger.warning("mqtt broker unavailable; retrying", extra={"problem": problem, "retry_s": backoff_s})
        print(f"{problem}; trying again in {backoff_s:g} s", file=sys.stderr, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stop), backoff_s)
        backoff_s = min(backoff_s * 2, 30.0)


async def _serve_until_stopped(worker: MqttWorker, stop: asyncio.Future[Any]) -> bool:
    """True when stopped on purpose, False when the broker went away; a failed connect is raised."""
    task = asyncio.create_task(worker.run(), name="mqtt-worker")
    ready = asyncio.create_task(worker.ready.wait(), name="mqtt-worker-ready")
    try:
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if worker.ready.is_set():
            print(f"ready {worker.worker_id}", flush=True)
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if stop.done() and not task.done():
            await worker.say_offline()
    finally:
        ready.cancel()
        if not task.done():
            task.cancel()
        await asyncio.wait({task})  # its outcome is read below; awaiting the task would raise it here
    if task.cancelled():
        return True
    error = task.exception()
    if isinstance(error, TransportError):
        raise error
    if error is not None:
        logger.warning("mqtt worker stopped", extra={"error": repr(error)})
    return stop.done()


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _load_handler(spec: str) -> ConnectionHandler:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--handler must look like 'package.module:function', got {spec!r}")
    try:
        handler: ConnectionHandler = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--handler {spec}: {exc}") from exc
    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moss_agent.transports.mqtt",
        description="Serve sessions of your own handler over MQTT (one worker of a pool). "
        f"Password: ${PASSWORD_ENV} or --password-file.",
    )
    parser.add_argument("--handler", required=True, help="async def handler(conn), as package.module:function")
    parser.add_argument("--input-rate", type=int, default=24_000, help="sample rate of conn.input (default 24000)")
    parser.add_argument("--max-sessions", type=int, default=64, help="conversations at once (default 64)")
    add_broker_options(parser)
    return parser


async def _serve(args: argparse.Namespace) -> None:
    from moss_agent.transports.mqtt import MqttWorker

    settings, limits = settings_from_args(args), limits_from_args(args)
    if args.max_sessions < 1:
        raise ConfigError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    handler = _load_handler(args.handler)
    logger.info("mqtt worker starting", extra={"broker": args.broker, "login": describe_login(args)})

    def make_worker() -> MqttWorker:
        return MqttWorker(
            handler, settings, worker_id=args.worker_id, group=args.group, input_rate=args.input_rate,
            max_sessions=args.max_sessions, limits=limits,
        )  # fmt: skip

    stop = asyncio.create_task(wait_for_signal(), name="mqtt-worker-stop")
    try:
        await serve_workers(make_worker, stop)
    finally:
        stop.cancel()


def main(argv: list[str] | None = None) -> int:
    """``python -m moss_agent.transports.mqtt --handler pkg.mod:func ...``: run one worker process."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        asyncio.run(_serve(args))
    except MossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
