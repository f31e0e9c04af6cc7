"""MQTT scale-out against a real mosquitto: 2 worker processes, 6 clients, one worker killed mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiomqtt")

from mqtt_broker import Broker, next_event, run_broker, settings_for
from transport_signals import (
    RATE,
    agent_tone_hz,
    mic_tone_hz,
    tone,
    windows_dominated_by,
)

from moss_agent.transports.mqtt import MqttClient, MqttClientSession

REPO = Path(__file__).resolve().parents[2]
CLIENTS = [f"dev{i}" for i in range(6)]
TIMEOUT_S = 120  # a bound on a hang: two worker processes start (torch import, tiny models) on a busy 2-core machine


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    users = {"worker": "worker-secret", **{c: f"pw-{c}" for c in CLIENTS}}
    with run_broker(tmp_path_factory.mktemp("mosquitto"), users) as running:
        yield running


def start_worker(broker: Broker, worker_id: str, log: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "integration"), str(REPO)]),
        "MOSS_MQTT_PASSWORD": broker.passwords["worker"],
    }
    command = [
        sys.executable, "-m", "moss_agent.transports.mqtt",
        "--handler", "transport_signals:tone_agent",
        "--broker", f"127.0.0.1:{broker.port}", "--username", "worker", "--worker-id", worker_id,
    ]  # fmt: skip
    with log.open("w") as stderr:  # the worker's log, shown if the test fails
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, preexec_fn=_as_from_a_shell
        )


def _as_from_a_shell() -> None:
    """In the worker, before exec: no blocked or ignored signals. Both survive exec, and this test
    process's may have been changed by earlier tests' libraries (the JACK tests leave SIGPIPE
    blocked); a worker that never sees SIGTERM cannot say goodbye."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)


async def wait_ready(proc: subprocess.Popen[str], worker_id: str) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
    assert line.strip() == f"ready {worker_id}", f"worker did not start: {line!r}"


async def converse(session: MqttClientSession, client_id: str) -> dict:
    """Send the microphone tone, hear this client's own agent tone, and get the agent's report."""
    hello = await next_event(session, "hello")
    assert hello["client"] == client_id
    mic = tone(mic_tone_hz(client_id), 1.0, RATE)
    for start in range(0, len(mic), 2400):
        await session.send_audio(mic[start : start + 2400])
    heard: list[np.ndarray] = []
    async for chunk in session.audio:
        heard.append(chunk.pcm)
        if windows_dominated_by(np.concatenate(heard), RATE, agent_tone_hz(client_id)) >= 5:
            break
    report: dict = {}
    while report.get("seconds", 0.0) < 0.6:
        await session.send_control({"type": "text", "text": "report"})
        report = await next_event(session, "report")
    pcm = np.concatenate(heard)
    for other in set(CLIENTS) - {client_id}:
        assert windows_dominated_by(pcm, RATE, agent_tone_hz(other)) == 0, "heard another client's audio"
    assert abs(report["hz"] - mic_tone_hz(client_id)) < 20, report
    return report


async def test_two_worker_processes_serve_six_clients_and_survive_a_killed_worker(
    broker: Broker, tmp_path: Path
) -> None:
    logs = {wid: tmp_path / f"{wid}.log" for wid in ("w1", "w2")}
    workers = {wid: start_worker(broker, wid, log) for wid, log in logs.items()}
    try:
        async with asyncio.timeout(TIMEOUT_S), contextlib.AsyncExitStack() as stack:
            await asyncio.gather(*(wait_ready(proc, wid) for wid, proc in workers.items()))
            clients = [await stack.enter_async_context(MqttClient(settings_for(broker, c))) for c in CLIENTS]
            sessions = await asyncio.gather(*(c.open_session(codec="opus") for c in clients))
            served_by = {c: s.worker_id for c, s in zip(CLIENTS, sessions, strict=True)}
            assert set(served_by.values()) == {"w1", "w2"}, f"the broker should spread sessions: {served_by}"
            await asyncio.gather(*(converse(s, c) for c, s in zip(CLIENTS, sessions, strict=True)))

            workers["w1"].kill()
            orphaned = [i for i, c in enumerate(CLIENTS) if served_by[c] == "w1"]
            for i in orphaned:
                error = await next_event(sessions[i], "error")
                assert error["code"] == "worker_lost" and error["fatal"]
                await asyncio.wait_for(sessions[i].ended.wait(), 5)
            for i in set(range(len(CLIENTS))) - set(orphaned):
                assert not sessions[i].ended.is_set()

            # New sessions of the orphaned clients go to the surviving worker and work end to end.
            retried = await asyncio.gather(*(clients[i].open_session(codec="pcm16") for i in orphaned))
            assert {s.worker_id for s in retried} == {"w2"}
            await asyncio.gather(*(converse(s, CLIENTS[i]) for i, s in zip(orphaned, retried, strict=True)))

            # A worker stopped with SIGTERM says goodbye too, and exits cleanly.
            workers["w2"].terminate()
            for session in [*retried, *(sessions[i] for i in set(range(len(CLIENTS))) - set(orphaned))]:
                assert (await next_event(session, "error"))["code"] == "worker_lost"
            assert await asyncio.to_thread(workers["w2"].wait, 10) == 0
    except BaseException:
        for wid, log in logs.items():
            print(f"--- worker {wid} (exit {workers[wid].poll()}) ---\n{log.read_text()[-4000:]}")
        raise
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
