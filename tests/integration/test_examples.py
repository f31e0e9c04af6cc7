"""Every file in examples/ runs as written, in its offline form (tiny random checkpoints, echo responder).

The MQTT test also covers ``moss-agent mqtt-worker``: worker processes with the tiny engine behind a
real mosquitto answer the device example's recorded speech with audio, also when the device's
worker is killed mid-session.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from moss_agent.audio import load_audio, write_wav

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
HELLO = EXAMPLES / "hello.wav"


def run_example(name: str, *args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def running(command: list[str], env: dict[str, str] | None = None) -> AsyncIterator[subprocess.Popen[str]]:
    """A long-running process; SIGINT on exit, which must end it with status 0."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        yield proc
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def first_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    if not line and proc.stderr is not None:
        raise AssertionError(f"the process printed nothing: {proc.stderr.read()}")
    return line


def load_example(name: str) -> Any:
    """Import an example file as a module (in this process, so torch is imported once)."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["llm_chat.py", "webrtc_bot.py", "local_assistant.py", "mqtt_device.py"])
def test_every_example_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_example(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if name != "mqtt_device.py":  # a device runs no model
        assert "OpenMOSS-Team/MOSS-TTS-Realtime" in "".join(out.split()) and "--tiny" in out


def test_llm_chat_offline_prints_the_reply_and_writes_its_audio(cache: Path, tmp_path: Path) -> None:
    result = run_example(
        "llm_chat.py", "--tiny", "--device", "cpu", "--seed", "0", "--max-seconds", "0.8", "--out-dir", str(tmp_path),
        stdin="good evening\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "agent> You said: good evening" in result.stdout
    assert "UNTRAINED" in result.stderr
    wav = tmp_path / "reply_1.wav"
    assert 0 < len(load_audio(wav, 24000)) <= int(0.8 * 24000)


def test_local_assistant_offline_hears_the_recording_and_answers(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "assistant.wav"
    result = run_example(
        "local_assistant.py", "--tiny", "--device", "cpu", "--seed", "0", "--max-seconds", "0.8", "-v",
        "--mic-wav", str(HELLO), "--speaker-wav", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    heard = next(line for line in lines if line.startswith("you: "))[len("you: ") :]
    assert heard.strip()
    assert f"agent: You said: {heard}" in lines  # the echo responder answered the transcript
    assert any("user end of speech -> first agent audio" in line for line in lines)  # -v latency
    assert out.exists() and len(load_audio(out, 24000)) <= int(0.8 * 24000)


async def test_webrtc_bot_greets_a_peer_and_answers_typed_text(cache: Path) -> None:
    pytest.importorskip("aiortc")
    from moss_agent.transports.webrtc_client import WebRTCClient

    command = [sys.executable, str(EXAMPLES / "webrtc_bot.py"), "--tiny", "--device", "cpu", "--slots", "1",
               "--port", "0", "--loopback-only", "--greeting", "Welcome aboard"]  # fmt: skip
    async with running(command) as proc, asyncio.timeout(90):
        line = await first_line(proc)
        assert line.startswith("open http://127.0.0.1:"), line
        url, token = line.split()[1].split("?token=")
        async with WebRTCClient(url, token=token, loopback_only=True) as client:
            seen: list[dict[str, Any]] = []
            async for event in client.events():
                seen.append(event)
                if event["type"] == "turn_ended" and event["text"] == "Welcome aboard":
                    break
            await client.send_control({"type": "text", "text": "are you there"})
            async for event in client.events():
                seen.append(event)
                if event["type"] == "turn_ended" and event["text"] == "You said: are you there":
                    break
            assert seen[0]["type"] == "ready"
            assert any(e["type"] == "metrics" for e in seen)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def test_mqtt_device_example_fails_over_to_another_worker_and_says_what_went_wrong(
    cache: Path, tmp_path: Path
) -> None:
    """Two ``moss-agent mqtt-worker --tiny`` processes behind a real mosquitto. The device example's
    worker is killed while it speaks: it opens a new session, the other worker answers its speech.
    An empty reply and a pool with no workers are each a one-line message, never a traceback."""
    pytest.importorskip("aiomqtt")
    from mqtt_broker import run_broker
    from system_requirements import ESPEAK_NG, require

    from moss_agent.testing import FakeOpenAIServer
    from moss_agent.testing.openai_server import ScriptedReply, echo_responder
    from moss_agent.testing.speech import synthesize_speech

    require(ESPEAK_NG)
    wav = tmp_path / "device_mic.wav"
    write_wav(wav, synthesize_speech("turn on the lights", 24000), 24000)
    heard: list[float] = []

    def transcribe(pcm: Any, rate: int) -> str:
        heard.append(len(pcm) / rate)
        return "turn on the lights"

    def responder(messages: list[dict[str, Any]]) -> ScriptedReply:
        if messages[-1].get("content") == "say nothing":
            return ScriptedReply("")  # the LLM answers an empty stream: the agent has nothing to say
        return echo_responder(messages)

    users = {"worker": "worker-pw", "kitchen": "kitchen-pw"}
    password = tmp_path / "kitchen.pw"
    password.write_text(users["kitchen"])
    out = tmp_path / "reply.wav"
    env = {**os.environ, "MOSS_MQTT_PASSWORD": users["worker"], "PYTHONUNBUFFERED": "1"}
    with run_broker(tmp_path, users) as broker:

        def device(*args: str) -> list[str]:
            return [sys.executable, str(EXAMPLES / "mqtt_device.py"), "--broker", f"127.0.0.1:{broker.port}",
                    "--username", "kitchen", "--password-file", str(password), "--out", str(out), *args]  # fmt: skip

        async with FakeOpenAIServer(transcribe=transcribe, responder=responder) as openai:

            def worker(wid: str) -> subprocess.Popen[str]:
                command = [sys.executable, "-m", "moss_agent.cli", "mqtt-worker", "--tiny", "--device", "cpu",
                           "--greedy", "--slots", "1", "--max-seconds", "0.8", "--broker", f"127.0.0.1:{broker.port}",
                           "--username", "worker", "--worker-id", wid, "--stt-url", openai.base_url,
                           "--llm-url", openai.base_url]  # fmt: skip
                return subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
                )

            workers = {wid: worker(wid) for wid in ("w1", "w2")}
            speaking: subprocess.Popen[str] | None = None
            try:
                async with asyncio.timeout(150):
                    lines = await asyncio.gather(*(first_line(proc, 90) for proc in workers.values()))
                    assert [line.strip() for line in lines] == ["ready w1", "ready w2"]

                    # The worker serving the session dies while the device is still talking.
                    speaking = subprocess.Popen(
                        device("--wav", str(wav)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
                    )
                    opened = await first_line(speaking)
                    assert opened.startswith("session ") and " on worker w" in opened, opened
                    victim = opened.split()[-1]
                    workers[victim].kill()
                    stdout, stderr = await asyncio.to_thread(speaking.communicate, timeout=60)
                    assert speaking.returncode == 0, opened + stdout + stderr
                    [survivor] = set(workers) - {victim}
                    assert f"worker {victim} went away; opening a new session" in stdout
                    assert f"on worker {survivor}" in stdout
                    assert "you said: turn on the lights" in stdout
                    assert "agent: You said: turn on the lights" in stdout
                    assert "Traceback" not in stderr
                    assert len(load_audio(out, 24000)) > 0.2 * 24000
                    # The survivor's recognizer got the utterance, all of it and none of the silence.
                    assert len(heard) == 1 and 0.5 < heard[0] < len(load_audio(wav, 24000)) / 24000 + 1.0

                    out.unlink()
                    empty = await asyncio.to_thread(
                        subprocess.run, device("--text", "say nothing"), capture_output=True, text=True, timeout=60
                    )
                    assert empty.returncode == 1, empty.stdout + empty.stderr
                    assert "the agent sent no audio" in empty.stderr and "Traceback" not in empty.stderr
                    assert not out.exists()

                    workers[survivor].send_signal(signal.SIGINT)
                    assert await asyncio.to_thread(workers[survivor].wait, 30) == 0
                    alone = await asyncio.to_thread(
                        subprocess.run, device("--answer-timeout", "0.3"), capture_output=True, text=True, timeout=60
                    )
                    assert alone.returncode == 1, alone.stdout + alone.stderr
                    assert "no worker answered 3 session requests" in alone.stderr
                    assert "Traceback" not in alone.stderr
            finally:
                for proc in [*workers.values(), *([speaking] if speaking else [])]:
                    stop(proc)
