"""The ``moss-agent`` command as a user runs it, offline, on tiny random checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moss_agent.audio import load_audio
from moss_agent.cli import main

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello.wav"


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_realtime_dir, tiny_codec_dir):
    """Point the CLI's cache at the session's tiny checkpoints instead of making new ones."""
    root = tmp_path / "cache"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "realtime").symlink_to(tiny_realtime_dir)
    (root / "tiny" / "codec").symlink_to(tiny_codec_dir)
    monkeypatch.setenv("MOSS_AGENT_CACHE", str(root))
    return root


def test_reply_runs_the_whole_pipeline_offline(cache, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    code = main(["-v", "reply", "--tiny", "-i", str(HELLO), "-o", str(out), "--max-seconds", "1.6"])
    assert code == 0
    audio = load_audio(out, 24000)
    assert 0 < len(audio) <= int(1.6 * 24000)
    err = capsys.readouterr().err
    assert "UNTRAINED" in err
    assert "user: " in err and "agent: You said:" in err  # the echo responder answered the transcript
    assert "TTS first audio" in err  # the --verbose latency breakdown


def test_reply_with_a_given_transcript_skips_recognition(cache, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    assert main(["reply", "--tiny", "-i", str(HELLO), "-o", str(out), "--transcript", "Good morning",
                 "--max-seconds", "0.8"]) == 0
    assert "agent: You said: Good morning" in capsys.readouterr().err


def test_say_writes_a_wav(cache, tmp_path):
    out = tmp_path / "say.wav"
    assert main(["say", "Hello world, nice to meet you.", "--tiny", "-o", str(out), "--max-seconds", "0.8"]) == 0
    assert 0 < len(load_audio(out, 24000)) <= int(0.8 * 24000)


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
