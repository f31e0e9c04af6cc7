"""A voice assistant on this machine's microphone and speaker (or on wav files, offline).

    # real models on a GPU, any OpenAI-compatible LLM, default microphone and speaker
    python examples/local_assistant.py --llm-url http://127.0.0.1:8000/v1 --llm-model Qwen/Qwen3-8B

    # offline, no sound card: a wav is the microphone, the agent's audio goes to a wav
    python examples/local_assistant.py --tiny --mic-wav examples/hello.wav --speaker-wav reply.wav

On open speakers the agent stops listening while it talks (half duplex) so it does not answer
itself; ``--echo aec`` cancels the echo instead (package aec-audio-processing) and lets you
interrupt it; ``--echo none`` is for headsets. ``moss-agent chat`` is the same program.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from moss_agent import (
    EchoMode,
    RealtimeEngine,
    SileroVad,
    TurnTakingConfig,
    converse,
    load_audio,
    options,
    write_wav,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_llm_options(parser)
    options.add_stt_options(parser)
    options.add_engine_options(parser, slots=1)  # --model, --codec, --tiny, --device, --max-seconds, --seed, ...
    parser.add_argument("--input-device", default=None, help="microphone name or index")
    parser.add_argument("--output-device", default=None, help="speaker name or index")
    parser.add_argument("--echo", choices=("half_duplex", "aec", "none"), default="half_duplex")
    parser.add_argument("--mic-wav", type=Path, default=None, help="use this recording as the microphone (offline)")
    parser.add_argument("--speaker-wav", type=Path, default=Path("assistant.wav"), help="with --mic-wav: the agent's audio")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each turn's latency breakdown")
    return parser.parse_args(argv)


async def assist(args: argparse.Namespace) -> int:
    echo_mode: EchoMode = "none" if args.mic_wav else args.echo  # a file cannot hear the speaker
    config = options.session_config(args, turns=TurnTakingConfig(echo_mode=echo_mode))
    canceller = None
    if echo_mode == "aec":
        from moss_agent import WebRtcEchoCanceller

        canceller = WebRtcEchoCanceller(16000)
    engine = await asyncio.to_thread(options.build_engine, args)  # loading weights blocks: off the loop
    stt = await asyncio.to_thread(options.build_stt, args)
    parts: dict[str, Any] = dict(
        llm=options.build_llm(args),
        vad=SileroVad(), stt=stt, config=config, echo_canceller=canceller, verbose=args.verbose,
    )  # fmt: skip
    async with engine:
        if args.mic_wav is not None:
            return await from_files(engine, args, parts)
        from moss_agent import LocalAudio

        async with LocalAudio(
            input_device=args.input_device, output_device=args.output_device,  # a name, or an index as digits
            sample_rate=engine.sample_rate,
        ) as audio:  # fmt: skip
            print("listening; Ctrl-C stops", file=sys.stderr)
            await converse(engine, input=audio.input, output=audio.output, **parts)
    return 0


async def from_files(engine: RealtimeEngine, args: argparse.Namespace, parts: dict[str, Any]) -> int:
    """The recording is spoken once (then silence); the first reply is written to --speaker-wav."""
    from moss_agent.testing import FakeAudioInput, FakeAudioOutput

    mic = FakeAudioInput(engine.sample_rate)
    speaker = FakeAudioOutput(engine.sample_rate)

    async def speak() -> None:
        await mic.push(load_audio(args.mic_wav, engine.sample_rate))
        await mic.push_silence(2.0)

    feeder = asyncio.create_task(speak(), name="mic-wav")
    try:
        summary = await converse(engine, input=mic, output=speaker, max_turns=1, **parts)
    finally:
        feeder.cancel()
        await speaker.aclose()
    audio = speaker.played_audio()
    if len(audio):
        write_wav(args.speaker_wav, audio, engine.sample_rate)
        print(f"wrote {args.speaker_wav} ({len(audio) / engine.sample_rate:.2f} s); {summary.turns} turn(s)")
    else:  # the model ended its reply before any audio
        print(f"{summary.turns} turn(s), no agent audio; nothing written to {args.speaker_wav}")
    return 0 if summary.turns else 1


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(assist(parse_args(argv)))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
