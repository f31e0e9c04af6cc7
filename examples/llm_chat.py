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
import os
import sys
from pathlib import Path
from typing import Any

from moss_agent.audio import write_wav
from moss_agent.commands.common import CODEC_ID, REALTIME_ID, UNTRAINED_NOTICE, ensure_tiny_checkpoints
from moss_agent.config import LLMConfig, SessionConfig
from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.events import AudioChunk, ErrorEvent, Metrics, TextDelta
from moss_agent.streaming.llm import EchoResponder, OpenAIChatLLM
from moss_agent.streaming.session import Session


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-url", default=None, help="OpenAI-compatible base URL (default: offline echo responder)")
    parser.add_argument("--llm-model", default="default", help="model name the server expects")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "not-needed"))
    parser.add_argument("--model", default=REALTIME_ID, help=f"MOSS-TTS-Realtime folder or hub id (default {REALTIME_ID})")
    parser.add_argument("--codec", default=CODEC_ID, help=f"MOSS-Audio-Tokenizer folder or hub id (default {CODEC_ID})")
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoints: runs anywhere, the audio is not speech")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write each reply to a wav here instead of playing it")
    parser.add_argument("--output-device", default=None, help="speaker name or index")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="longest reply, in seconds of audio")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable audio")
    return parser.parse_args(argv)


def load_engine(args: argparse.Namespace) -> RealtimeEngine:
    model, codec = (ensure_tiny_checkpoints() if args.tiny else (args.model, args.codec))
    frames = max(1, round(args.max_seconds / 0.08))
    config = RealtimeEngineConfig(num_slots=1, max_frames_per_turn=frames, seed=args.seed)
    return RealtimeEngine.load(model, codec, device=args.device, config=config)


async def read_line(prompt: str) -> str:
    print(prompt, end="", flush=True)
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def chat(args: argparse.Namespace) -> int:
    if args.tiny:
        print(UNTRAINED_NOTICE, file=sys.stderr)
        if args.out_dir is None:
            args.out_dir = Path("replies")
    llm: Any = OpenAIChatLLM(LLMConfig(args.llm_url, args.llm_model, args.api_key)) if args.llm_url else EchoResponder()
    engine = await asyncio.to_thread(load_engine, args)
    speaker = None
    if args.out_dir is None:
        from moss_agent.transports.local import LocalAudio

        speaker = LocalAudio(use_input=False, output_device=args.output_device, sample_rate=engine.sample_rate)
        await speaker.start()
    try:
        output = speaker.output if speaker is not None else None
        async with engine, Session(engine, llm=llm, output=output, config=SessionConfig()) as session:
            while line := await read_line("you> "):
                events = session.events()
                handle = session.respond(user_text=line)
                audio = []
                print("agent> ", end="", flush=True)
                async for event in events:
                    if isinstance(event, TextDelta) and event.turn_id == handle.id:
                        print(event.text, end="", flush=True)
                    elif isinstance(event, AudioChunk) and event.turn_id == handle.id:
                        audio.append(event.pcm)
                    elif isinstance(event, ErrorEvent):
                        print(f"\nerror: {event.message}", file=sys.stderr)
                    elif isinstance(event, Metrics) and event.turn_id == handle.id:
                        break
                events.close()
                result = await handle
                print(f"\n  ({result.audio_s:.2f} s of audio)")
                if args.out_dir is not None and audio:
                    import numpy as np

                    path = args.out_dir / f"reply_{handle.id}.wav"
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
