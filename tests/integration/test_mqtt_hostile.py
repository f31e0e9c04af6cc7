"""Issue 15's MQTT cases, replayed against a real mosquitto (docs/mosquitto/mosquitto.conf) and real
workers: each hostile input gets a clear answer (an error event, or the broker's refusal), and a good
device is served normally afterwards.

Run with ``-s`` to see the flood figures (worker memory, the other device's latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("aiomqtt")

import aiomqtt
import paho.mqtt.client as paho
from mqtt_broker import Broker, next_event, run_broker, settings_for
from transport_signals import RATE, tone, tone_agent

from moss_agent.errors import TransportError
from moss_agent.transports.mqtt import MqttClient, MqttClientSession, MqttLimits, MqttWorker
from moss_agent.transports.mqtt_protocol import Topics, encode_json

REPO = Path(__file__).resolve().parents[2]
TOPICS = Topics()
TIMEOUT_S = 30
IDLE_S = 1.0
NESTED = b"[" * 20000 + b"]" * 20000
DEVICES = ["dev1", "dev2", "app", "flood", "calm", *(f"thief{i}" for i in range(5))]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    users = {"worker": "worker-secret", **{d: f"pw-{d}" for d in DEVICES}}
    with run_broker(tmp_path_factory.mktemp("mosquitto"), users) as running:
        yield running


def raw_client(broker: Broker, user: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host, broker.port, username=user, password=broker.passwords[user], protocol=aiomqtt.ProtocolVersion.V5
    )


@contextlib.asynccontextmanager
async def serving(broker: Broker, **options: object) -> AsyncIterator[MqttWorker]:
    """An in-process worker with short limits, stopped (and checked alive) at the end."""
    limits = options.pop("limits", MqttLimits(session_idle_s=IDLE_S))
    worker = MqttWorker(
        tone_agent, settings_for(broker, "worker"), worker_id="hostile", limits=limits, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    task = asyncio.create_task(worker.run(), name="test-worker")
    await asyncio.wait_for(worker.ready.wait(), 10)
    try:
        yield worker
        assert not task.done(), "the worker stopped"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_client_event(client: MqttClient) -> dict:
    async for event in client.client_events():
        return event
    raise AssertionError("unreachable")


async def heard_s(session: MqttClientSession) -> float:
    await session.send_control({"type": "text", "text": "report"})
    return float((await next_event(session, "report"))["seconds"])


async def served_normally(session: MqttClientSession, hz: float = 1500.0, *, agent_speaking: bool = True) -> None:
    """The session hears the agent (while it still speaks its first 8 s) and the agent hears the device."""
    if agent_speaking:
        async for _ in session.audio:
            break
    # A microphone streams in real time: 0.1 s at a time until the agent has heard 0.5 s of the tone.
    before = await heard_s(session)
    report: dict = {}
    for step in range(100):
        await session.send_audio(tone(hz, 0.1, RATE, phase_s=0.1 * step))
        await asyncio.sleep(0.1)
        await session.send_control({"type": "text", "text": "report"})
        report = await next_event(session, "report")
        if report["seconds"] >= before + 0.5 and abs(report["hz"] - hz) < 20:
            return
    raise AssertionError(f"the agent did not hear the device: {report}")


async def test_deeply_nested_json_is_a_bad_request_and_the_worker_keeps_serving(broker: Broker) -> None:
    async with asyncio.timeout(TIMEOUT_S), serving(broker), MqttClient(settings_for(broker, "dev1")) as client:
        session = await client.open_session(codec="pcm16")
        for topic in (TOPICS.request("dev1"), TOPICS.client_status("dev1")):
            await client.mqtt.publish(topic, NESTED, qos=1)
            error = await next_client_event(client)
            assert error["code"] == "bad_request" and "nests 20000 levels" in error["message"], error
        await client.mqtt.publish(TOPICS.up_control("dev1", session.id), NESTED, qos=1)
        error = await next_event(session, "error")
        assert error["code"] == "bad_request" and "nests" in error["message"] and not error["fatal"]
        await served_normally(session)
        await served_normally(await client.open_session(codec="opus"))


async def test_devices_cannot_join_the_workers_share_group(broker: Broker) -> None:
    async with asyncio.timeout(TIMEOUT_S), serving(broker), contextlib.AsyncExitStack() as stack:
        thieves = [await stack.enter_async_context(raw_client(broker, f"thief{i}")) for i in range(5)]
        for thief in thieves:
            [code] = await thief.subscribe(TOPICS.shared_requests("moss-workers"), qos=1)
            assert code.is_failure, "the broker let a device into the workers' shared subscription"
        client = await stack.enter_async_context(MqttClient(settings_for(broker, "dev2")))
        # One attempt each: a request a thief swallowed would fail the open.
        sessions = [await client.open_session(codec="pcm16", timeout_s=5, attempts=1) for _ in range(6)]
        assert all(s.worker_id == "hostile" for s in sessions)
        for session in sessions:
            await session.close()
        for thief in thieves:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    async for message in thief.messages:
                        raise AssertionError(f"a thief got {message.topic}")


async def test_a_device_that_leaves_without_close_frees_its_slot(broker: Broker) -> None:
    async with asyncio.timeout(TIMEOUT_S), serving(broker, max_sessions=1) as worker:
        async with raw_client(broker, "dev1") as leaver:
            await leaver.subscribe(TOPICS.down_filter("dev1"), qos=1)
            request = {"type": "session.request", "session": "gone", "codec": "pcm16", "sample_rate": RATE}
            await leaver.publish(TOPICS.request("dev1"), encode_json(request), qos=1)
            async for message in leaver.messages:
                assert b"session.started" in message.payload
                break
        # A clean DISCONNECT publishes no will; the idle timeout reclaims the session.
        assert worker.session_count == 1
        started = time.monotonic()
        async with MqttClient(settings_for(broker, "dev2")) as client:
            while True:
                try:
                    session = await client.open_session(codec="pcm16", attempts=1)
                    break
                except TransportError as exc:
                    assert "busy" in str(exc) and time.monotonic() - started < IDLE_S + 3, exc
                    await asyncio.sleep(0.2)
            print(f"\nslot of a device gone without close reclaimed after {time.monotonic() - started:.1f} s")
            # A quiet but connected device is kept alive by its client's keepalives.
            await asyncio.sleep(3 * IDLE_S)
            assert not session.ended.is_set()
            await served_normally(session)


async def test_two_clients_of_one_device_keep_their_own_sessions(broker: Broker) -> None:
    async with (
        asyncio.timeout(TIMEOUT_S),
        serving(broker),
        MqttClient(settings_for(broker, "app")) as first,
        MqttClient(settings_for(broker, "app")) as second,
    ):
        mine = await first.open_session(codec="pcm16")
        theirs = await second.open_session(codec="pcm16")  # first sees this session.started too
        await asyncio.sleep(0.5)
        assert not mine.ended.is_set() and not theirs.ended.is_set()
        # The first app's connection dies: its last will ends its own session only.
        will = encode_json({"online": False, "instance": first.instance})
        await second.mqtt.publish(TOPICS.client_status("app"), will, qos=1)
        assert (await next_event(mine, "session.ended"))["session"] == mine.id
        await served_normally(theirs)
        assert not theirs.ended.is_set()


async def test_one_device_cannot_take_every_session_of_a_worker(broker: Broker) -> None:
    limits = MqttLimits(session_idle_s=IDLE_S, sessions_per_device=2)
    async with (
        asyncio.timeout(TIMEOUT_S),
        serving(broker, limits=limits, max_sessions=4) as worker,
        MqttClient(settings_for(broker, "dev1")) as greedy,
        MqttClient(settings_for(broker, "dev2")) as other,
    ):
        held = [await greedy.open_session(codec="pcm16") for _ in range(2)]
        with pytest.raises(TransportError, match="already holds 2 sessions"):
            await greedy.open_session(codec="pcm16", attempts=1)
        assert worker.session_count == 2
        await served_normally(await other.open_session(codec="pcm16"))
        # Once the device closes one of its sessions, it may open another.
        await held[0].close()
        while worker.session_count > 2:  # the other device's session stays
            await asyncio.sleep(0.05)
        await served_normally(await greedy.open_session(codec="pcm16"))


def publish_reason(broker: Broker, user: str, topic: str, payload: bytes) -> str:
    """The broker's PUBACK reason code for one QoS 1 publish (aiomqtt does not report it)."""
    done = threading.Event()
    reasons: list[str] = []

    def on_publish(client: paho.Client, userdata: object, mid: int, reason: object, properties: object) -> None:
        reasons.append(str(reason))
        done.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.username_pw_set(user, broker.passwords[user])
    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1)
        assert done.wait(5), "no PUBACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return reasons[0]


async def test_messages_on_wrong_topics_are_refused_to_their_sender(broker: Broker) -> None:
    async with asyncio.timeout(TIMEOUT_S), serving(broker), MqttClient(settings_for(broker, "dev1")) as client:
        session = await client.open_session(codec="pcm16")
        wrong = [
            TOPICS.session("dev1", session.id) + "/up/video",
            TOPICS.down_event("dev1", session.id),  # forging the worker's events to itself
            TOPICS.client_event("dev1"),
            TOPICS.request("dev1") + "/extra",
            "moss/v1/c/dev1/anything",
            TOPICS.worker_status("hostile"),  # forging a worker's death
            TOPICS.request("dev2"),
        ]
        for topic in wrong:
            reason = await asyncio.to_thread(publish_reason, broker, "dev1", topic, b'{"type":"close"}')
            assert reason == "Not authorized", (topic, reason)
        await served_normally(session)


FLOOD_S = 10.0
FLOODER = """
import os, sys, time
import paho.mqtt.client as paho
from moss_agent.transports.mqtt_protocol import AudioHeader, encode_audio_packet
port, topic, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
count = int(seconds / 0.02) * 100
packets = [encode_audio_packet(AudioHeader("pcm16", 24000, (2**32 - count + i) % 2**32), bytes(960)) for i in range(count)]
client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
client.username_pw_set("flood", os.environ["FLOOD_PASSWORD"])
client.connect("127.0.0.1", port)
client.loop_start()
start = time.perf_counter()
for tick in range(0, count, 100):
    for packet in packets[tick : tick + 100]:
        client.publish(topic, packet, qos=0)
    time.sleep(max(0.0, start + (tick // 100 + 1) * 0.02 - time.perf_counter()))
client.disconnect()
client.loop_stop()
print(count)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def report_latency_s(session: MqttClientSession) -> float:
    started = time.perf_counter()
    await session.send_control({"type": "text", "text": "report"})
    await next_event(session, "report")
    return time.perf_counter() - started


async def test_an_audio_flood_is_dropped_once_reported_and_delays_no_one(broker: Broker) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "integration"), str(REPO)]),
        "MOSS_MQTT_PASSWORD": broker.passwords["worker"],
    }
    command = [
        sys.executable, "-m", "moss_agent.transports.mqtt", "--handler", "transport_signals:tone_agent",
        "--broker", f"127.0.0.1:{broker.port}", "--username", "worker", "--worker-id", "flooded",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)).strip() == "ready flooded"
        async with (
            asyncio.timeout(60),
            MqttClient(settings_for(broker, "flood")) as flooder,
            MqttClient(settings_for(broker, "calm")) as calm,
        ):
            victim = await calm.open_session(codec="pcm16")
            flood = await flooder.open_session(codec="pcm16")
            baseline = sorted([await report_latency_s(victim) for _ in range(5)])
            rss_before = rss_mb(proc.pid)
            # A separate process publishes as fast as a device could: 100 packets (2 s) every 20 ms.
            # Its sequence numbers end just before the session's own (0, 1, ...), so the device's
            # ordinary audio afterwards is not taken for late packets.
            flooder_env = {**env, "FLOOD_PASSWORD": broker.passwords["flood"]}
            flood_command = [
                sys.executable, "-c", FLOODER, str(broker.port), TOPICS.up_audio("flood", flood.id), str(FLOOD_S),
            ]  # fmt: skip

            flood_started = time.perf_counter()
            blaster = asyncio.create_task(
                asyncio.to_thread(subprocess.run, flood_command, env=flooder_env, capture_output=True, text=True),
                name="flood",
            )
            during: list[float] = []
            while not blaster.done():
                during.append(await report_latency_s(victim))
            flooded = await blaster
            assert flooded.returncode == 0, flooded.stderr
            sent = int(flooded.stdout)
            flood_s = time.perf_counter() - flood_started
            rss_after = rss_mb(proc.pid)
            errors = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for event in flood.events():
                        if event["type"] == "error":
                            errors.append(event)
            print(
                f"\nflood: {sent} packets ({sent * 0.02:.0f} s of audio) in {flood_s:.1f} s "
                f"({sent * 0.02 / flood_s:.0f}x real time); worker RSS {rss_before:.0f} -> "
                f"{rss_after:.0f} MB; other device's report latency median {baseline[2] * 1000:.0f} ms before, "
                f"{sorted(during)[len(during) // 2] * 1000:.0f} ms during (max {max(during) * 1000:.0f} ms, "
                f"n={len(during)})"
            )
            # One report per episode: a worker stalled for longer than burst / rate (1 s; a loaded
            # machine) sees the flood resume as a new episode, so a few reports, never one per packet.
            assert errors and {e["code"] for e in errors} == {"rate_limited"}, errors
            assert len(errors) <= 1 + flood_s, f"{len(errors)} reports for {sent} packets in {flood_s:.1f} s"
            assert rss_after - rss_before < 100
            await served_normally(victim, hz=1100.0, agent_speaking=False)
            # Once the worker has drained what the flood left queued, the flooder is back within its
            # budget after burst / rate seconds.
            while (await heard_s(flood)) != (await asyncio.sleep(0.3) or await heard_s(flood)):
                pass
            await asyncio.sleep(1.0)
            await served_normally(flood, hz=1300.0, agent_speaking=False)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
