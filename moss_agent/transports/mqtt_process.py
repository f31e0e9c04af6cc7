"""One MQTT worker process: ``python -m moss_agent.transports.mqtt --handler pkg.mod:func ...``.

Runs ``MqttWorker`` with an application handler until SIGTERM/SIGINT; after a lost broker it starts
over with a fresh MQTT session (backing off up to 30 s). A refused login ends it with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys

from moss_agent.errors import ConfigError, TransportError
from moss_agent.transports.connection import ConnectionHandler
from moss_agent.transports.mqtt import MqttSettings, MqttWorker

logger = logging.getLogger(__name__)


def _load_handler(spec: str) -> ConnectionHandler:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--handler must look like 'package.module:function', got {spec!r}")
    handler: ConnectionHandler = getattr(importlib.import_module(module_name), attr)
    return handler


async def _serve(args: argparse.Namespace) -> None:
    """Run one worker; after a lost broker connection, start over with a fresh MQTT session."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backoff_s = 1.0
    while not stop.is_set():
        try:
            await _serve_once(args, stop)
            return
        except TransportError:
            raise
        except Exception as exc:  # aiomqtt.MqttError and friends: the broker went away
            logger.warning("lost the broker; reconnecting", extra={"error": repr(exc), "retry_s": backoff_s})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff_s)
        backoff_s = min(backoff_s * 2, 30.0)


async def _serve_once(args: argparse.Namespace, stop: asyncio.Event) -> None:
    settings = MqttSettings(
        host=args.host,
        port=args.port,
        username=args.username,
        password=os.environ.get(args.password_env),
        topic_root=args.topic_root,
    )
    worker = MqttWorker(
        _load_handler(args.handler),
        settings,
        worker_id=args.worker_id,
        group=args.group,
        input_rate=args.input_rate,
    )
    task = asyncio.create_task(worker.run(), name="mqtt-worker")
    ready = asyncio.create_task(worker.ready.wait(), name="mqtt-worker-ready")
    stopping = asyncio.create_task(stop.wait(), name="mqtt-worker-stop")
    try:
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if worker.ready.is_set():
            print(f"ready {worker.worker_id}", flush=True)
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for helper in (ready, stopping):
            helper.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def main(argv: list[str] | None = None) -> int:
    """``python -m moss_agent.transports.mqtt --handler pkg.mod:func ...``: run one worker process."""
    parser = argparse.ArgumentParser(description="Serve moss_agent sessions over MQTT (one worker).")
    parser.add_argument("--handler", required=True, help="async def handler(conn), as module:function")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--username")
    parser.add_argument(
        "--password-env", default="MOSS_MQTT_PASSWORD", help="environment variable with the password"
    )
    parser.add_argument("--topic-root", default="moss/v1")
    parser.add_argument("--group", default="moss-workers")
    parser.add_argument("--worker-id")
    parser.add_argument("--input-rate", type=int, default=24_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        asyncio.run(_serve(args))
    except TransportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
