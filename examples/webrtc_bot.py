"""A voice bot in the browser: WebRTC audio both ways, one conversation (engine slot) per tab.

    python examples/webrtc_bot.py --llm-url http://127.0.0.1:8000/v1 --llm-model Qwen/Qwen3-8B
    # then open the printed URL (http://127.0.0.1:8080/?token=...) and allow the microphone

    # offline trial: tiny random checkpoints (the voice is noise) and an echo responder
    python examples/webrtc_bot.py --tiny

Browsers open the microphone only on https:// or on 127.0.0.1/localhost. The same server is
``moss-agent serve``; this file shows the few SDK calls behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys

from moss_agent.commands.common import (
    CODEC_ID,
    REALTIME_ID,
    UNTRAINED_NOTICE,
    add_llm_options,
    add_stt_options,
    build_llm,
    build_stt,
    ensure_tiny_checkpoints,
    llm_config,
)
from moss_agent.config import SessionConfig
from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.serving import session_handler
from moss_agent.speech.vad import SileroVad
from moss_agent.transports.webrtc import WebRTCServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llm_options(parser)
    add_stt_options(parser)
    parser.add_argument("--model", default=REALTIME_ID, help=f"MOSS-TTS-Realtime folder or hub id (default {REALTIME_ID})")
    parser.add_argument("--codec", default=CODEC_ID, help=f"MOSS-Audio-Tokenizer folder or hub id (default {CODEC_ID})")
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoints: runs anywhere, the audio is not speech")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--slots", type=int, default=4, help="conversations at once")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--token", default=None, help="signaling token (default: a random one, printed)")
    parser.add_argument("--loopback-only", action="store_true", help="WebRTC media on 127.0.0.1 only")
    parser.add_argument("--greeting", default="Hello! How can I help?")
    return parser.parse_args(argv)


def load_engine(args: argparse.Namespace) -> RealtimeEngine:
    model, codec = (ensure_tiny_checkpoints() if args.tiny else (args.model, args.codec))
    config = RealtimeEngineConfig(num_slots=args.slots, max_frames_per_turn=400)  # 32 s per reply at most
    return RealtimeEngine.load(model, codec, device=args.device, config=config)


async def serve(args: argparse.Namespace) -> int:
    if args.tiny:
        print(UNTRAINED_NOTICE, file=sys.stderr)
    llm_settings = llm_config(args)
    engine = await asyncio.to_thread(load_engine, args)
    stt = await asyncio.to_thread(build_stt, args)
    handler = session_handler(
        engine,
        llm_factory=lambda: build_llm(args),
        vad_factory=SileroVad,  # one per connection: the model keeps state
        stt=stt,
        config=SessionConfig(llm=llm_settings),
        greeting=args.greeting or None,
    )
    token = args.token or secrets.token_urlsafe(16)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with engine, WebRTCServer(
        handler, token=token, host=args.host, port=args.port, output_rate=engine.sample_rate,
        loopback_only=args.loopback_only,
    ) as server:  # fmt: skip
        print(f"open {server.url}?token={token}", flush=True)
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
