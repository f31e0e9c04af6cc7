"""What a device runs to talk to moss-agent MQTT workers: a wav as its microphone, the reply saved.

    # a broker with users (see docs/mqtt.md), one or more workers:
    MOSS_MQTT_PASSWORD=... moss-agent mqtt-worker --broker 127.0.0.1:1883 --username worker --llm-url ...
    # the device (its broker username is its client id):
    MOSS_MQTT_PASSWORD=... python examples/mqtt_device.py --broker 127.0.0.1:1883 --username kitchen \\
        --wav examples/hello.wav --out reply.wav

Offline trial: the same with ``moss-agent mqtt-worker --tiny`` (random voice, echo responder).
The device opens a session, streams the recording in real time, then silence until the agent's
turn has ended, and writes the agent's audio to ``--out``. ``--text`` sends a typed message instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from moss_agent import MqttClient, MqttClientSession, MqttSettings, load_audio, write_wav

PACKET_S = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="127.0.0.1:1883", help="host:port of the MQTT 5 broker")
    parser.add_argument("--username", required=True, help="this device's broker username (also its client id)")
    parser.add_argument("--password-file", type=Path, default=None, help="password file (else $MOSS_MQTT_PASSWORD)")
    parser.add_argument("--topic-root", default="moss/v1")
    parser.add_argument("--wav", type=Path, default=Path(__file__).with_name("hello.wav"), help="what the user says")
    parser.add_argument("--text", default=None, help="send this typed message instead of the recording")
    parser.add_argument("--out", type=Path, default=Path("reply.wav"), help="where the agent's reply goes")
    parser.add_argument("--codec", choices=("opus", "pcm16"), default="opus")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> MqttSettings:
    host, _, port = args.broker.rpartition(":")
    password = args.password_file.read_text().strip() if args.password_file else os.environ.get("MOSS_MQTT_PASSWORD")
    return MqttSettings(
        host=host or args.broker, port=int(port) if host else 1883, username=args.username, password=password,
        topic_root=args.topic_root,
    )  # fmt: skip


async def talk(session: MqttClientSession, args: argparse.Namespace) -> np.ndarray:
    """Say the recording (or the text), then keep the line open until the agent's turn ended."""
    rate = session.sample_rate
    reply: list[np.ndarray] = []
    turn_over = asyncio.Event()

    async def listen() -> None:
        async for chunk in session.audio:
            reply.append(chunk.pcm)

    async def watch() -> None:
        async for event in session.events():
            kind = event["type"]
            if kind == "text_delta" and event.get("role") == "user" and event.get("text"):
                print(f"you said: {event['text']}")
            elif kind in ("turn_ended", "interrupted"):
                print(f"agent: {event.get('text', event.get('heard_text', ''))}")
            elif kind == "error":
                print(f"error: {event['message']}", file=sys.stderr)
            elif kind == "metrics":
                turn_over.set()
                return

    tasks = [asyncio.create_task(listen(), name="reply-audio"), asyncio.create_task(watch(), name="events")]
    if args.text:
        await session.send_control({"type": "text", "text": args.text})
    else:
        speech = load_audio(args.wav, rate)
        step = round(PACKET_S * rate)
        for start in range(0, len(speech), step):
            await session.send_audio(speech[start : start + step])
            await asyncio.sleep(PACKET_S)  # a microphone delivers audio in real time
    while not turn_over.is_set():  # silence, so the worker hears the end of the utterance
        await session.send_audio(np.zeros(round(PACKET_S * rate), np.float32))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(turn_over.wait(), PACKET_S)
    await asyncio.sleep(0.3)  # the last packets of the reply are still on their way
    for task in tasks:
        task.cancel()
    return np.concatenate(reply) if reply else np.zeros(0, np.float32)


async def run(args: argparse.Namespace) -> int:
    async with MqttClient(settings(args)) as client:
        session = await client.open_session(codec=args.codec, sample_rate=24_000)
        print(f"session {session.id} on worker {session.worker_id}")
        try:
            async with asyncio.timeout(args.timeout):
                audio = await talk(session, args)
        finally:
            await session.close()
    if not len(audio):
        print(f"the agent sent no audio; nothing written to {args.out}")
        return 1
    write_wav(args.out, audio, 24_000)
    print(f"wrote {args.out} ({len(audio) / 24_000:.2f} s of agent audio)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
