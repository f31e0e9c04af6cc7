"""What a device runs to talk to moss-agent MQTT workers: a wav as its microphone, the reply saved.

    # a broker with users (see docs/mqtt.md), one or more workers:
    MOSS_MQTT_PASSWORD=... moss-agent mqtt-worker --broker 127.0.0.1:1883 --username worker --llm-url ...
    # the device (its broker username is its client id):
    MOSS_MQTT_PASSWORD=... python examples/mqtt_device.py --broker 127.0.0.1:1883 --username kitchen \\
        --wav examples/hello.wav --out reply.wav

Offline trial: the same with ``moss-agent mqtt-worker --tiny`` (random voice, echo responder).
The device opens a session, streams the recording in real time, then silence until the agent's
turn has ended, and writes the agent's audio to ``--out``. ``--text`` sends a typed message instead.
If the session's worker goes away, the device opens a new session (another worker takes it) and
says it again, up to ``--sessions`` times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from moss_agent import MossError, MqttClient, MqttClientSession, MqttSettings, load_audio, write_wav

PACKET_S = 0.1
LINGER_S = 0.3
"""After the agent's turn ended: its last packets are still on their way until none came for this long."""


class WorkerLost(Exception):
    """The session's worker went away (its last will); a new session goes to another worker."""


class SessionFailed(Exception):
    """The worker ended the session, or the agent failed, before the reply was complete."""


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
    parser.add_argument(
        "--timeout", type=float, default=30.0,
        help="give up when the worker has sent nothing (audio or events) for this many seconds after the "
        "device stopped talking (default 30); a reply that is still arriving never times out",
    )  # fmt: skip
    parser.add_argument(
        "--answer-timeout", type=float, default=5.0,
        help="seconds to wait for a worker to take a session request; asked 3 times (default 5)",
    )  # fmt: skip
    parser.add_argument(
        "--sessions", type=int, default=3, help="sessions to try in all when workers go away mid-reply (default 3)"
    )
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.answer_timeout <= 0:
        parser.error("--timeout and --answer-timeout must be positive")
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    return args


def settings(args: argparse.Namespace) -> MqttSettings:
    host, _, port = args.broker.rpartition(":")
    password = args.password_file.read_text().strip() if args.password_file else os.environ.get("MOSS_MQTT_PASSWORD")
    return MqttSettings(
        host=host or args.broker, port=int(port) if host else 1883, username=args.username, password=password,
        topic_root=args.topic_root,
    )  # fmt: skip


async def talk(session: MqttClientSession, speech: np.ndarray | None, args: argparse.Namespace) -> np.ndarray:
    """Say the recording (or the text), then keep the line open until the agent's turn ended.

    Returns the agent's audio [samples] (empty if it sent none). Raises WorkerLost, SessionFailed,
    or TimeoutError when the worker has sent nothing for ``args.timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    rate = session.sample_rate
    reply: list[np.ndarray] = []
    last_heard = loop.time()
    done = asyncio.Event()  # the agent's turn is over, or the session is
    failure: list[Exception] = []

    async def listen() -> None:
        nonlocal last_heard
        async for chunk in session.audio:
            reply.append(chunk.pcm)
            last_heard = loop.time()

    async def watch() -> None:
        nonlocal last_heard
        async for event in session.events():
            last_heard = loop.time()
            kind = event["type"]
            if kind == "text_delta" and event.get("role") == "user" and event.get("text"):
                print(f"you said: {event['text']}")
            elif kind in ("turn_ended", "interrupted"):
                print(f"agent: {event.get('text', event.get('heard_text', ''))}")
            elif kind == "error" and event.get("code") == "worker_lost":
                failure.append(WorkerLost(event.get("message", "")))
            elif kind == "error" and event.get("fatal"):
                failure.append(SessionFailed(event.get("message", "the session failed")))
            elif kind == "error":
                print(f"error: {event.get('message')}", file=sys.stderr)
            elif kind == "metrics":
                done.set()
                return
        if not failure:
            failure.append(SessionFailed("the worker ended the session before the agent's turn was over"))
        done.set()

    tasks = [asyncio.create_task(listen(), name="reply-audio"), asyncio.create_task(watch(), name="events")]
    try:
        if speech is None:
            await session.send_control({"type": "text", "text": args.text})
        else:
            step = round(PACKET_S * rate)
            for start in range(0, len(speech), step):
                if done.is_set():
                    break
                await session.send_audio(speech[start : start + step])
                await asyncio.sleep(PACKET_S)  # a microphone delivers audio in real time
        last_heard = loop.time()  # the worker answers once the user stopped talking
        silence = np.zeros(round(PACKET_S * rate), np.float32)
        while not done.is_set():
            if loop.time() - last_heard > args.timeout:
                raise TimeoutError(
                    f"worker {session.worker_id} sent nothing for {args.timeout:g} s; giving up (--timeout)"
                )
            await session.send_audio(silence)  # so the worker hears the end of the utterance
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), PACKET_S)
        if failure:
            raise failure[0]
        while loop.time() - last_heard < LINGER_S and not session.ended.is_set():
            await asyncio.sleep(LINGER_S / 3)  # the last packets of the reply are still on their way
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return np.concatenate(reply) if reply else np.zeros(0, np.float32)


async def converse(client: MqttClient, speech: np.ndarray | None, args: argparse.Namespace) -> np.ndarray:
    """One reply, on a new session whenever the worker serving the last one went away."""
    for attempt in range(1, args.sessions + 1):
        session = await client.open_session(codec=args.codec, sample_rate=24_000, timeout_s=args.answer_timeout)
        print(f"session {session.id} on worker {session.worker_id}", flush=True)
        try:
            return await talk(session, speech, args)
        except WorkerLost:
            if attempt < args.sessions:
                print(f"worker {session.worker_id} went away; opening a new session", flush=True)
        finally:
            await session.close()
    raise SessionFailed(f"the worker went away in each of {args.sessions} sessions; giving up (--sessions)")


async def run(args: argparse.Namespace) -> int:
    speech = None if args.text else load_audio(args.wav, 24_000)
    async with MqttClient(settings(args)) as client:
        audio = await converse(client, speech, args)
    if not len(audio):
        print(f"the agent sent no audio (its reply was empty); nothing written to {args.out}", file=sys.stderr)
        return 1
    write_wav(args.out, audio, 24_000)
    print(f"wrote {args.out} ({len(audio) / 24_000:.2f} s of agent audio)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (MossError, SessionFailed, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
