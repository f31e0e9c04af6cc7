"""A LiveKit Agents voice agent that speaks with MOSS-TTS-Realtime (``moss_agent.integrations.livekit``).

LiveKit runs each call (job) in its own process; they all share one GPU engine through the speech
server, so start that first (``--tiny``: tiny random checkpoints, no GPU, the voice is noise)::

    pip install "moss-agent[livekit,service]"
    moss-agent speech-server --tiny --no-auth          # or: --model ... on a GPU box, with a token

Then the worker, with LiveKit's usual settings in the environment::

    export LIVEKIT_URL=wss://<project>.livekit.cloud LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    export MOSS_SPEECH_URL=ws://127.0.0.1:8000         # the speech server (this is the default)
    export MOSS_ENGINE_TOKEN=...                       # its token, unless it runs with --no-auth
    export MOSS_VOICE=alice                            # optional: a voice registered on the server
    python examples/livekit_agent.py dev               # or: start (production), console, connect ...

Speech-to-text and the LLM come from LiveKit Inference (``LIVEKIT_STT`` / ``LIVEKIT_LLM`` name the
models, default ``deepgram/nova-3`` and ``openai/gpt-4.1-mini``); swap in any LiveKit plugin.

Offline (no LiveKit server, nothing to sign up for): speak one text through the plugin, streamed
word by word as an LLM would send it, print the word timings and write a wav::

    python examples/livekit_agent.py synthesize --tiny --out reply.wav        # the engine in process
    python examples/livekit_agent.py synthesize --engine-url ws://127.0.0.1:8000 --out reply.wav
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moss_agent import options, write_wav
from moss_agent.integrations.livekit import DEFAULT_URL, MossTTS

GREETING = "Hello! I am a LiveKit agent, and my voice is MOSS-TTS-Realtime. How can I help?"
INSTRUCTIONS = (
    "You are a friendly voice assistant. Answer in one or two short spoken sentences, without markdown."
)


# -- the LiveKit worker ----------------------------------------------------------------------------


def speech_tts() -> MossTTS:
    """One MossTTS per call: it holds the call's conversation (one engine slot) on the speech server."""
    return MossTTS(
        url=os.environ.get("MOSS_SPEECH_URL", DEFAULT_URL),
        token=os.environ.get("MOSS_ENGINE_TOKEN") or None,
        voice=os.environ.get("MOSS_VOICE") or None,
    )


async def entrypoint(ctx: Any) -> None:
    """A call: MOSS speech, LiveKit Inference for listening and thinking."""
    from livekit.agents import Agent, AgentSession

    tts = speech_tts()
    session: AgentSession[None] = AgentSession(
        stt=os.environ.get("LIVEKIT_STT", "deepgram/nova-3"),
        llm=os.environ.get("LIVEKIT_LLM", "openai/gpt-4.1-mini"),
        tts=tts,
        use_tts_aligned_transcript=True,  # captions follow MOSS's word timings
    )

    @session.on("user_input_transcribed")
    def heard_user(event: Any) -> None:
        # MOSS-TTS-Realtime conditions each answer on what the user said: hand it the final transcript
        if event.is_final and event.transcript.strip():
            tts.add_user_turn(event.transcript)

    ctx.add_shutdown_callback(tts.aclose)
    await session.start(room=ctx.room, agent=Agent(instructions=INSTRUCTIONS))
    await session.say(GREETING)


def run_worker() -> None:
    from livekit.agents import AgentServer, cli

    server = AgentServer()
    server.rtc_session(entrypoint)
    cli.run_app(server)  # LiveKit's own command line: dev, start, console, connect ...


# -- offline: one text through the plugin, to a wav ------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="livekit_agent.py synthesize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--text", default=GREETING, help="what to say")
    parser.add_argument(
        "--out", type=Path, default=Path("reply.wav"), help="the wav to write (default reply.wav)"
    )
    parser.add_argument(
        "--whole", action="store_true", help="synthesize() the whole text instead of streaming it"
    )
    # --engine-url: the plugin's default path (a speech server); else the engine runs here (--tiny, --model)
    options.add_engine_options(parser, slots=1)
    return parser.parse_args(argv)


async def synthesize(args: argparse.Namespace) -> int:
    from livekit.agents import APIConnectOptions, APIError
    from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT

    frames, words = [], []
    async with contextlib.AsyncExitStack() as stack:
        if args.engine_url:  # the plugin's default: speech from a speech server
            token = args.engine_token or os.environ.get("MOSS_ENGINE_TOKEN")
            tts = MossTTS(url=args.engine_url, token=token, voice=args.engine_voice, hold_until_played=False)
        else:  # any SpeechBackend works too: here the engine itself, in this process
            engine = await asyncio.to_thread(
                options.build_engine, args
            )  # loading weights blocks: off the loop
            await stack.enter_async_context(engine)
            tts = MossTTS(backend=engine, hold_until_played=False)
        stack.push_async_callback(tts.aclose)
        # hold_until_played=False: nobody plays this live, so a stream need not wait for a listener
        once = APIConnectOptions(max_retry=0)
        try:
            if args.whole:
                source: Any = tts.synthesize(args.text, conn_options=once)
            else:
                source = tts.stream(conn_options=once)
                for piece in re.findall(r"\S+\s*", args.text):  # as an LLM streams it: a word at a time
                    source.push_text(piece)
                source.end_input()
            async with source:
                async for event in source:
                    frames.append(np.frombuffer(event.frame.data, dtype=np.int16))
                    words += event.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])
        except APIError as exc:
            hint = " (is `moss-agent speech-server` running there?)" if args.engine_url else ""
            print(f"error: {exc}{hint}", file=sys.stderr)
            return 1
    pcm = (np.concatenate(frames) if frames else np.zeros(0, np.int16)).astype(np.float32) / 32768
    for word in words:
        print(f"{word.start_time:6.2f} {word.end_time:6.2f}  {word.strip()}")
    write_wav(args.out, pcm, tts.sample_rate)
    print(f"wrote {args.out} ({len(pcm) / tts.sample_rate:.2f} s, {len(words)} words)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synthesize"]:
        return asyncio.run(synthesize(parse_args(argv[1:])))
    sys.argv[1:] = argv
    run_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main())
