"""``moss-agent speech-server`` as a user runs it: tokens, voices, a taken port, and a clean stop."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from moss_agent.cli import build_parser, main
from moss_agent.commands.speech_server import parse_replicas, read_token

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello.wav"



def test_max_waiting_sizes_the_engines_queue(tiny_realtime_dir: Path, tiny_codec_dir: Path) -> None:
    from moss_agent.options import build_engine
    from moss_agent.service.ray_serve import options_from_cli

    argv = ["speech-server", "--model", str(tiny_realtime_dir), "--codec", str(tiny_codec_dir), "--device", "cpu"]
    args = build_parser().parse_args([*argv, "--max-waiting", "3"])
    engine = build_engine(args)  # loaded, not started
    assert engine.config.max_waiting == 3 and options_from_cli(args, None).max_waiting == 3
    assert build_engine(build_parser().parse_args(argv)).config.max_waiting == 32  # the engine's default


def test_the_token_comes_from_a_file_a_variable_or_is_made_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    assert read_token(parser.parse_args(["speech-server", "--token-file", str(secret)])) == ("from-a-file", False)
    monkeypatch.setenv("MY_TOKEN", "from-my-var")
    assert read_token(parser.parse_args(["speech-server", "--token-env", "MY_TOKEN"])) == ("from-my-var", False)
    monkeypatch.setenv("MOSS_ENGINE_TOKEN", "from-the-default-var")
    assert read_token(parser.parse_args(["speech-server"])) == ("from-the-default-var", False)
    monkeypatch.delenv("MOSS_ENGINE_TOKEN")
    token, made_up = read_token(parser.parse_args(["speech-server"]))
    assert made_up and token is not None and len(token) >= 24
    assert read_token(parser.parse_args(["speech-server", "--no-auth"])) == (None, False)
    args = parser.parse_args(["speech-server", "--voice", "a=x.wav", "--voice", "b=y.wav"])
    assert args.voices == ["a=x.wav", "b=y.wav"] and args.voice is None
    args = parser.parse_args(["speech-server", "--ray", "--ray-address", "auto", "--replicas", "1:4"])
    assert (args.ray, args.ray_address, parse_replicas(args.replicas), parse_replicas("2")) == (True, "auto", (1, 4), (2, 2))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--port", "TAKEN"], "cannot listen on 127.0.0.1"),
        (["--voice", "alice"], "expected NAME=PATH"),
        (["--voice", "al ice=x.wav"], "is not allowed"),
        (["--voice", "alice=missing.wav"], "no such file"),
        (["--token-env", "SURELY_UNSET_VARIABLE"], "not set or empty"),
        (["--engine-url", "ws://127.0.0.1:1"], "loads its own engine"),
        (["--replicas", "2"], "add --ray"),
        (["--max-waiting", "-1"], "--max-waiting must be from 0"),
        (["--batch-model", "/ckpt/MOSS-TTS"], "only the tiny model fits"),
        (["--batch-model", "tiny", "--batch-model", "moss-tts=tiny"], "already taken"),
        (["--ray", "--batch-model", "/ckpt/MOSS-TTS"], "only the tiny model fits"),
        (["--ray", "--replicas", "3:1"], "need 1 <= MIN <= MAX"),
        (["--ray", "--replicas", "two"], "expected MIN or MIN:MAX"),
        pytest.param(
            ["--ray", "--replicas", "1:2"], 'pip install "moss-agent[ray]"',
            marks=pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed here"),
        ),
    ],
)
def test_mistakes_fail_in_a_second_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    monkeypatch.setenv("MOSS_AGENT_CACHE", str(tmp_path / "cache"))  # empty: --tiny would make checkpoints here
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = ["speech-server", "--tiny", *[port if a == "TAKEN" else a for a in extra]]
        assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists(), "models were loaded before the mistake was found"


async def test_serves_speech_with_a_voice_and_stops_cleanly_on_sigterm(cache: Path, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("cli-token\n")
    command = [sys.executable, "-m", "moss_agent.cli", "speech-server", "--tiny", "--slots", "1", "--port", "0",
               "--token-file", str(secret), "--voice", f"hello={HELLO}", "--max-seconds", "0.4", "--greedy", "--log-json", "-v", "--batch-model", "tiny"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        assert "speech server on http://127.0.0.1:" in line, line + (proc.stderr.read() if proc.poll() else "")
        base = re.search(r"http://[0-9.]+:[0-9]+", line).group(0)  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as alive:
                assert alive.status == 200  # at once, while the engine may still be warming up
            async with http.get(base + "/readyz") as refused:
                assert refused.status == 401
            for _ in range(600):  # ready once warm
                async with http.get(base + "/readyz", headers={"Authorization": "Bearer cli-token"}) as ready:
                    if ready.status == 200:
                        break
                    assert ready.status == 503 and "warming up" in (await ready.json())["error"]["message"]
                await asyncio.sleep(0.1)
            assert ready.status == 200
        api = openai.AsyncOpenAI(base_url=base + "/v1", api_key="cli-token", max_retries=0)
        async with api.audio.speech.with_streaming_response.create(
            model="moss-tts-realtime", voice="hello", input="Hi there.", response_format="pcm",
            extra_headers={"X-Request-Id": "cli-request-1"},
        ) as response:
            assert response.headers["X-Request-Id"] == "cli-request-1"
            audio = await response.read()
        assert 0 < len(audio) <= 5 * 1920 * 2 and len(audio) % (1920 * 2) == 0  # whole frames, capped at 0.4 s
        async with api.audio.speech.with_streaming_response.create(  # the tiny Delay, streamed once made
            model="moss-tts", voice="hello", input="Hi there.", response_format="pcm"
        ) as response:
            assert len(await response.read()) >= 1920 * 2
        voices = await api.get("/audio/voices", cast_to=object)
        assert {voice["id"] for voice in voices["data"]} == {"default", "hello"}  # type: ignore[index]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        err = proc.stderr.read()
        assert "UNTRAINED" in err
        logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        ours = [entry for entry in logged if entry.get("request_id") == "cli-request-1"]
        assert {entry["message"] for entry in ours} >= {"request", "speech done"}
        assert any(entry.get("route") == "/v1/audio/speech" and entry.get("status") == 200 for entry in ours)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
