"""``moss-agent reply``: one user utterance (a wav) in, the agent's spoken reply (a wav) out.

Runs the whole pipeline once: speech recognition, the LLM, MOSS-TTS-Realtime conditioned on the
user's own audio, the codec. With ``--tiny`` and no ``--llm-url`` it works offline on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from moss_agent.commands import common

# One user turn is seconds long; a whole recording passed as one turn would keep speech recognition
# busy for minutes with nothing to show (and overfill the model's context).
DEFAULT_MAX_INPUT_SECONDS = 60.0
MAX_INPUT_SECONDS = 300.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "reply",
        help="answer a recorded user utterance with a spoken reply (wav in, wav out)",
        description="Transcribe a user's wav, ask the LLM, speak the answer with MOSS-TTS-Realtime "
        "(conditioned on the user's audio) and write it to a wav.",
    )
    parser.add_argument("--input", "-i", type=Path, required=True, help="the user's speech (wav, flac, mp3, m4a...)")
    parser.add_argument("--output", "-o", type=Path, default=Path("reply.wav"), help="where to write the reply")
    parser.add_argument("--transcript", default=None, help="what the user said (skips speech recognition)")
    parser.add_argument(
        "--max-input-seconds",
        type=float,
        default=DEFAULT_MAX_INPUT_SECONDS,
        help=f"longest --input accepted, up to {MAX_INPUT_SECONDS:g} (default {DEFAULT_MAX_INPUT_SECONDS:g})",
    )
    common.add_engine_options(parser, slots=1)
    common.add_llm_options(parser)
    common.add_stt_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_reply(args))


async def _reply(args: argparse.Namespace) -> int:
    from moss_agent.audio import AudioTooLong, load_audio, write_wav
    from moss_agent.errors import AudioError, ConfigError
    from moss_agent.options import session_config
    from moss_agent.streaming.metrics import format_breakdown
    from moss_agent.streaming.session import Session

    limit = args.max_input_seconds
    if not 0 < limit <= MAX_INPUT_SECONDS:  # False for NaN too
        raise ConfigError(f"--max-input-seconds must be in (0, {MAX_INPUT_SECONDS:g}], got {limit}")
    try:
        user_audio = load_audio(args.input, 24000, max_seconds=limit)
    except AudioTooLong as exc:
        raise AudioError(
            f"--input {args.input} is {exc.seconds:.1f} s long; reply takes one user turn of at most "
            f"{limit:g} s: cut the recording, or raise --max-input-seconds (up to {MAX_INPUT_SECONDS:g})"
        ) from None
    llm = common.build_llm(args)
    if args.llm_url:
        await llm.check()  # an unreachable server fails now, not after the models load
    engine = await asyncio.to_thread(common.build_engine, args)
    transcript = args.transcript
    if transcript is None:
        recognizer = common.build_stt(args)
        recognizer.max_seconds = limit  # the input passed the command's own limit
        transcript = (await recognizer.transcribe(user_audio, 24000)).strip()
    print(f"user: {transcript or '(nothing recognised)'}", file=sys.stderr)

    voice = common.load_voice(args)
    config = session_config(args)
    async with engine, Session(engine, llm=llm, config=config, voice_prompt=voice) as session:
        events = session.events()
        handle = session.respond(user_text=transcript, user_audio=user_audio)
        audio, result = await common.collect_turn(events, handle)
    print(f"agent: {result.text}", file=sys.stderr)
    if args.verbose and result.metrics is not None:
        print(format_breakdown(result.metrics), file=sys.stderr)
    # A turn that fails midway keeps what it made and exits 1 (the session printed the error). A
    # model that ends its turn before any audio gave a valid, empty reply: said, and exit 0.
    if not len(audio):
        if result.error is not None:
            print(f"no reply audio; nothing written to {args.output}", file=sys.stderr)
            return 1
        print(f"the reply is empty (the model ended its turn before any audio); nothing written to {args.output}",
              file=sys.stderr)
        return 0
    write_wav(args.output, audio, 24000)
    print(f"wrote {args.output} ({len(audio) / 24000:.2f} s of audio)")
    return 0 if result.error is None else 1
