"""``moss-agent mqtt-worker``: serve voice conversations to MQTT devices through a broker.

Start as many workers as the load needs, on as many machines: the broker hands each session
request to one worker of the ``--group`` (an MQTT 5 shared subscription). Topics and payloads:
docs/mqtt.md. The password comes from $MOSS_MQTT_PASSWORD or ``--password-file``, never argv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from moss_agent.commands import common
from moss_agent.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

PASSWORD_ENV = "MOSS_MQTT_PASSWORD"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "mqtt-worker",
        help="serve voice conversations to MQTT devices (one worker of a pool)",
        description="Join a pool of workers behind an MQTT 5 broker; each session a device opens is a "
        f"conversation on this worker's engine. Password: ${PASSWORD_ENV} or --password-file.",
    )
    parser.add_argument("--broker", default="127.0.0.1:1883", help="broker host:port (default 127.0.0.1:1883)")
    parser.add_argument("--username", default=None, help="broker username")
    parser.add_argument("--password-file", type=Path, default=None, help=f"file holding the password (else ${PASSWORD_ENV})")
    parser.add_argument("--group", default="moss-workers", help="worker pool name (shared subscription group)")
    parser.add_argument("--topic-root", default="moss/v1", help="topic prefix (default moss/v1)")
    parser.add_argument("--worker-id", default=None, help="this worker's id (default: random)")
    parser.add_argument(
        "--half-duplex", action="store_true",
        help="for devices with open speakers and no echo cancellation: do not listen while the agent speaks",
    )  # fmt: skip
    parser.add_argument("--max-sessions", type=int, default=None, help="conversations at once (default: --slots)")
    common.add_engine_options(parser, slots=4)
    common.add_llm_options(parser)
    common.add_stt_options(parser)
    common.add_listening_options(parser)
    parser.set_defaults(handler=run)


def parse_broker(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, 1883
    if not host or not port.isdigit():
        raise ConfigError(f"--broker must look like host:port (e.g. 127.0.0.1:1883), got {spec!r}")
    return host, int(port)


def read_password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None:
        try:
            return str(args.password_file.read_text()).strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --password-file {args.password_file}: {exc.strerror}") from exc
    return os.environ.get(PASSWORD_ENV)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_work(args))


async def _work(args: argparse.Namespace) -> int:
    from moss_agent.serving import session_handler
    from moss_agent.transports.mqtt import MqttSettings, MqttWorker

    host, port = parse_broker(args.broker)
    settings = MqttSettings(
        host=host, port=port, username=args.username, password=read_password(args), topic_root=args.topic_root
    )
    max_sessions = args.max_sessions or args.slots
    if max_sessions < 1:
        raise ConfigError(f"--max-sessions must be >= 1, got {max_sessions}")
    engine, stt, voice = await common.build_speech_stack(args)
    handler = session_handler(
        engine, llm_factory=lambda: common.build_llm(args), vad_factory=common.silero_vad, stt=stt,
        config=common.session_config(args, echo_mode="half_duplex" if args.half_duplex else "none"),
        voice_prompt=voice, greeting=args.greeting,
    )  # fmt: skip
    stop = asyncio.create_task(common.wait_for_stop_signal(engine), name="mqtt-worker-stop")
    async with engine:
        backoff_s = 1.0
        while not stop.done():
            worker = MqttWorker(
                handler, settings, worker_id=args.worker_id, group=args.group, input_rate=24_000,
                output_rate=engine.sample_rate, max_sessions=max_sessions,
            )  # fmt: skip
            if await _serve_until_stopped(worker, stop):
                break
            log.warning("lost the broker; reconnecting", extra={"retry_s": backoff_s})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stop), backoff_s)
            backoff_s = min(backoff_s * 2, 30.0)
    print("stopped", file=sys.stderr, flush=True)
    return common.engine_failed(engine, "mqtt-worker")


async def _serve_until_stopped(worker: Any, stop: asyncio.Task[None]) -> bool:
    """Run ``worker`` until ``stop``; True when stopped on purpose, False when the broker went away.

    A refused login (TransportError) is raised: retrying the same credentials cannot help.
    """
    task = asyncio.create_task(worker.run(), name="mqtt-worker")
    ready = asyncio.create_task(worker.ready.wait(), name="mqtt-worker-ready")
    try:
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if worker.ready.is_set():
            print(f"ready {worker.worker_id}", flush=True)
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if task.cancelled():
        return True
    error = task.exception()
    if isinstance(error, TransportError):
        raise error
    if error is not None:
        log.warning("mqtt worker stopped", extra={"error": repr(error)})
    return stop.done()
