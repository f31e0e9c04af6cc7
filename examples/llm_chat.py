"""Type to an LLM and hear it answer: any OpenAI-compatible server + MOSS-TTS-Realtime.

    # a real LLM (vLLM, SGLang, Ollama, llama.cpp, OpenAI...), speech played on the speaker
    python examples/llm_chat.py --llm-url http://127.0.0.1:8000/v1 --llm-model Qwen/Qwen3-8B

    # offline: tiny random checkpoints (not speech!) and an echo responder, replies written as wavs
    python examples/llm_chat.py --tiny --out-dir replies

Each line you type is one user turn; the reply's text is printed as it streams and its audio plays
(or goes to ``<out-dir>/reply_<turn>.wav``). An empty line or end of input quits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from moss_agent import AudioChunk, ErrorEvent, Session, TextDelta, options, write_wav


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_llm_options(parser)
    options.add_engine_options(parser, slots=1)  # --model, --codec, --tiny, --device, --max-seconds, --seed, ...
    parser.add_argument("--out-dir", type=Path, default=None, help="write each reply to a wav here instead of playing it")
    parser.add_argument("--output-device", default=None, help="speaker name or index")
    return parser.parse_args(argv)


async def read_line(prompt: str) -> str:
    print(prompt, end="", flush=True)
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def chat(args: argparse.Namespace) -> int:
    if args.tiny and args.out_dir is None:
        args.out_dir = Path("replies")
    llm = options.build_llm(args)  # without --llm-url: an offline echo responder
    engine = await asyncio.to_thread(options.build_engine, args)  # loading weights blocks: off the loop
    speaker = None
    if args.out_dir is None:
        from moss_agent import LocalAudio

        speaker = LocalAudio(use_input=False, output_device=args.output_device, sample_rate=engine.sample_rate)
        await speaker.start()
    try:
        output = speaker.output if speaker is not None else None
        async with engine, Session(engine, llm=llm, output=output, config=options.session_config(args)) as session:
            while line := await read_line("you> "):
                turn = session.respond(user_text=line)
                audio = []
                print("agent> ", end="", flush=True)
                async for event in turn:  # this turn's events; ends with the turn
                    if isinstance(event, TextDelta):
                        print(event.text, end="", flush=True)
                    elif isinstance(event, AudioChunk):
                        audio.append(event.pcm)
                    elif isinstance(event, ErrorEvent):
                        print(f"\nerror: {event.message}", file=sys.stderr)
                result = await turn
                print(f"\n  ({result.audio_s:.2f} s of audio)")
                if args.out_dir is not None and audio:
                    import numpy as np

                    path = args.out_dir / f"reply_{turn.id}.wav"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_wav(path, np.concatenate(audio), engine.sample_rate)
                    print(f"  wrote {path}")
    finally:
        if speaker is not None:
            await speaker.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(chat(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
