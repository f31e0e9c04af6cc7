"""``moss-agent reply``: one user utterance (a wav) in, the agent's spoken reply (a wav) out.

Runs the whole pipeline once: speech recognition, the LLM, MOSS-TTS-Realtime conditioned on the
user's own audio, the codec. With ``--tiny`` and no ``--llm-url`` it works offline on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from moss_agent.commands import common

# One user turn is seconds long; a whole recording passed as one turn would keep speech recognition
# busy for minutes with nothing to show (and overfill the model's context).
DEFAULT_MAX_INPUT_SECONDS = 60.0
MAX_INPUT_SECONDS = 300.0
# The model hears the most recent minute of the user's audio. Its context (4096 rows of 80 ms) holds
# the voice prompt, the user's turn and the whole reply, so five minutes of user audio would leave
# no room to answer; a minute carries the voice and the tone of the turn. The transcript is kept whole.
CONTEXT_AUDIO_SECONDS = 60.0
# What the user said, typed (--transcript): about five minutes of speech.
MAX_TRANSCRIPT_CHARS = 4000


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
        help=f"longest --input accepted, up to {MAX_INPUT_SECONDS:g} (default {DEFAULT_MAX_INPUT_SECONDS:g}); "
        f"all of it is transcribed, the model hears its last {CONTEXT_AUDIO_SECONDS:g} s",
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
    if args.transcript is not None and len(args.transcript) > MAX_TRANSCRIPT_CHARS:
        raise ConfigError(
            f"--transcript is {len(args.transcript)} characters; one user turn takes at most {MAX_TRANSCRIPT_CHARS}"
        )
    try:  # the duration comes from the file's header where it says, before anything is decoded
        async with common.progress(f"reading {args.input}"):
            user_audio = await asyncio.to_thread(load_audio, args.input, 24000, max_seconds=limit)
    except AudioTooLong as exc:
        raise AudioError(
            f"--input {args.input} is {exc.seconds:.1f} s long; reply takes one user turn of at most "
            f"{limit:g} s: cut the recording, or raise --max-input-seconds (up to {MAX_INPUT_SECONDS:g})"
        ) from None
    llm = await common.checked_llm(args)  # an unreachable server fails now, not after the models load
    async with common.progress("loading the models"):
        engine = await asyncio.to_thread(common.build_engine, args)
    transcript, stt_s = args.transcript, None
    if transcript is None:
        recognizer = common.build_stt(args)
        recognizer.max_seconds = limit  # the input passed the command's own limit
        started = time.perf_counter()
        async with common.progress(f"transcribing {len(user_audio) / 24000:.1f} s of speech"):
            transcript = (await recognizer.transcribe(user_audio, 24000)).strip()
        stt_s = time.perf_counter() - started
    print(f"user: {transcript or '(nothing recognised)'}", file=sys.stderr)
    keep = round(CONTEXT_AUDIO_SECONDS * 24000)
    if len(user_audio) > keep:
        print(
            f"the model hears the last {CONTEXT_AUDIO_SECONDS:g} s of the {len(user_audio) / 24000:.1f} s input "
            "(its context also holds the reply); the transcript covers all of it",
            file=sys.stderr,
        )
        user_audio = user_audio[-keep:]

    voice = common.load_voice(args)
    config = session_config(args)
    async with engine, Session(engine, llm=llm, config=config, voice_prompt=voice) as session:
        events = session.events()
        handle = session.respond(user_text=transcript, user_audio=user_audio)
        async with common.progress("speaking the reply"):
            audio, result = await common.collect_turn(events, handle)
    if result.text or result.error is None:  # after a failure with no words, the error says it all
        print(f"agent: {result.text}", file=sys.stderr)
    if args.verbose and result.metrics is not None:
        print(format_breakdown(result.metrics, stt_s=stt_s), file=sys.stderr)
    # A turn that fails midway keeps what it made and exits 1; the session printed the error, which
    # stays the only one shown. A model that ends its turn before any audio gave a valid, empty
    # reply: said, and exit 0 (--min-seconds, 1 s with --tiny, sets a shortest reply).
    if not len(audio):
        if result.error is not None:
            return 1
        print(f"the reply is empty (the model ended its turn before any audio); nothing written to {args.output}",
              file=sys.stderr)
        return 0
    write_wav(args.output, audio, 24000)
    print(f"wrote {args.output} ({len(audio) / 24000:.2f} s of audio)")
    return 0 if result.error is None else 1
