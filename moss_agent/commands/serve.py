"""``moss-agent serve``: a WebRTC voice bot with its web page; one conversation per browser tab."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys

from moss_agent.commands import common


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "serve",
        help="serve a WebRTC voice bot and its web page",
        description="Serve the voice page and WebRTC signaling. Each browser tab that connects gets its "
        "own conversation (one engine slot). Browsers only open the microphone on https:// or on "
        "127.0.0.1/localhost: for other machines put the server behind an HTTPS reverse proxy.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port, 0 to 65535 (default 8080; 0 picks a free one)")
    parser.add_argument("--token", default=None, help="signaling token clients must present (default: a new random one)")
    parser.add_argument(
        "--loopback-only", action="store_true",
        help="keep WebRTC media on 127.0.0.1 (a browser on this machine; hosts without a network)",
    )  # fmt: skip
    parser.add_argument(
        "--ice-server", action="append", default=[], metavar="URL",
        help="a STUN or TURN server for clients behind NAT, e.g. stun:stun.l.google.com:19302 or "
             "turn:turn.example.com:3478 (repeatable; the page and the server both use them)",
    )
    parser.add_argument("--ice-username", default=None, help="username for the TURN servers")
    parser.add_argument(
        "--ice-credential", default=None, help="credential for the TURN servers (default: $MOSS_TURN_CREDENTIAL)"
    )
    common.add_engine_options(parser, slots=4)
    common.add_llm_options(parser)
    common.add_stt_options(parser)
    common.add_listening_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from moss_agent._optional import require
    from moss_agent.serving import session_handler
    from moss_agent.transports.webrtc import WebRTCServer, ice_servers_from_urls

    for module in ("aiortc", "aiohttp.web"):  # before the models load
        require(module, "webrtc")
    common.check_port(args.host, args.port)
    await common.check_llm_server(args)
    token = args.token or secrets.token_urlsafe(16)
    credential = args.ice_credential or os.environ.get("MOSS_TURN_CREDENTIAL")
    ice_servers = ice_servers_from_urls(args.ice_server, args.ice_username, credential)
    engine, stt, voice = await common.build_speech_stack(args)
    handler = session_handler(
        engine, llm_factory=lambda: common.build_llm(args), vad_factory=common.silero_vad, stt=stt,
        config=common.session_config(args), voice_prompt=voice, greeting=args.greeting,
    )  # fmt: skip
    server = WebRTCServer(
        handler, token=token, host=args.host, port=args.port, output_rate=engine.sample_rate,
        loopback_only=args.loopback_only, ice_servers=ice_servers,
    )  # fmt: skip
    async with engine:
        url = await server.start()
        try:
            print(f"serving {args.slots} conversation slots; open {url}?token={token}", flush=True)
            if not args.token:
                print(f"token: {token}", file=sys.stderr, flush=True)
            await common.wait_for_stop_signal(engine)
            print("stopping", file=sys.stderr, flush=True)
        finally:
            await server.stop()
    return common.engine_failed(engine, "serve")
