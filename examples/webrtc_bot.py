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

from moss_agent import SileroVad, WebRTCServer, options, session_handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_llm_options(parser)
    options.add_stt_options(parser)
    options.add_engine_options(parser, slots=4)  # --model, --codec, --tiny, --device, --slots, --max-seconds, ...
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--token", default=None, help="signaling token (default: a random one, printed)")
    parser.add_argument("--loopback-only", action="store_true", help="WebRTC media on 127.0.0.1 only")
    parser.add_argument("--greeting", default="Hello! How can I help?")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    engine = await asyncio.to_thread(options.build_engine, args)  # loading weights blocks: off the loop
    stt = await asyncio.to_thread(options.build_stt, args)
    handler = session_handler(
        engine,
        llm_factory=lambda: options.build_llm(args),
        vad_factory=SileroVad,  # one per connection: the model keeps state
        stt=stt,
        config=options.session_config(args),
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
