"""``moss-agent speech-server``: the realtime engine as a shared speech service (one process per device).

OpenAI's ``POST /v1/audio/speech`` and the speech session WebSocket on one engine, with token auth,
``/healthz``, ``/readyz`` and Prometheus ``/metrics`` (see ``moss_agent.service``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from moss_agent.commands import common

DEFAULT_PORT = 8000
TOKEN_ENV = "MOSS_ENGINE_TOKEN"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "speech-server",
        help="serve the realtime engine over HTTP: OpenAI's /v1/audio/speech and the speech session WebSocket",
        description="Serve one engine (one process per device) to many clients: OpenAI-compatible "
        "POST /v1/audio/speech, the streaming-text session WebSocket (moss-agent ... --engine-url), "
        "/healthz, /readyz and Prometheus /metrics. Every route but /healthz wants "
        "'Authorization: Bearer TOKEN'.",
        conflict_handler="resolve",  # --voice here registers named voices (NAME=PATH, repeatable)
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")  # fmt: skip
    token = parser.add_argument_group("authentication (default: $MOSS_ENGINE_TOKEN, else a new random token)")
    source = token.add_mutually_exclusive_group()
    source.add_argument("--token-file", type=Path, default=None, help="read the bearer token from this file")
    source.add_argument("--token-env", default=None, metavar="VAR", help="read the bearer token from $VAR")
    source.add_argument("--no-auth", action="store_true",
                        help="serve without a token (only behind your own auth, or on loopback)")  # fmt: skip
    parser.add_argument("--log-json", action="store_true",
                        help="log one JSON object per line, with the request id and the other fields "
                             "(use with -v for a line per request)")  # fmt: skip
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-input-chars", type=int, default=4096,
                        help="longest input of one /v1/audio/speech request (default 4096, as OpenAI)")  # fmt: skip
    limits.add_argument("--max-voice-seconds", type=float, default=30.0,
                        help="longest voice sample (given or uploaded) in seconds; it stays in every turn's "
                             "context (default 30; 5 to 20 s of clean speech is best)")  # fmt: skip
    limits.add_argument("--max-waiting", type=int, default=None, metavar="N",
                        help="requests and conversations that may queue for a busy engine's slot; one more "
                             "is answered 503 / 'busy' at once (default 32; 0: never queue)")  # fmt: skip
    common.add_engine_options(parser, slots=8)
    parser.add_argument(
        "--voice", action="append", default=[], metavar="NAME=PATH", dest="voices",
        help="register a voice: reference speech (wav, flac, mp3, ...) clients name in 'voice' (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-model", action="append", default=[], metavar="[NAME=]PATH", dest="batch_models",
        help="also serve a MOSS-TTS batch model (Delay or Local folder or hub id; 'tiny' with --tiny: the tiny "
             "Delay) as 'model' NAME in /v1/audio/speech (default name moss-tts): it shares the codec and "
             "device; its audio streams once made (repeatable)",
    )  # fmt: skip
    ray = parser.add_argument_group(
        'scale-out on Ray Serve (pip install "moss-agent[ray]"; docs/ray-serve.md)'
    )
    ray.add_argument("--ray", action="store_true",
                     help="deploy on Ray Serve instead: one engine per replica (one GPU each), Serve's "
                          "proxy on --host:--port routes requests and sessions")  # fmt: skip
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="the Ray cluster to deploy on (e.g. auto, ray://head:10001; default: a local Ray instance)")  # fmt: skip
    ray.add_argument("--replicas", default="1", metavar="MIN[:MAX]",
                     help="replicas, autoscaled on ongoing requests between MIN and MAX (default 1)")  # fmt: skip
    parser.set_defaults(handler=run, voice=None)  # the engine options' single --voice is replaced


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


def parse_replicas(text: str) -> tuple[int, int]:
    """``--replicas MIN[:MAX]`` -> (min, max)."""
    from moss_agent.errors import ConfigError

    low, _, high = text.partition(":")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ConfigError(
            f"--replicas {text!r}: expected MIN or MIN:MAX, e.g. --replicas 2 or --replicas 1:4"
        ) from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ConfigError(f"--replicas {text!r}: need 1 <= MIN <= MAX")
    return bounds


def parse_batch_models(items: list[str], tiny: bool) -> list[tuple[str, str]]:
    """``--batch-model [NAME=]PATH`` items -> [(name, path or hub id)]; ``tiny`` (with --tiny) is the tiny Delay."""
    from moss_agent.errors import ConfigError
    from moss_agent.service.config import OPENAI_MODEL_ALIASES, REALTIME_MODEL
    from moss_agent.service.voices import check_name

    models: list[tuple[str, str]] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = ("moss-tts" if not models else f"moss-tts-{len(models) + 1}"), item
        try:
            check_name(name)
        except ConfigError:
            raise ConfigError(
                f"--batch-model {item!r}: the name must be 1-64 letters, digits, '_', '-' or '.'"
            ) from None
        if not path:
            raise ConfigError(f"--batch-model {item!r}: expected [NAME=]PATH")
        if name in (REALTIME_MODEL, *OPENAI_MODEL_ALIASES) or name in dict(models):
            raise ConfigError(f"--batch-model {item!r}: the name {name!r} is already taken")
        if path == "tiny" and not tiny:
            raise ConfigError("--batch-model tiny is the tiny random Delay model: it goes with --tiny")
        if path != "tiny" and tiny:
            raise ConfigError(
                f"--batch-model {item!r}: with --tiny, only the tiny model fits the tiny codec (use 'tiny')"
            )
        models.append((name, path))
    return models


def read_token(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(token or None, whether it was made up here and must be shown)."""
    from moss_agent.errors import ConfigError

    if args.no_auth:
        return None, False
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --token-file {args.token_file}: {exc}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
        return token, False
    if args.token_env is not None:
        token = os.environ.get(args.token_env, "").strip()
        if not token:
            raise ConfigError(f"--token-env {args.token_env}: the environment variable is not set or empty")
        return token, False
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token, False
    return secrets.token_urlsafe(24), True


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before any model loads, so a taken port fails in a second."""
    from moss_agent.errors import ConfigError

    family, kind, proto, _, address = common.listen_addresses(host, port)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror}; is another server running there? "
            "pick another --port (0 picks a free one)"
        ) from None
    sock.setblocking(False)
    return sock


async def _until_stopped(app: Any, engine: Any) -> None:
    """Until SIGINT/SIGTERM or the engine fails; an engine that cannot even start (the app warms it
    up in the background, /readyz answering 503 meanwhile) raises, so the command exits non-zero."""
    from moss_agent.service.app import wait_until_warm

    stop = asyncio.create_task(common.wait_for_stop_signal(engine), name="stop-signal")
    warm = asyncio.create_task(wait_until_warm(app), name="warm-up")
    try:
        done, _ = await asyncio.wait({stop, warm}, return_when=asyncio.FIRST_COMPLETED)
        if warm in done:
            warm.result()
            await stop
    finally:
        for task in (stop, warm):
            task.cancel()
        await asyncio.wait({stop, warm})


def load_voices(files: list[tuple[str, Path]], sample_rate: int, config: Any) -> Any:
    from moss_agent.service import VoiceRegistry

    voices = VoiceRegistry(sample_rate, max_uploaded=config.max_uploaded_voices)
    for name, path in files:
        voices.load_file(name, path, max_seconds=config.max_voice_seconds)
    return voices


async def _serve(args: argparse.Namespace) -> int:
    from moss_agent._optional import require
    from moss_agent.errors import ConfigError

    if args.engine_url:
        raise ConfigError(
            "speech-server loads its own engine; --engine-url is for clients of a speech server"
        )
    for module in ("aiohttp.web", "prometheus_client"):  # before the models load
        require(module, "service")
    batch_models = parse_batch_models(args.batch_models, args.tiny)
    if args.ray:
        return await _serve_on_ray(args, batch_models)
    if args.ray_address is not None or args.replicas != "1":
        raise ConfigError("--ray-address and --replicas deploy on Ray Serve: add --ray")
    from moss_agent.service import ServiceConfig, create_app, serve
    from moss_agent.service.voices import parse_voice_option

    if args.log_json:
        from moss_agent.service.logs import use_json_logs

        use_json_logs()
    token, made_up = read_token(args)
    config = ServiceConfig(token=token, max_input_chars=args.max_input_chars,
                           max_voice_seconds=args.max_voice_seconds)  # fmt: skip
    voice_files = [parse_voice_option(text) for text in args.voices]
    for name, path in voice_files:
        if not path.is_file():
            raise ConfigError(f"--voice {name}={path}: no such file")
    sock = bind(args.host, args.port)
    try:
        voices = await asyncio.to_thread(load_voices, voice_files, 24000, config)  # bad audio fails now
        engine = await asyncio.to_thread(common.build_engine, args)
        if engine.sample_rate != voices.sample_rate:  # every MOSS codec is 24 kHz; a custom one may not be
            voices = await asyncio.to_thread(load_voices, voice_files, engine.sample_rate, config)
        app = create_app(engine, config, voices=voices)
        if batch_models:
            from moss_agent.options import min_frames
            from moss_agent.service.batch_speech import add_batch_engines, load_batch_engines

            add_batch_engines(
                app, await asyncio.to_thread(load_batch_engines, batch_models, engine, args.dtype),
                min_frames=min_frames(args),  # --min-seconds (1 s with --tiny)
            )
        try:
            async with serve(app, sock=sock) as url:
                batch = (
                    f", batch models: {', '.join(name for name, _ in batch_models)}" if batch_models else ""
                )
                print(
                    f"speech server on {url}: {args.slots} slots, voices: {', '.join(voices.names())}{batch}",
                    flush=True,
                )
                if made_up:
                    print(f"token: {token}", file=sys.stderr, flush=True)
                elif token is None:
                    print("serving WITHOUT authentication (--no-auth)", file=sys.stderr, flush=True)
                await _until_stopped(app, engine)
                print("stopping", file=sys.stderr, flush=True)
        finally:
            await engine.aclose()
    finally:
        sock.close()
    return common.engine_failed(engine, "speech-server")


async def _serve_on_ray(args: argparse.Namespace, batch_models: list[tuple[str, str]]) -> int:
    """Deploy on Ray Serve (replicas load their own engines), then hold until SIGINT/SIGTERM."""
    from moss_agent import options
    from moss_agent._optional import require
    from moss_agent.errors import ConfigError

    replicas = parse_replicas(args.replicas)
    require("ray.serve", "ray")  # before anything loads
    from moss_agent.service import ray_serve
    from moss_agent.service.voices import parse_voice_option

    token, made_up = read_token(args)
    # The device is the replicas' business on a cluster; on a local instance it is this machine's.
    options.check_engine_options(
        argparse.Namespace(**{**vars(args), "device": None}) if args.ray_address else args
    )
    for text in args.voices:  # names and files checked before Ray starts; decoded for the replicas
        name, path = parse_voice_option(text)
        if not path.is_file():
            raise ConfigError(f"--voice {name}={path}: no such file")
    if args.port == 0:  # Serve's proxy wants a real port: take a free one
        with bind(args.host, 0) as probe:
            args.port = probe.getsockname()[1]
    elif args.ray_address is None:  # a local instance: the proxy binds here, so a taken port fails now
        common.check_port(args.host, args.port)
    voices = await asyncio.to_thread(ray_serve.read_voices, args.voices, args.max_voice_seconds)
    deployment = ray_serve.options_from_cli(args, token, replicas, voices, tuple(batch_models))
    if args.tiny:
        print(options.untrained_notice(args), file=sys.stderr, flush=True)
    url = await asyncio.to_thread(ray_serve.deploy, deployment, args.host, args.port, args.ray_address)
    try:
        names = ", ".join(["default", *[name for name, _ in voices]])
        batch = f", batch models: {', '.join(name for name, _ in batch_models)}" if batch_models else ""
        print(f"speech server on {url} (Ray Serve, {replicas[0]}-{replicas[1]} replicas of {args.slots} slots): "
              f"voices: {names}{batch}", flush=True)  # fmt: skip
        if made_up:
            print(f"token: {token}", file=sys.stderr, flush=True)
        elif token is None:
            print("serving WITHOUT authentication (--no-auth)", file=sys.stderr, flush=True)
        await common.wait_for_stop_signal()
        print("stopping", file=sys.stderr, flush=True)
    finally:
        await asyncio.to_thread(ray_serve.shutdown, deployment)
    return 0
