"""``moss-agent say``: speak a text with MOSS-TTS-Realtime, to a wav file or the speaker."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from moss_agent.commands import common

# Text spoken as one turn at most; longer text is split at sentence ends into consecutive turns, as
# `tts` splits it into pieces. A turn holds at most 4096 text tokens and --max-seconds of audio
# (60 s by default), and 200 characters is about 15 s of English or 45 s of Chinese speech.
DEFAULT_TURN_CHARS = 200
TURN_CHARS_RANGE = (8, 1000)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "say", help="speak a text (to a wav, or streamed to the speaker)",
        description="Synthesize TEXT with MOSS-TTS-Realtime. Text is streamed into the model word by "
        "word, as an LLM would send it; text of any length is split at sentence ends and spoken as "
        "consecutive turns.",
    )
    parser.add_argument("text", help="what to say ('-' reads standard input)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", "-o", type=Path, default=None, help="write a wav (default: say.wav)")
    target.add_argument("--play", action="store_true", help="stream to the default speaker as it is made")
    parser.add_argument("--output-device", default=None, help="speaker name or index for --play")
    low, high = TURN_CHARS_RANGE
    parser.add_argument(
        "--max-chars",
        type=int,
        default=DEFAULT_TURN_CHARS,
        help=f"longest text spoken as one turn, {low} to {high}; longer text is split (default {DEFAULT_TURN_CHARS})",
    )
    common.add_engine_options(parser, slots=1)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_say(args))


async def _say(args: argparse.Namespace) -> int:
    import numpy as np

    from moss_agent.audio import write_wav
    from moss_agent.engine.stitch import split_text
    from moss_agent.errors import ConfigError, TransportError
    from moss_agent.streaming.metrics import format_breakdown
    from moss_agent.streaming.session import Session

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise ConfigError("nothing to say: the text is empty")
    low, high = TURN_CHARS_RANGE
    if not low <= args.max_chars <= high:
        raise ConfigError(f"--max-chars must be from {low} to {high}, got {args.max_chars}")
    pieces = split_text(text, args.max_chars)
    if args.play:
        from moss_agent.transports.local import LocalAudio, resolve_device

        try:
            resolve_device(args.output_device, "output")  # before the models load
        except TransportError as exc:
            raise TransportError(f"{exc}; or drop --play to write a wav") from exc
    async with common.progress("loading the models"):
        engine = await asyncio.to_thread(common.build_engine, args)
    voice = common.load_voice(args)
    async with engine:
        if args.play:
            async with LocalAudio(output_device=args.output_device, use_input=False) as local, Session(
                engine, output=local.output, voice_prompt=voice
            ) as session:
                played = 0.0
                for piece in pieces:
                    result = await session.say(piece)
                    played += result.audio_s
                    if result.error is not None:
                        break
            print(f"played {played:.2f} s")
        else:
            async with Session(engine, voice_prompt=voice) as session:
                events = session.events()
                parts = []
                for piece in pieces:
                    part, result = await common.collect_turn(events, session.say(piece))
                    parts.append(part)
                    if result.error is not None:  # keep what was made; the session printed the error
                        break
            audio = np.concatenate(parts)
            output = args.output or Path("say.wav")
            if len(audio):
                write_wav(output, audio, 24000)
                print(f"wrote {output} ({len(audio) / 24000:.2f} s of audio)")
            elif result.error is None:  # the model ended the turn before any audio: empty, not a failure
                print(f"no audio (the model ended its turn at once); nothing written to {output}", file=sys.stderr)
    if args.verbose and result.metrics is not None:
        print(format_breakdown(result.metrics), file=sys.stderr)
    return 0 if result.error is None else 1
