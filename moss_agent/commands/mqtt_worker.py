"""``moss-agent mqtt-worker``: serve voice conversations to MQTT devices through a broker.

Start as many workers as the load needs, on as many machines: the broker hands each session
request to one worker of the ``--group`` (an MQTT 5 shared subscription). Topics and payloads:
docs/mqtt.md. The password comes from $MOSS_MQTT_PASSWORD or ``--password-file``, never argv.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from moss_agent.commands import common
from moss_agent.errors import ConfigError
from moss_agent.transports.mqtt_process import (
    PASSWORD_ENV,
    add_broker_options,
    describe_login,
    limits_from_args,
    parse_broker,
    read_password,
    serve_workers,
    settings_from_args,
)

__all__ = ["add_parser", "parse_broker", "read_password", "run"]

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "mqtt-worker",
        help="serve voice conversations to MQTT devices (one worker of a pool)",
        description="Join a pool of workers behind an MQTT 5 broker; each session a device opens is a "
        f"conversation on this worker's engine. Password: ${PASSWORD_ENV} or --password-file.",
    )
    add_broker_options(parser)
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


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_work(args))


async def _work(args: argparse.Namespace) -> int:
    from moss_agent.serving import session_handler
    from moss_agent.transports.mqtt import MqttWorker

    # Everything the user typed is checked before the models load.
    settings, limits = settings_from_args(args), limits_from_args(args)
    max_sessions = args.max_sessions or args.slots
    if max_sessions < 1:
        raise ConfigError(f"--max-sessions must be >= 1, got {max_sessions}")
    await common.check_llm_server(args)
    log.info("mqtt worker starting", extra={"broker": args.broker, "login": describe_login(args)})
    engine, stt, voice = await common.build_speech_stack(args)
    handler = session_handler(
        engine, llm_factory=lambda: common.build_llm(args), vad_factory=common.silero_vad, stt=stt,
        config=common.session_config(args, echo_mode="half_duplex" if args.half_duplex else "none"),
        voice_prompt=voice, greeting=args.greeting,
    )  # fmt: skip

    def make_worker() -> MqttWorker:
        return MqttWorker(
            handler, settings, worker_id=args.worker_id, group=args.group, input_rate=24_000,
            output_rate=engine.sample_rate, max_sessions=max_sessions, limits=limits,
        )  # fmt: skip

    stop = asyncio.create_task(common.wait_for_stop_signal(engine), name="mqtt-worker-stop")
    async with engine:
        try:
            await serve_workers(make_worker, stop)
        finally:
            stop.cancel()
    print("stopped", file=sys.stderr, flush=True)
    return common.engine_failed(engine, "mqtt-worker")
