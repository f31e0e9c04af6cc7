"""Helpers shared by the CLI subcommands. The options and builders that examples and user scripts
also need live in the public :mod:`moss_agent.options` and are re-exported here for the subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from moss_agent.options import (  # re-exported for the subcommands
    UNTRAINED_NOTICE,
    add_engine_options,
    add_llm_options,
    add_stt_options,
    build_engine,
    build_llm,
    build_stt,
    cache_dir,
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
    "collect_turn",
    "ensure_tiny_batch_checkpoint",
    "ensure_tiny_checkpoints",
    "llm_config",
    "load_voice",
    "session_config",
    "silero_vad",
    "wait_for_stop_signal",
]


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
