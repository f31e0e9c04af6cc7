"""The errors a newcomer meets, from the real ``moss-agent`` command: one line on stderr that says
what was wrong and what to do, exit code 2, no traceback.

Each case runs the CLI in a subprocess. The hub is pointed at a closed local port (or a port that
never answers), so these tests never download anything, even on a machine that has network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello.wav"
REALTIME_ID = "OpenMOSS-Team/MOSS-TTS-Realtime"
CODEC_ID = "OpenMOSS-Team/MOSS-Audio-Tokenizer"


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def offline(tmp_path: Path) -> dict[str, str]:
    """The environment of a machine that cannot reach the hub and has nothing in its hub cache."""
    return {
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "MOSS_AGENT_CACHE": str(tmp_path / "cache"),
    }


@pytest.fixture(scope="module")
def tiny_delay_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny batch (Delay) model whose folder names no codec, so the default codec id is used."""
    from moss_agent.options import ensure_tiny_batch_checkpoint

    return ensure_tiny_batch_checkpoint(tmp_path_factory.mktemp("tiny_batch"))


def moss_agent(*args: str | Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    environment.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "moss_agent.cli", *map(str, args)],
        capture_output=True, text=True, env=environment, cwd=cwd, timeout=180,
    )  # fmt: skip


def error_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    """The one error line (exit 2, no traceback, nothing else but the --tiny notice and progress of a
    slow step); returns it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines, "nothing on stderr"
    others = [line for line in lines[:-1] if not line.startswith(("NOTE: --tiny", "... "))]  # notice, progress
    assert not others, proc.stderr
    prefix = f"moss-agent {command}: error: "
    assert lines[-1].startswith(prefix), proc.stderr
    return lines[-1].removeprefix(prefix)


# ---------------------------------------------------------------------------------------------
# 1. a hub id without network


def hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_default_models_on_a_machine_without_network(tmp_path):
    if hub_reachable():
        pytest.skip("this machine reaches huggingface.co; the closed-port tests cover the offline path")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    started = time.monotonic()
    proc = moss_agent("reply", "-i", HELLO, "-o", tmp_path / "r.wav", env=env)
    line = error_line(proc, "reply")
    assert time.monotonic() - started < 60
    assert f"could not download {REALTIME_ID}" in line
    assert f"hf download {REALTIME_ID} --local-dir DIR" in line and line.endswith("pass --model DIR")


def test_a_hub_id_offline_names_the_option_to_pass_a_folder(offline, tmp_path):
    proc = moss_agent("say", "hi", "-o", tmp_path / "s.wav", "--model", REALTIME_ID, env=offline)
    line = error_line(proc, "say")
    assert line.startswith(f"could not download {REALTIME_ID}: no connection to the Hugging Face hub")
    assert line.endswith("pass --model DIR")


def test_the_realtime_codec_offline_names_codec(offline, tmp_path, tiny_realtime_dir):
    proc = moss_agent("say", "hi", "-o", tmp_path / "s.wav", "--model", tiny_realtime_dir, env=offline)
    line = error_line(proc, "say")
    assert f"could not download {CODEC_ID}" in line and line.endswith("pass --codec DIR")


def test_batch_commands_offline(offline, tmp_path, tiny_delay_dir):
    line = error_line(moss_agent("tts", "hello", "-o", tmp_path / "t.wav", env=offline), "tts")
    assert "could not download OpenMOSS-Team/MOSS-TTS:" in line and line.endswith("pass --model DIR")
    # The codec the model implies (no --codec given) is still set with --codec.
    proc = moss_agent("sfx", "rain on a roof", "-o", tmp_path / "s.wav", "--model", tiny_delay_dir, env=offline)
    line = error_line(proc, "sfx")
    assert f"could not download {CODEC_ID}" in line and line.endswith("pass --codec DIR")


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A hub endpoint that accepts connections and never answers (a black-holing network)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_hub_that_never_answers_fails_within_seconds(offline, silent_hub, tmp_path):
    from moss_agent.models.loading import HUB_TIMEOUT_S

    started = time.monotonic()
    proc = moss_agent("say", "hi", "-o", tmp_path / "s.wav", env={**offline, "HF_ENDPOINT": silent_hub})
    line = error_line(proc, "say")
    assert time.monotonic() - started < HUB_TIMEOUT_S + 60  # imports included; not the OS's minutes
    assert f"did not answer within {HUB_TIMEOUT_S:g} s" in line and line.endswith("pass --model DIR")


def test_the_python_api_raises_the_same_error(offline):
    code = (
        "from moss_agent.engine.realtime import RealtimeEngine\n"
        "from moss_agent.errors import CheckpointError\n"
        "try:\n"
        f"    RealtimeEngine.load({REALTIME_ID!r}, {CODEC_ID!r}, device='cpu')\n"
        "except CheckpointError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **offline}, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"could not download {REALTIME_ID}: no connection to the Hugging Face hub")
    assert proc.stdout.rstrip().endswith("and pass DIR")


# ---------------------------------------------------------------------------------------------
# 2. a missing or wrong local folder


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("/nonexistent", ["checkpoint folder /nonexistent does not exist", "pass --model DIR"]),
        ("examples/hello.wav", ["examples/hello.wav is a file, not a checkpoint folder", "pass --model DIR"]),
        ("empty", ["has no config.json", "pass --model DIR"]),
        ("codec", ["holds MOSS-Audio-Tokenizer (the codec), not MOSS-TTS-Realtime", "pass --model DIR"]),
    ],
)
def test_a_wrong_model_folder(model, words, tmp_path, offline, tiny_codec_dir):
    if model == "empty":
        model = str(tmp_path)
    elif model == "codec":
        model = str(tiny_codec_dir)
    line = error_line(moss_agent("say", "hi", "-o", tmp_path / "s.wav", "--model", model, env=offline), "say")
    for word in words:
        assert word in line


def test_batch_folders_of_another_model(tmp_path, offline, tiny_delay_dir, tiny_codec_dir, tiny_realtime_dir):
    proc = moss_agent("tts", "hello", "-o", tmp_path / "t.wav", "--model", tiny_codec_dir, env=offline)
    line = error_line(proc, "tts")
    assert "holds MOSS-Audio-Tokenizer (the codec), not a MOSS-TTS batch model" in line
    assert "pass --model DIR" in line
    proc = moss_agent("tts", "hello", "-o", tmp_path / "t.wav", "--model", tiny_delay_dir,
                      "--codec", tiny_realtime_dir, env=offline)  # fmt: skip
    line = error_line(proc, "tts")
    assert "holds MOSS-TTS-Realtime, not MOSS-Audio-Tokenizer" in line and "pass --codec DIR" in line


# ---------------------------------------------------------------------------------------------
# 3. a missing extra, 4. a missing sound card


def shim(tmp_path: Path, name: str, text: str) -> dict[str, str]:
    """An environment whose Python first imports ``name`` from a file holding ``text``."""
    folder = tmp_path / "shim"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def test_serve_without_the_webrtc_extra(tmp_path, offline):
    env = {**offline, **shim(tmp_path, "sitecustomize.py", "import sys\nsys.modules['aiortc'] = None\n")}
    line = error_line(moss_agent("serve", "--tiny", env=env), "serve")
    assert line == 'aiortc is not installed; install it with: pip install "moss-agent[webrtc]"'


@pytest.fixture
def no_sound_card(offline) -> dict[str, str]:
    """PortAudio present, no device: no JACK server under this name, none started for us."""
    env = {**offline, "JACK_DEFAULT_SERVER": "moss-agent-test-no-server", "JACK_NO_START_SERVER": "1"}
    count = "import sounddevice; print(len(sounddevice.query_devices()))"
    probe = subprocess.run([sys.executable, "-c", count], capture_output=True, text=True, env={**os.environ, **env})
    if probe.returncode != 0:
        pytest.skip(f"sounddevice or PortAudio is not installed: {probe.stderr.strip()[-200:]}")
    if probe.stdout.strip() != "0":
        pytest.skip("this machine has sound devices")
    return env


def test_chat_without_a_sound_card(no_sound_card):
    line = error_line(moss_agent("chat", "--tiny", env=no_sound_card), "chat")
    assert line.startswith("no input audio device found") and "python -m sounddevice" in line


def test_say_play_without_a_speaker(no_sound_card):
    line = error_line(moss_agent("say", "hi", "--play", "--tiny", env=no_sound_card), "say")
    assert line.startswith("no output audio device found") and "drop --play" in line


def test_chat_lists_no_devices_and_says_so(no_sound_card):
    proc = moss_agent("chat", "--list-devices", env=no_sound_card)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("no audio devices found: PortAudio sees no sound card and no sound server")


def test_chat_without_the_portaudio_library(tmp_path, offline):
    env = {**offline, **shim(tmp_path, "sounddevice.py", "raise OSError('PortAudio library not found')\n")}
    line = error_line(moss_agent("chat", "--tiny", env=env), "chat")
    assert "PortAudio library is missing" in line and "libportaudio2" in line


# ---------------------------------------------------------------------------------------------
# 5. an LLM URL that refuses connections


@pytest.mark.parametrize("command", ["reply", "serve", "mqtt-worker"])
def test_an_llm_that_refuses_connections_is_said_before_the_models_load(command, tmp_path, offline):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    where = {
        "reply": ["-i", HELLO, "-o", tmp_path / "r.wav"],
        "serve": ["--port", "0"],
        "mqtt-worker": ["--broker", f"127.0.0.1:{closed_port()}"],
    }[command]
    proc = moss_agent(command, "--tiny", *where, "--llm-url", url, env=offline)
    line = error_line(proc, command)
    assert line.startswith(f"cannot connect to the LLM server at {url} (connection refused")
    assert "loading" not in proc.stderr, "the models loaded before the LLM server was checked"
    assert not (tmp_path / "r.wav").exists()


# ---------------------------------------------------------------------------------------------
# 6. mistakes found before anything loads: every option, path, port and device is checked first.
# In process (the checks are the CLI's own code); --model names a folder that does not exist, so a
# command that loaded anything before its check would fail on the model instead.

NO_MODEL = "/nonexistent/model"


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """Run ``moss-agent argv`` in process: exit code 2, one error line, nothing loaded; returns it."""
    from moss_agent.cli import main

    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith(f"moss-agent {argv[0]}: error: "), err
    assert NO_MODEL not in err  # the model was never looked for
    return lines[0].split(": error: ", 1)[1]


def cuda_device_this_machine_lacks() -> str:
    import torch

    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["reply", "-i", HELLO, "-o", "nodir/x.wav"], "--output nodir/x.wav: the folder nodir does not exist"),
        (["tts", "hi", "-o", HELLO / "x.wav"], f"{HELLO} is a file, not a folder"),
        (["say", "hi", "-o", REPO / "examples"], "is a folder; give a file name"),
        (["tts", "--jsonl", HELLO, "--output-dir", HELLO], f"--output-dir {HELLO} is a file, not a folder"),
        (["say", "hi", "--device", "gpu"], "--device 'gpu' is not a device; use cpu, cuda or cuda:N"),
        (["tts", "hi", "--device", "cuda-lacking"], "use --device cpu"),
        (["sfx", "rain", "--duration", "700"], "--duration must be seconds in (0, 600], got 700.0"),
        (["tts", "hi", "--tokens", "0"], "--tokens must be a whole number of 12.5 Hz frames from 1 to 7500"),
        (["bench", "--sessions", "1", "0"], "--sessions takes session counts from 1 to 256, got 0"),
        (["bench", "--frames", "0"], "--frames must be from 1 to 7500"),
        (["bench", "--engine-url", "ws://127.0.0.1:9"], "--engine-url is not for bench"),
        (["say", "hi", "--slots", "0"], "--slots must be from 1 to 256, got 0"),
        (["say", "hi", "--max-seconds", "nan"], "--max-seconds must be seconds in (0, 600], got nan"),
        (["say", "hi", "--voice", "missing.wav"], "--voice missing.wav is not a file"),
        (["reply", "-i", HELLO, "--llm-url", "127.0.0.1:9"],
         "--llm-url must be a URL starting with http:// or https://, such as http://127.0.0.1:8000/v1; "
         "got '127.0.0.1:9' (did you mean http://127.0.0.1:9?)"),
        (["chat", "--stt-url", "whisper:8000"], "--stt-url must be a URL starting with http://"),
        (["say", "hi", "--engine-url", "localhost:8000"], "--engine-url must be a URL starting with ws://"),
        (["serve", "--port", "70000"], "--port must be from 0 to 65535 (0 picks a free one), got 70000"),
    ],
)
def test_a_mistake_is_said_before_anything_loads(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    argv = [cuda_device_this_machine_lacks() if arg == "cuda-lacking" else arg for arg in argv]
    assert words in usage_error(capsys, *argv, "--model", NO_MODEL)


def test_a_busy_port_is_said_before_the_models_load(capsys):
    pytest.importorskip("aiortc")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = usage_error(capsys, "serve", "--port", port, "--model", NO_MODEL)
    assert line == f"--port {port} on 127.0.0.1 is in use by another program; stop it, or pick another port " \
        "(--port 0 picks a free one)"


def test_an_unwritable_output_is_said_before_the_models_load(capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = usage_error(capsys, "tts", "hi", "-o", locked / "x.wav", "--model", NO_MODEL)
    assert line == f"--output {locked / 'x.wav'}: cannot write into the folder {locked} (permission denied or read-only)"


def test_a_bad_dtype_is_an_argparse_usage_error(capsys):
    from moss_agent.cli import main

    with pytest.raises(SystemExit) as info:
        main(["say", "hi", "--dtype", "int8"])
    assert info.value.code == 2
    assert "argument --dtype: invalid choice: 'int8'" in capsys.readouterr().err


def test_an_input_over_the_limit_is_refused_from_its_header(capsys, tmp_path):
    """Ten minutes of audio (a small 8-bit 8 kHz file) for one user turn: refused from the wav header
    before it is decoded or anything loads, saying the limit and how to raise it."""
    import numpy as np
    import soundfile as sf

    long_wav = tmp_path / "meeting.wav"
    sf.write(long_wav, np.zeros(600 * 8000, np.int16), 8000, subtype="PCM_U8")
    line = usage_error(capsys, "reply", "-i", long_wav, "--transcript", "hi", "--model", NO_MODEL)
    assert line == (
        f"--input {long_wav} is 600.0 s long; reply takes one user turn of at most 60 s: cut the recording, "
        "or raise --max-input-seconds (up to 300)"
    )


def test_a_dialogue_whose_script_is_only_the_reference_transcripts_is_refused(capsys, tmp_path):
    """The README's old example: two clips and two turns, without --clone-only, would speak nothing
    new (0.24 s of audio); with the turns in another order than the clips it warns."""
    clip = str(HELLO)
    line = usage_error(capsys, "dialogue", "[S1] Welcome back! [S2] Glad to be here.", "-o", tmp_path / "d.wav",
                       "--reference", clip, "--reference", clip, "--model", NO_MODEL)  # fmt: skip
    assert line.startswith("the script has 2 turn(s) and there are 2 --reference clip(s)")
    assert "use --clone-only to take the clips as voices only" in line
    assert "'[S1] <what clip 1 says> [S2] <what clip 2 says> [S1] new text ...'" in line

    from moss_agent.cli import main

    argv = ["dialogue", "[S2] hello [S1] hi [S2] new words", "-o", str(tmp_path / "d.wav"),
            "--reference", clip, "--reference", clip, "--model", NO_MODEL]  # fmt: skip
    assert main(argv) == 2  # the model folder is missing: the check passed, with a warning
    err = capsys.readouterr().err
    assert "warning: the script begins [S2] [S1], but its first turns are read as the transcripts" in err
    assert main([*argv[:1], "[S1] Welcome back! [S2] Glad to be here.", *argv[2:], "--clone-only"]) == 2
    err = capsys.readouterr().err
    assert "warning" not in err and f"checkpoint folder {NO_MODEL} does not exist" in err
