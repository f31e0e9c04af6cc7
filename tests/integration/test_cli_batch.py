"""The batch commands (tts, dialogue, voice-design, sfx) as a user runs them, offline with --tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from moss_agent.audio import write_wav
from moss_agent.cli import main
from moss_agent.commands.common import ensure_tiny_batch_checkpoint


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, tiny_codec_dir) -> Path:
    root = tmp_path_factory.mktemp("cache")
    (root / "tiny").mkdir()
    (root / "tiny" / "codec").symlink_to(tiny_codec_dir)
    ensure_tiny_batch_checkpoint(root / "tiny")  # the CLI's own maker, once for the module
    return root


@pytest.fixture
def cache(tiny_root, monkeypatch) -> Path:
    monkeypatch.setenv("MOSS_AGENT_CACHE", str(tiny_root))
    return tiny_root


@pytest.fixture
def voice(tmp_path) -> Path:
    path = tmp_path / "voice.wav"
    t = np.arange(12000) / 16000
    write_wav(path, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    return path


def read(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 24000
    return audio


@pytest.mark.parametrize(
    "argv",
    [
        ["tts", "Hello there. How are you today?", "--seed", "1"],
        ["voice-design", "Good evening.", "--instruction", "a calm low voice", "--seed", "1"],
        ["sfx", "rain on a tin roof", "--duration", "1.5", "--greedy", "--max-seconds", "2"],
        ["dialogue", "[S1] hi. [S2] hello there.", "--seed", "2"],
    ],
    ids=lambda argv: argv[0],
)
def test_each_command_writes_a_wav(cache, tmp_path, capsys, argv):
    out = tmp_path / "out.wav"
    assert main([*argv, "--tiny", "-q", "--device", "cpu", "-o", str(out)]) == 0
    audio = read(out)
    assert len(audio) > 0 and len(audio) % 1920 == 0  # whole codec frames (a single piece)
    captured = capsys.readouterr()
    assert "UNTRAINED" in captured.err
    assert f"wrote {out}" in captured.out


def test_cloning_from_reference_wavs(cache, tmp_path, voice):
    out = tmp_path / "clone.wav"
    assert (
        main(
            ["tts", "Cloned voice.", "--reference", str(voice), "--tiny", "-q", "-o", str(out), "--seed", "0"]
        )
        == 0
    )
    assert len(read(out)) > 0
    out = tmp_path / "dialogue.wav"
    argv = [
        "dialogue",
        "[S1] ref one. [S2] ref two. [S1] new line.",
        "--reference",
        str(voice),
        "--reference",
        str(voice),
    ]
    assert main([*argv, "--tiny", "-q", "-o", str(out), "--seed", "0"]) == 0
    assert read(out).size > 0


def test_jsonl_writes_one_wav_per_line(cache, tmp_path, voice):
    lines = [
        {"text": "First request.", "output": "first.wav"},
        {"text": "Second, with a voice.", "reference": voice.name},  # relative to the JSONL file
        {"text": "Third. " * 30},  # longer than --max-chars: split and stitched
    ]
    jsonl = voice.parent / "requests.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    out_dir = tmp_path / "wavs"
    code = main(
        [
            "tts",
            "--jsonl",
            str(jsonl),
            "--output-dir",
            str(out_dir),
            "--tiny",
            "-q",
            "--seed",
            "4",
            "--batch-size",
            "2",
            "--max-chars",
            "60",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["0001.wav", "0002.wav", "first.wav"]
    assert all(read(p).size > 0 for p in out_dir.iterdir())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "fine"', "not valid JSON"),
        ('["text"]', "must be a JSON object"),
        ('{"txt": "typo"}', "unknown field(s) txt"),
        ('{"text": "   "}', "empty"),
        ('{"text": "x", "tokens": -3}', "from 1 to 7500"),
        ('{"text": "x", "reference": "missing.wav"}', "missing.wav"),
        ('{"kind": "sfx", "text": "x"}', "does not belong"),
    ],
)
def test_bad_jsonl_lines_name_the_line(cache, tmp_path, capsys, line, message):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "good"}\n\n' + line + "\n")
    assert main(["tts", "--jsonl", str(jsonl), "--tiny", "-q", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3: " in err and message in err
    assert not (tmp_path / "o").exists()  # nothing generated before the whole file was valid


def test_usage_errors(cache, tmp_path, capsys):
    assert main(["tts", "--tiny"]) == 2
    assert "give the TEXT" in capsys.readouterr().err
    assert main(["voice-design", "hi", "--tiny"]) == 2
    assert "--instruction" in capsys.readouterr().err
    assert main(["tts", "hi", "--tiny", "--output-dir", str(tmp_path)]) == 2
    assert "--output-dir is for --jsonl" in capsys.readouterr().err
    assert main(["dialogue", "no tags here", "--tiny", "-o", str(tmp_path / "d.wav")]) == 2
    assert "speaker tags" in capsys.readouterr().err


def test_max_seconds_caps_each_piece(cache, tmp_path, capsys):
    out = tmp_path / "capped.wav"
    # Greedy decoding never ends on the tiny model, so the cap decides the length.
    assert main(["tts", "Go on.", "--greedy", "--max-seconds", "1", "--tiny", "-q", "-o", str(out)]) == 0
    frames = len(read(out)) // 1920
    assert 0 < frames <= round(1 * 12.5) + 40
    assert "length limit" in capsys.readouterr().err
