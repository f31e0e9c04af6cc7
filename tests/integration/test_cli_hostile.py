"""Hostile files and arguments against the real ``moss-agent`` command (issue 15, files and CLI).

Each case runs the CLI in a subprocess and must give exit 2, one error line that says what was
wrong (``file:line:`` for JSONL, the file's name for audio), no traceback, and nothing written
outside ``--output-dir``. Most cases fail before any model loads, so the module stays fast; a good
request then runs normally in the same folder.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_cli_errors import HELLO, error_line, moss_agent

from moss_agent.audio import wav_bytes, write_wav
from moss_agent.commands.batch_common import MAX_TOKENS, REQUEST_FIELDS


@pytest.fixture(scope="module")
def tiny_cache(
    tmp_path_factory: pytest.TempPathFactory, tiny_codec_dir: Path, tiny_realtime_dir: Path
) -> dict[str, str]:
    """The environment of a user whose --tiny checkpoints are made (once for the module)."""
    from moss_agent.options import ensure_tiny_batch_checkpoint

    root = tmp_path_factory.mktemp("cache")
    (root / "tiny").mkdir()
    (root / "tiny" / "codec").symlink_to(tiny_codec_dir)
    (root / "tiny" / "realtime").symlink_to(tiny_realtime_dir)
    ensure_tiny_batch_checkpoint(root / "tiny")
    return {"MOSS_AGENT_CACHE": str(root)}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """tmp/work/out: the output folder two levels below tmp, with a symlink in it that leads out."""
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "escape").symlink_to(tmp_path / "elsewhere")
    return out


def files_outside(tmp_path: Path, out: Path) -> list[Path]:
    """Files written anywhere under tmp_path but the inputs and the output folder."""
    return [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_relative_to(out) and p.suffix != ".jsonl" and not p.is_symlink()
    ]


# ------------------------------------------------------------------------------------ tts --jsonl

NESTED = "[" * 20000 + "]" * 20000
JSONL_CASES: dict[str, tuple[str | bytes, str]] = {
    "output with ..": ('{"text": "hi", "output": "../../x.wav"}', "leaves --output-dir"),
    "absolute output": ('{"text": "hi", "output": "ABS"}', "leaves --output-dir"),
    "output through a symlink": ('{"text": "hi", "output": "escape/x.wav"}', "outside --output-dir"),
    "output is the symlink": ('{"text": "hi", "output": "escape"}', "outside --output-dir"),
    "output a number": (
        '{"text": "hi", "output": 5}',
        '"output" must be a file name inside --output-dir, got 5',
    ),
    "two lines, one output": (
        '{"text": "a", "output": "same.wav"}\n{"text": "b", "output": "same.wav"}',
        "also the output of",
    ),
    "deeply nested line": (NESTED, "nests 20000 levels deep; at most 3 are accepted"),
    "nested field": ('{"text": ' + "[" * 50 + "]" * 50 + "}", "nests 51 levels deep"),
    "kind a number": ('{"kind": 5, "text": "hi"}', "kind 5 does not belong in a tts file"),
    "not UTF-8": ('{"text": "caf\xe9"}'.encode("latin-1"), "not valid UTF-8 (byte 13)"),
    "binary garbage": (np.random.default_rng(1).bytes(300).replace(b"\n", b"x"), "not valid"),
    "duplicate keys": ('{"text": "hi", "text": "ho"}', "duplicate key 'text'"),
    "ten-billion tokens": ('{"text": "hi", "tokens": 10000000000}', f"from 1 to {MAX_TOKENS} (10 minutes)"),
    "infinite tokens": ('{"text": "hi", "tokens": 1e400}', "got Infinity"),
    "NaN": ('{"text": "hi", "tokens": NaN}', "NaN is not a JSON number"),
    "5000-digit number": ('{"text": "hi", "tokens": ' + "9" * 5000 + "}", "not valid JSON"),
    "text a number": ('{"text": 5}', '"text" must be a string, got a number'),
    "reference a list": (
        '{"text": "hi", "reference": ["a.wav"]}',
        '"reference" must be the path of an audio file',
    ),
    "missing reference": ('{"text": "hi", "reference": "nowhere.wav"}', "audio file nowhere.wav not found"),
    "no text": ('{"language": "English"}', 'missing field "text"'),
    "a JSON list": ('["text", "hi"]', "must be a JSON object, got list"),
    "a huge key": ('{"' + "k" * 5000 + '": 1, "text": "hi"}', "unknown field(s) kkkk"),
}


@pytest.mark.parametrize("case", list(JSONL_CASES))
def test_hostile_jsonl_line_is_one_file_line_error_and_writes_nothing(
    tmp_path: Path, folder: Path, case: str
) -> None:
    line, expected = JSONL_CASES[case]
    jsonl = tmp_path / "requests.jsonl"
    good = b'{"text": "fine"}\n'
    body = line if isinstance(line, bytes) else line.replace("ABS", str(tmp_path / "abs.wav")).encode()
    jsonl.write_bytes(good + body + b"\n")
    proc = moss_agent("tts", "--jsonl", jsonl, "--output-dir", folder, "--tiny", "-q")
    message = error_line(proc, "tts")
    last_line = 2 + body.count(b"\n")
    assert message.startswith(f"{jsonl}:{last_line}: "), message
    assert expected in message, message
    assert len(message) < 400, message  # a nested or huge line is described, not echoed
    assert "UNTRAINED" not in proc.stderr  # refused before the model loads
    assert files_outside(tmp_path, folder) == [] and sorted(folder.iterdir()) == [folder / "escape"]


OPTION_CASES = {
    "ten-billion --tokens": (["tts", "hi", "--tokens", "10000000000"], f"from 1 to {MAX_TOKENS}"),
    "--max-seconds nan": (["tts", "hi", "--max-seconds", "nan"], "--max-seconds must be seconds in (0, 600]"),
    "--max-seconds inf": (["tts", "hi", "--max-seconds", "inf"], "--max-seconds must be seconds in (0, 600]"),
    "--batch-size 0": (["tts", "hi", "--batch-size", "0"], "--batch-size must be from 1 to 256"),
    "--seed -1": (["tts", "hi", "--seed", "-1"], "--seed must be from 0 to"),
    "--max-chars 3": (["tts", "hi", "--max-chars", "3"], "--max-chars must be from 8 to 2000"),
    "--duration 1e9": (["sfx", "rain", "--duration", "1e9"], "--duration must be seconds in (0, 600]"),
    "say --max-chars 5": (["say", "hi", "--max-chars", "5"], "--max-chars must be from 8 to 1000"),
    "reply --max-input-seconds nan": (
        ["reply", "-i", str(HELLO), "--max-input-seconds", "nan"],
        "--max-input-seconds must be in (0, 300]",
    ),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_out_of_range_options_are_refused_before_models_load(tmp_path: Path, case: str) -> None:
    argv, expected = OPTION_CASES[case]
    proc = moss_agent(*argv, "--tiny", "-o", tmp_path / "x.wav")
    assert expected in error_line(proc, argv[0]), proc.stderr
    assert "UNTRAINED" not in proc.stderr and not (tmp_path / "x.wav").exists()


def test_a_good_jsonl_then_runs_and_stays_in_its_folder(
    tmp_path: Path, folder: Path, tiny_cache: dict[str, str]
) -> None:
    jsonl = tmp_path / "requests.jsonl"
    lines = [{"text": "First.", "output": "sub/first.wav"}, {"text": "Second."}]
    jsonl.write_text("\n".join(map(json.dumps, lines)) + "\n")
    proc = moss_agent(
        "tts",
        "--jsonl",
        jsonl,
        "--output-dir",
        folder,
        "--tiny",
        "-q",
        "--max-seconds",
        "0.5",
        env=tiny_cache,
    )
    assert proc.returncode == 0, proc.stderr
    assert (folder / "sub" / "first.wav").is_file() and (folder / "0001.wav").is_file()
    assert files_outside(tmp_path, folder) == []


def test_request_fields_match_the_engine_requests() -> None:
    import dataclasses

    from moss_agent.engine.batch import KINDS

    for kind, cls in KINDS.items():
        fields = {
            f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(cls)
        }
        assert REQUEST_FIELDS[kind] == fields, kind


# ---------------------------------------------------------------------------------- audio files


def _wav_with(**fmt: int) -> bytes:
    """A 1 s PCM16 wav at 16 kHz with fmt fields (channels, block_align, bits) replaced."""
    data = bytearray(wav_bytes((0.3 * np.sin(np.arange(16000) * 0.05)).astype(np.float32), 16000))
    offsets = {"channels": 22, "block_align": 32, "bits": 34}
    for name, value in fmt.items():
        data[offsets[name] : offsets[name] + 2] = struct.pack("<H", value)
    return bytes(data)


def _unscaled_float_wav() -> bytes:
    path_bytes = __import__("io").BytesIO()
    sf.write(
        path_bytes,
        (898 * np.sin(np.arange(16000) * 0.05)).astype(np.float32),
        16000,
        format="WAV",
        subtype="FLOAT",
    )
    return path_bytes.getvalue()


AUDIO_CASES = {
    "7 bits per sample": (lambda: _wav_with(bits=7, block_align=1), "states 7 bits per sample"),
    "block size of 2 channels": (lambda: _wav_with(block_align=4), "4 bytes per frame"),
    "float samples of ±898": (_unscaled_float_wav, "has samples up to ±898"),
    "cut in half": (lambda: _wav_with()[:16000], "is truncated"),
    "random bytes": (lambda: np.random.default_rng(2).bytes(4000), "cannot decode"),
    "header only": (lambda: _wav_with()[:30], "ends inside its wav header"),
}


@pytest.mark.parametrize("case", list(AUDIO_CASES))
def test_hostile_audio_file_is_one_error_naming_the_file(tmp_path: Path, case: str) -> None:
    make, expected = AUDIO_CASES[case]
    bad = tmp_path / "user.wav"
    bad.write_bytes(make())
    proc = moss_agent("reply", "-i", bad, "-o", tmp_path / "r.wav", "--tiny", "--transcript", "hi")
    message = error_line(proc, "reply")
    assert str(bad) in message and expected in message, message
    assert not (tmp_path / "r.wav").exists()


def test_ten_minutes_of_input_is_refused_at_once_naming_the_limit(tmp_path: Path) -> None:
    long = tmp_path / "ten_minutes.wav"
    write_wav(long, np.zeros(8000 * 600, dtype=np.float32), 8000)
    proc = moss_agent("reply", "-i", long, "-o", tmp_path / "r.wav", "--tiny")
    assert error_line(proc, "reply") == (
        f"--input {long} is 600.0 s long; reply takes one user turn of at most 60 s: cut the recording, "
        "or raise --max-input-seconds (up to 300)"
    )


# ---------------------------------------------------------------------------- say and the LLM


def test_say_speaks_text_longer_than_one_turn_holds(tmp_path: Path, tiny_cache: dict[str, str]) -> None:
    # 24 000 characters: one turn of it overflowed the model's 4096 text tokens.
    text = "This is a fairly ordinary sentence for testing. " * 500
    out = tmp_path / "long.wav"
    proc = moss_agent(
        "say", text, "--tiny", "--max-chars", "1000", "--max-seconds", "0.3", "-o", out, env=tiny_cache
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    assert sf.info(str(out)).duration > 24 * 0.08  # at least a frame from each of the 24 turns


@pytest.fixture
def web_page_llm() -> Iterator[str]:
    """A local HTTP server that answers every request 200 text/html, as a mistyped --llm-url does."""
    import asyncio

    from aiohttp import web

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Welcome to nginx!</body></html>", content_type="text/html")

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_an_llm_url_that_answers_a_web_page_is_refused_before_models_load(
    tmp_path: Path, web_page_llm: str
) -> None:
    out = tmp_path / "r.wav"
    proc = moss_agent(
        "reply", "-i", HELLO, "-o", out, "--tiny", "--transcript", "hi", "--llm-url", web_page_llm
    )
    message = error_line(proc, "reply")
    assert message == (
        f"the LLM server at {web_page_llm} answered HTTP 200 with 'text/html' where an OpenAI-compatible server "
        "sends JSON; the answer begins b'<html><body>Welcome to nginx!</body></html>'; check that the URL is an "
        "OpenAI-compatible /v1 endpoint"
    )
    assert "UNTRAINED" not in proc.stderr and not out.exists()


async def test_speech_recognition_refuses_an_utterance_over_its_limit_before_any_request() -> None:
    from moss_agent.errors import STTError
    from moss_agent.speech.stt import MAX_UTTERANCE_SECONDS, OpenAITranscriber

    # Nothing listens at this URL: the length check comes before any request or resampling.
    recognizer = OpenAITranscriber("http://127.0.0.1:9/v1", api_key="x")
    ten_minutes = np.zeros(16000 * 600, dtype=np.float32)
    with pytest.raises(STTError, match=rf"600.0 s of audio .* at most {MAX_UTTERANCE_SECONDS:g} s"):
        await recognizer.transcribe(ten_minutes, 16000)
    await recognizer.aclose()
