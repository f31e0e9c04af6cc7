"""``moss-agent say``: speak a text with MOSS-TTS-Realtime, to a wav file or the speaker."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from moss_agent.commands import common


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "say", help="speak a text (to a wav, or streamed to the speaker)",
        description="Synthesize TEXT with MOSS-TTS-Realtime. Text is streamed into the model word by "
        "word, as an LLM would send it.",
    )
    parser.add_argument("text", help="what to say ('-' reads standard input)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", "-o", type=Path, default=None, help="write a wav (default: say.wav)")
    target.add_argument("--play", action="store_true", help="stream to the default speaker as it is made")
    parser.add_argument("--output-device", default=None, help="speaker name or index for --play")
    common.add_engine_options(parser, slots=1)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_say(args))


async def _say(args: argparse.Namespace) -> int:
    from moss_agent.audio import write_wav
    from moss_agent.errors import ConfigError, TransportError
    from moss_agent.streaming.metrics import format_breakdown
    from moss_agent.streaming.session import Session

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise ConfigError("nothing to say: the text is empty")
    if args.play:
        from moss_agent.transports.local import LocalAudio, resolve_device

        try:
            resolve_device(args.output_device, "output")  # before the models load
        except TransportError as exc:
            raise TransportError(f"{exc}; or drop --play to write a wav") from exc
    engine = await asyncio.to_thread(common.build_engine, args)
    voice = common.load_voice(args)
    async with engine:
        if args.play:
            async with LocalAudio(output_device=args.output_device, use_input=False) as local, Session(
                engine, output=local.output, voice_prompt=voice
            ) as session:
                result = await session.say(text)
            print(f"played {result.audio_s:.2f} s")
        else:
            async with Session(engine, voice_prompt=voice) as session:
                events = session.events()
                audio, result = await common.collect_turn(events, session.say(text))
            output = args.output or Path("say.wav")
            if len(audio):
                write_wav(output, audio, 24000)
                print(f"wrote {output} ({len(audio) / 24000:.2f} s of audio)")
            else:  # the model ended the turn before any audio: an empty result, not a failure
                print(f"no audio (the model ended its turn at once); nothing written to {output}", file=sys.stderr)
    if args.verbose and result.metrics is not None:
        print(format_breakdown(result.metrics), file=sys.stderr)
    return 0 if result.error is None else 1
