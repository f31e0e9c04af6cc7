"""Helpers shared by the CLI subcommands. The options and builders that examples and user scripts
also need live in the public :mod:`moss_agent.options` and are re-exported here for the subcommands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from moss_agent.errors import ConfigError
from moss_agent.options import (  # re-exported for the subcommands
    UNTRAINED_NOTICE,
    add_engine_options,
    add_llm_options,
    add_stt_options,
    build_engine,
    build_llm,
    build_stt,
    cache_dir,
    check_device,
    check_engine_options,
    check_llm_options,
    ensure_tiny_batch_checkpoint,
    ensure_tiny_checkpoints,
    llm_config,
)
from moss_agent.options import session_config as _session_config

log = logging.getLogger(__name__)

__all__ = [
    "UNTRAINED_NOTICE",
    "add_engine_options",
    "add_listening_options",
    "add_llm_options",
    "add_stt_options",
    "build_engine",
    "build_llm",
    "build_speech_stack",
    "build_stt",
    "cache_dir",
    "check_args",
    "check_output_file",
    "check_port",
    "checked_llm",
    "collect_turn",
    "ensure_tiny_batch_checkpoint",
    "ensure_tiny_checkpoints",
    "llm_config",
    "load_voice",
    "progress",
    "session_config",
    "silero_vad",
    "wait_for_stop_signal",
]


# --------------------------------------------------------------------------------------------------
# Checks of what the user typed, run before anything loads: a mistake costs seconds, not the minute
# the models take to load. Each raises ConfigError (exit code 2) in the user's terms.


def check_args(args: argparse.Namespace) -> None:
    """The options every command shares, by group: engine, device, LLM/STT URLs, output files.
    ``moss-agent`` runs it before a command's handler; commands check their own options first thing."""
    if hasattr(args, "slots"):  # the realtime engine options
        check_engine_options(args)
    elif hasattr(args, "device"):  # the batch commands
        check_device(args.device)
    check_llm_options(args)
    if isinstance(getattr(args, "output", None), Path):
        check_output_file(args.output, "--output")
    if isinstance(getattr(args, "output_dir", None), Path):
        check_output_folder(args.output_dir, "--output-dir")


def check_output_file(path: Path, option: str) -> None:
    """``path`` can be written: its folder exists and is writable, and it is not a folder itself."""
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name, e.g. {path / 'out.wav'}")
    folder = path.parent
    if not folder.exists():
        raise ConfigError(f"{option} {path}: the folder {folder} does not exist; create it first (mkdir -p {folder})")
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: {folder} is a file, not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path} exists and cannot be overwritten (permission denied)")
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write into the folder {folder} (permission denied or read-only)")


def check_output_folder(folder: Path, option: str) -> None:
    """``folder`` is a folder, or can be made: its nearest existing ancestor is a writable folder."""
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{option} {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {folder}: cannot write into it (permission denied or read-only)")
        return
    ancestor = folder.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {folder} cannot be created: {ancestor} is not a writable folder")


def listen_addresses(host: str, port: int, option: str = "--port") -> list[Any]:
    """``getaddrinfo`` for a listening socket on host:port; ConfigError for a port out of range or a
    host that does not resolve."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option} must be from 0 to 65535 (0 picks a free one), got {port}")
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} cannot be resolved ({exc.strerror})") from None


def check_port(host: str, port: int, option: str = "--port") -> None:
    """A server can listen on ``host``:``port`` (0: any free port): bound once and released, as the
    server will bind it (SO_REUSEADDR), so a port in use fails now rather than after the models load."""
    for family, kind, proto, _name, address in listen_addresses(host, port, option):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{option} {port} on {host} is in use by another program; stop it, or pick another "
                        f"port ({option} 0 picks a free one)"
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(f"--host {host} is not an address of this machine") from None
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@contextlib.asynccontextmanager
async def progress(what: str, *, after_s: float = 2.0, every_s: float = 10.0) -> AsyncIterator[None]:
    """Say on stderr that a slow step is still running: nothing for a step shorter than ``after_s``,
    then ``... what (N s)`` every ``every_s`` seconds and ``... what: done in N s`` at its end.
    The step must run off the event loop (a thread, the engine), or the loop cannot report it."""
    started = time.monotonic()
    shown = False

    async def report() -> None:
        nonlocal shown
        await asyncio.sleep(after_s)
        while True:
            shown = True
            print(f"... {what} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
            await asyncio.sleep(every_s)

    reporter = asyncio.create_task(report(), name=f"progress: {what}")
    try:
        yield
    finally:
        reporter.cancel()
        await asyncio.wait([reporter])  # its own cancellation, never swallowing ours
    if shown:
        print(f"... {what}: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


async def checked_llm(args: argparse.Namespace) -> Any:
    """``build_llm(args)``, its server reached once now (before the models load) when there is one;
    without --llm-model the server's one model is taken, said, and kept in ``args`` for later sessions."""
    llm = build_llm(args)
    if args.llm_url:
        await llm.check()
        if not args.llm_model:
            args.llm_model = llm.model
            print(f"LLM model: {llm.model} (the one the server lists)", file=sys.stderr)
    return llm


async def check_llm_server(args: argparse.Namespace) -> None:
    """For commands that build an LLM per conversation: refuse an LLM server that cannot answer now,
    before the models load, rather than at each conversation's first turn."""
    llm = await checked_llm(args)
    if hasattr(llm, "aclose"):
        await llm.aclose()


def load_voice(args: argparse.Namespace) -> Any:
    from moss_agent.audio import load_audio

    return None if args.voice is None else load_audio(args.voice, 24000)


async def collect_turn(events: Any, handle: Any) -> tuple[Any, Any]:
    """Gather one turn's agent audio from a session's event stream -> (float32 pcm, TurnResult).

    ``events`` must be subscribed before the turn starts; a turn's Metrics event is its last.
    """
    import numpy as np

    from moss_agent.events import AudioChunk, ErrorEvent, Metrics

    chunks = []
    async for event in events:
        if isinstance(event, AudioChunk) and event.turn_id == handle.id:
            chunks.append(event.pcm)
        elif isinstance(event, ErrorEvent):
            print(f"error: {event.message}", file=sys.stderr)
        elif isinstance(event, Metrics) and event.turn_id == handle.id:
            break
    result = await handle
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return audio, result


def add_listening_options(parser: argparse.ArgumentParser) -> None:
    """Options of commands that listen to a user (serve, chat, mqtt-worker)."""
    group = parser.add_argument_group("conversation")
    group.add_argument("--greeting", default=None, help="what the agent says when a conversation starts")
    group.add_argument("--hang", type=float, default=0.6, help="seconds of silence that end the user's turn (default 0.6)")


def session_config(args: argparse.Namespace, *, echo_mode: str = "none") -> Any:
    """The SessionConfig from the LLM and listening options."""
    from moss_agent.config import TurnTakingConfig

    return _session_config(args, turns=TurnTakingConfig(hang_s=args.hang, echo_mode=echo_mode))  # type: ignore[arg-type]


def silero_vad() -> Any:
    """A fresh Silero VAD (one per listening stream: the model is recurrent)."""
    from moss_agent.speech.vad import SileroVad

    return SileroVad()


async def build_speech_stack(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(engine, recognizer, voice prompt) from the options; the slow loading runs off the event loop."""
    async with progress("loading the models"):
        engine = await asyncio.to_thread(build_engine, args)
        stt = await asyncio.to_thread(build_stt, args)
    return engine, stt, load_voice(args)


async def wait_for_stop_signal(engine: Any = None) -> None:
    """Return on SIGINT or SIGTERM (so a server can shut down cleanly and exit 0), or when
    ``engine`` fails for good (then ``engine_failed`` gives the exit status)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if engine is not None:
        engine.on_failure(lambda _error: stop.set())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def engine_failed(engine: Any, command: str) -> int:
    """0, or (the engine failed for good) say why and return 1, so a supervisor restarts the process."""
    if engine.failure is None:
        return 0
    print(f"moss-agent {command}: {engine.failure}", file=sys.stderr, flush=True)
    return 1
