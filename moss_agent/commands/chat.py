"""``moss-agent chat``: talk to the agent through this machine's microphone and speaker.

Echo: with open speakers the microphone hears the agent, so by default the agent does not listen
while it speaks (``--echo half_duplex``: no barge-in). ``--echo aec`` cancels the echo with the
WebRTC audio processing module (package ``aec-audio-processing``) and allows barge-in; ``--echo
none`` trusts a headset.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from moss_agent.commands import common


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "chat",
        help="talk with the agent through the microphone and speaker",
        description="A local voice assistant: microphone -> VAD -> speech recognition -> LLM -> "
        "MOSS-TTS-Realtime -> speaker. Ctrl-C ends it. -v prints per-turn latency.",
    )
    parser.add_argument("--input-device", default=None, help="microphone name (part of it) or index (default: system)")
    parser.add_argument("--output-device", default=None, help="speaker name (part of it) or index (default: system)")
    parser.add_argument("--list-devices", action="store_true", help="list the audio devices and exit")
    parser.add_argument(
        "--echo", choices=("half_duplex", "aec", "none"), default="half_duplex",
        help="half_duplex: do not listen while speaking (open speakers, the default); aec: echo "
        "cancellation with barge-in (needs aec-audio-processing); none: a headset",
    )  # fmt: skip
    common.add_engine_options(parser, slots=1)
    common.add_llm_options(parser)
    common.add_stt_options(parser)
    common.add_listening_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.list_devices:
        from moss_agent.transports.local import list_devices

        devices = list_devices()
        if not devices:
            print(
                "no audio devices found: PortAudio sees no sound card and no sound server "
                "(PulseAudio, PipeWire, JACK); check `python -m sounddevice`",
                file=sys.stderr,
            )
        for device in devices:
            print(
                f"{device['index']:3d}  {device['name']}  (in {device['max_input_channels']}, "
                f"out {device['max_output_channels']}, {device['default_samplerate']:.0f} Hz, {device['hostapi']})"
            )
        return 0
    return asyncio.run(_chat(args))


def echo_canceller(mode: str) -> Any:
    """The echo canceller for ``--echo aec`` (None otherwise); a clear error when it is not installed."""
    if mode != "aec":
        return None
    from moss_agent.streaming.echo import WebRtcEchoCanceller

    return WebRtcEchoCanceller(16000)


async def _chat(args: argparse.Namespace) -> int:
    from moss_agent._optional import require
    from moss_agent.serving import converse
    from moss_agent.transports.local import LocalAudio, resolve_device

    canceller = echo_canceller(args.echo)
    # The devices, the VAD and the LLM server are checked before the models load (a minute on a CPU).
    resolve_device(args.input_device, "input")
    resolve_device(args.output_device, "output")
    require("silero_vad", "vad")
    llm = await common.checked_llm(args)
    engine, stt, voice = await common.build_speech_stack(args)
    config = common.session_config(args, echo_mode=args.echo)
    async with engine, LocalAudio(
        input_device=args.input_device, output_device=args.output_device,
        sample_rate=engine.sample_rate,
    ) as audio:  # fmt: skip
        print("listening; speak to the agent (Ctrl-C to stop)", file=sys.stderr)
        stop = asyncio.create_task(common.wait_for_stop_signal(engine), name="chat-stop")
        summary = await converse(
            engine, input=audio.input, output=audio.output, llm=llm, vad=common.silero_vad(),
            stt=stt, config=config, echo_canceller=canceller, voice_prompt=voice, greeting=args.greeting,
            verbose=args.verbose, stop=stop,
        )  # fmt: skip
    if args.verbose:
        print(summary.format(), file=sys.stderr)
    return common.engine_failed(engine, "chat")
