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

from moss_agent.audio import load_audio, write_wav
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
from moss_agent.config import EchoMode, SessionConfig, TurnTakingConfig
from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.serving import converse
from moss_agent.speech.vad import SileroVad


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_llm_options(parser)
    add_stt_options(parser)
    parser.add_argument("--model", default=REALTIME_ID, help=f"MOSS-TTS-Realtime folder or hub id (default {REALTIME_ID})")
    parser.add_argument("--codec", default=CODEC_ID, help=f"MOSS-Audio-Tokenizer folder or hub id (default {CODEC_ID})")
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoints: runs anywhere, the audio is not speech")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--input-device", default=None, help="microphone name or index")
    parser.add_argument("--output-device", default=None, help="speaker name or index")
    parser.add_argument("--echo", choices=("half_duplex", "aec", "none"), default="half_duplex")
    parser.add_argument("--mic-wav", type=Path, default=None, help="use this recording as the microphone (offline)")
    parser.add_argument("--speaker-wav", type=Path, default=Path("assistant.wav"), help="with --mic-wav: the agent's audio")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="longest reply, in seconds of audio")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable audio")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each turn's latency breakdown")
    return parser.parse_args(argv)


def load_engine(args: argparse.Namespace) -> RealtimeEngine:
    model, codec = (ensure_tiny_checkpoints() if args.tiny else (args.model, args.codec))
    frames = max(1, round(args.max_seconds / 0.08))
    config = RealtimeEngineConfig(num_slots=1, max_frames_per_turn=frames, seed=args.seed)
    return RealtimeEngine.load(model, codec, device=args.device, config=config)


async def assist(args: argparse.Namespace) -> int:
    if args.tiny:
        print(UNTRAINED_NOTICE, file=sys.stderr)
    llm_settings = llm_config(args)
    echo_mode: EchoMode = "none" if args.mic_wav else args.echo  # a file cannot hear the speaker
    config = SessionConfig(llm=llm_settings, turns=TurnTakingConfig(echo_mode=echo_mode))
    canceller = None
    if echo_mode == "aec":
        from moss_agent.streaming.echo import WebRtcEchoCanceller

        canceller = WebRtcEchoCanceller(16000)
    engine = await asyncio.to_thread(load_engine, args)
    stt = await asyncio.to_thread(build_stt, args)
    parts: dict[str, Any] = dict(
        llm=build_llm(args),
        vad=SileroVad(), stt=stt, config=config, echo_canceller=canceller, verbose=args.verbose,
    )  # fmt: skip
    async with engine:
        if args.mic_wav is not None:
            return await from_files(engine, args, parts)
        from moss_agent.transports.local import LocalAudio

        def device(spec: str | None) -> int | str | None:
            return int(spec) if spec is not None and spec.isdigit() else spec

        async with LocalAudio(
            input_device=device(args.input_device), output_device=device(args.output_device),
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
    write_wav(args.speaker_wav, audio, engine.sample_rate)
    print(f"wrote {args.speaker_wav} ({len(audio) / engine.sample_rate:.2f} s); {summary.turns} turn(s)")
    return 0 if summary.turns else 1


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(assist(parse_args(argv)))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
