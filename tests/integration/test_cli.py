"""The ``moss-agent`` command as a user runs it, offline, on tiny random checkpoints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from system_requirements import ESPEAK_NG, requires

from moss_agent.audio import load_audio
from moss_agent.cli import main

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello.wav"



def test_reply_runs_the_whole_pipeline_offline(cache, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    code = main(["-v", "reply", "--tiny", "-i", str(HELLO), "-o", str(out), "--max-seconds", "1.6"])
    assert code == 0
    audio = load_audio(out, 24000)
    assert 0 < len(audio) <= int(1.6 * 24000)
    err = capsys.readouterr().err
    assert "UNTRAINED" in err and "pass --llm-url" in err  # reply takes an LLM: the note says how
    assert "user: " in err and "agent: You said:" in err  # the echo responder answered the transcript
    assert "TTS first audio" in err  # the --verbose latency breakdown
    # Recognition ran before the turn was asked for; the breakdown times it and counts it in the total.
    assert re.search(r"^  speech recognition +\d+\.\d ms$", err, re.M), err
    assert "speech recognition start -> first agent audio" in err


def test_reply_with_a_given_transcript_skips_recognition(cache, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    assert main(["reply", "--tiny", "-i", str(HELLO), "-o", str(out), "--transcript", "Good morning",
                 "--max-seconds", "0.8"]) == 0
    assert "agent: You said: Good morning" in capsys.readouterr().err


def test_say_writes_a_wav(cache, tmp_path, capsys):
    out = tmp_path / "say.wav"
    assert main(["say", "Hello world, nice to meet you.", "--tiny", "-o", str(out), "--max-seconds", "0.8"]) == 0
    assert 0 < len(load_audio(out, 24000)) <= int(0.8 * 24000)
    err = capsys.readouterr().err
    assert "UNTRAINED" in err and "--llm-url" not in err  # say has no LLM to point anywhere


def test_version(capsys):
    from moss_agent import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"moss-agent {__version__}\n"


def test_reply_to_a_long_input_hears_its_last_minute(cache, tmp_path, capsys):
    """Input longer than the model's share of the context for user audio: the most recent minute
    is kept as context, and the command says so (a whole five minutes would leave no room to answer)."""
    import numpy as np
    import soundfile as sf

    long_wav = tmp_path / "long.wav"
    tone = 0.1 * np.sin(2 * np.pi * 200 * np.arange(int(61.5 * 8000)) / 8000)
    sf.write(long_wav, tone.astype(np.float32), 8000, subtype="PCM_16")
    code = main(["reply", "--tiny", "-i", str(long_wav), "-o", str(tmp_path / "r.wav"), "--transcript", "hi",
                 "--max-input-seconds", "120", "--max-seconds", "0.4", "--greedy"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "the model hears the last 60 s of the 61.5 s input (its context also holds the reply)" in err


def test_reply_takes_the_llm_servers_only_model_and_an_empty_answer_is_an_error(cache, tmp_path, capsys):
    from moss_agent.testing.openai_server import FakeOpenAIServer

    server = FakeOpenAIServer(["Hello there.", ""])
    server.start_in_thread()
    try:
        argv = ["reply", "--tiny", "-i", str(HELLO), "-o", str(tmp_path / "r.wav"), "--transcript", "hi",
                "--max-seconds", "0.4", "--llm-url", server.base_url]  # fmt: skip
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "LLM model: fake-model (the one the server lists)" in err and "agent: Hello there." in err
        assert server.chat_requests[-1]["model"] == "fake-model"
        assert main(argv) == 1  # the server answers a stream with no text
        err = capsys.readouterr().err
        assert "answered with a stream with no text" in err and "agent:" not in err
    finally:
        server.stop_thread()


def test_bad_input_gives_a_clear_error_and_exit_code(cache, tmp_path, capsys):
    missing = tmp_path / "nope.wav"
    assert main(["reply", "--tiny", "-i", str(missing), "-o", str(tmp_path / "r.wav")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "nope.wav" in err
    assert main(["reply", "--model", str(tmp_path / "no_such_model"), "-i", str(HELLO), "--transcript", "hi",
                 "-o", str(tmp_path / "r.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_make_tiny_writes_loadable_checkpoints(tmp_path):
    from moss_agent.models.codec import load_codec

    assert main(["make-tiny", str(tmp_path), "--kind", "codec"]) == 0
    codec = load_codec(tmp_path / "codec", device="cpu")
    assert codec.num_quantizers == 16 and codec.codebook_size == 1024


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "moss_agent.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("reply", "say", "make-tiny"):
        assert command in out.stdout


# ---------------------------------------------------------------------------------------------
# chat, serve and mqtt-worker


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_help_lists_the_serving_commands():
    out = subprocess.run([sys.executable, "-m", "moss_agent.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("chat", "serve", "mqtt-worker"):
        assert command in out.stdout


async def test_serve_makes_a_token_offers_the_page_refuses_a_bad_token_and_stops_on_sigint(cache):
    import asyncio
    import os
    import signal

    aiohttp = pytest.importorskip("aiohttp")
    port = _free_port()
    command = [sys.executable, "-m", "moss_agent.cli", "serve", "--tiny", "--slots", "1", "--port", str(port),
               "--loopback-only", "--max-seconds", "0.8"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert f"http://127.0.0.1:{port}/?token=" in line, line + (proc.stderr.read() if proc.poll() else "")
        token = line.split("?token=")[1].split()[0]
        assert len(token) >= 16  # made up, since none was given
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/") as page:
                assert page.status == 200 and "<html" in (await page.text()).lower()
            offer = {"type": "offer", "sdp": "v=0\r\n"}
            async with http.post(f"http://127.0.0.1:{port}/offer", json=offer, headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 401 and (await r.json())["code"] == "unauthorized"
            # The printed token passes; this SDP does not.
            async with http.post(f"http://127.0.0.1:{port}/offer", json=offer, params={"token": token}) as r:
                assert r.status == 400
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert "UNTRAINED" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_mqtt_worker_reads_the_password_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from moss_agent.cli import build_parser
    from moss_agent.commands.mqtt_worker import parse_broker, read_password

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    parser = build_parser()
    assert read_password(parser.parse_args(["mqtt-worker", "--password-file", str(secret)])) == "s3cret"
    monkeypatch.setenv("MOSS_MQTT_PASSWORD", "from-env")
    assert read_password(parser.parse_args(["mqtt-worker"])) == "from-env"
    assert parse_broker("broker.local:8883") == ("broker.local", 8883)
    assert parse_broker("broker.local") == ("broker.local", 1883)
    assert main(["mqtt-worker", "--broker", "host:port", "--tiny"]) == 2
    assert main(["mqtt-worker", "--password-file", str(tmp_path / "missing"), "--tiny"]) == 2


def test_serve_refuses_bad_ice_servers_before_loading_anything(capsys):
    assert main(["serve", "--tiny", "--ice-server", "http://stun.example.org"]) == 2
    assert main(["serve", "--tiny", "--ice-server", "turn:turn.example.org:3478"]) == 2
    err = capsys.readouterr().err
    assert "stun:, turn: or turns:" in err and "needs a username and a credential" in err


@requires(ESPEAK_NG)  # jack_server skips without JACK or PortAudio
async def test_chat_hears_a_jack_microphone_and_answers_on_the_speaker(cache, jack_server):
    """``moss-agent chat`` on a real PortAudio device (JACK dummy): speech into its microphone port
    is transcribed and answered; Ctrl-C ends it with status 0."""
    import asyncio
    import signal

    import numpy as np
    from jack_audio import jack_connect

    from moss_agent.events import AudioChunk
    from moss_agent.testing.speech import silence, synthesize_speech
    from moss_agent.transports.local import LocalAudio

    command = [sys.executable, "-m", "moss_agent.cli", "-v", "chat", "--tiny", "--device", "cpu", "--greedy",
               "--max-seconds", "0.8"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        async with asyncio.timeout(60):
            while "listening" not in (line := await asyncio.to_thread(proc.stderr.readline)):
                assert line, "moss-agent chat exited before listening"
            ports = subprocess.run(["jack_lsp"], capture_output=True, text=True, check=True).stdout.split()
            chat_mic = next(p for p in ports if p.startswith("PortAudio") and ":in_" in p)
            chat_speaker = next(p for p in ports if p.startswith("PortAudio") and ":out_0" in p)
            # The test is the user: its output is the chat's microphone, its input hears the chat's speaker.
            async with LocalAudio(sample_rate=24000) as user:
                ours = subprocess.run(["jack_lsp"], capture_output=True, text=True, check=True).stdout.split()
                mouth = next(p for p in ours if p not in ports and ":out_0" in p)
                ear = next(p for p in ours if p not in ports and ":in_" in p)
                await asyncio.to_thread(jack_connect, jack_server, mouth, chat_mic)
                await asyncio.to_thread(jack_connect, jack_server, chat_speaker, ear)
                loudness: list[float] = []

                async def listen() -> None:
                    async for chunk in user.input:
                        loudness.append(float(np.sqrt(np.mean(chunk.pcm**2))))

                listener = asyncio.create_task(listen())
                speech = np.concatenate([synthesize_speech("good morning", 24000), silence(1.5, 24000)])
                for start in range(0, len(speech), 2400):
                    await user.output.write(AudioChunk(speech[start : start + 2400], 24000, turn_id=1))
                lines = []
                while not (line := await asyncio.to_thread(proc.stdout.readline)).startswith("agent: "):
                    assert line, "moss-agent chat exited before answering"
                    lines.append(line.strip())
                answer = line.strip()
                while not (line := await asyncio.to_thread(proc.stdout.readline)).startswith("turn "):
                    assert line, "moss-agent chat exited before its latency breakdown"
                listener.cancel()
        heard = next(x for x in lines if x.startswith("you: "))[len("you: ") :]
        assert answer == f"agent: You said: {heard}"
        assert "user end of speech -> first agent audio" in line  # -v: per-turn latency
        assert max(loudness) > 1e-3  # the reply was played on the chat's speaker port
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_prints_latency_and_throughput(cache, capsys):
    assert main(["bench", "--tiny", "--sessions", "1", "2", "--frames", "4"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(float(row[1]) > 0 and float(row[5]) > 0 for row in rows)  # first audio ms, frames/s


def test_an_empty_reply_is_said_not_a_crash(tmp_path, tiny_codec_dir, capsys):
    """A model that ends its turn on the first frame gave a valid, empty reply: exit 0, one line."""
    from moss_agent.models.realtime.tiny import save_tiny_realtime

    model = save_tiny_realtime(tmp_path / "stops_at_once", seed=3, eos_gain=1000.0)
    out = tmp_path / "reply.wav"
    code = main(["reply", "--model", str(model), "--codec", str(tiny_codec_dir), "--greedy",
                 "-i", str(HELLO), "-o", str(out), "--transcript", "hello"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "the reply is empty" in err and not out.exists()
