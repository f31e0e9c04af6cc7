"""The --tiny demo always speaks: the untrained tiny models may end a turn on its first frame, so
--tiny sets a shortest reply of 1 s (--min-seconds); reply and tts then give audio for every seed and
with --greedy. A real model's empty turn, and an LLM failure, stay one clear line.

Every run goes through ``moss_agent.cli.main`` in this process (cheap); the README's command runs as
a user types it in test_readme.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from moss_agent.audio import load_audio
from moss_agent.cli import build_parser, main
from moss_agent.options import FRAME_SECONDS, TINY_MIN_SECONDS

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello.wav"
RATE = 24000
# The shortest tiny reply: 1 s of 80 ms frames (12 frames, 0.96 s).
SHORTEST = round(TINY_MIN_SECONDS / FRAME_SECONDS) * round(FRAME_SECONDS * RATE)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory, tiny_codec_dir: Path, tiny_realtime_dir: Path) -> Path:
    """A cache folder holding the --tiny checkpoints (the Delay one made as --tiny makes it)."""
    from moss_agent.options import ensure_tiny_batch_checkpoint

    root = tmp_path_factory.mktemp("cache")
    (root / "tiny").mkdir()
    (root / "tiny" / "codec").symlink_to(tiny_codec_dir)
    (root / "tiny" / "realtime").symlink_to(tiny_realtime_dir)
    ensure_tiny_batch_checkpoint(root / "tiny")
    return root


@pytest.fixture
def cache(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOSS_AGENT_CACHE", str(tiny_root))
    return tiny_root


def seconds_written(path: Path) -> float:
    return len(load_audio(path, RATE)) / RATE if path.exists() else 0.0


# ------------------------------------------------------------------------------------------ reply


def test_reply_tiny_speaks_on_every_draw(cache: Path) -> None:
    """The engine `reply --tiny` builds, given 16 turns as 16 separate runs would (a fresh session
    each, every turn a new sampling seed), speaks at least the tiny minimum every time."""
    from moss_agent import options
    from moss_agent.commands.common import collect_turn
    from moss_agent.streaming.llm import EchoResponder
    from moss_agent.streaming.session import Session

    args = build_parser().parse_args(["reply", "--tiny", "-i", str(HELLO), "--max-seconds", "1.2"])
    engine = options.build_engine(args)
    hello = load_audio(HELLO, RATE)

    async def replies() -> list[int]:
        lengths = []
        async with engine:
            for _ in range(16):
                async with Session(engine, llm=EchoResponder()) as session:
                    events = session.events()
                    turn = session.respond(user_text="Hello there.", user_audio=hello)
                    audio, result = await collect_turn(events, turn)
                assert result.error is None
                lengths.append(len(audio))
        return lengths

    lengths = asyncio.run(replies())
    assert min(lengths) >= SHORTEST, lengths


@pytest.mark.parametrize("draw", [["--seed", "0"], ["--seed", "1"], ["--greedy"]])
def test_reply_tiny_writes_audio(cache: Path, tmp_path: Path, draw: list[str]) -> None:
    out = tmp_path / "reply.wav"
    code = main(["reply", "--tiny", "-i", str(HELLO), "-o", str(out), "--transcript", "Hello there.",
                 "--max-seconds", "1.2", *draw])  # fmt: skip
    assert code == 0
    assert seconds_written(out) >= SHORTEST / RATE


def test_an_llm_failure_is_the_only_error(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An LLM that fails before any text: its error is the one error line, no 'empty reply' after it,
    no blank 'agent:', exit 1 (2 is for usage errors)."""
    from moss_agent.testing.openai_server import FakeOpenAIServer, ScriptedReply

    server = FakeOpenAIServer([ScriptedReply("never said", fail="http500")])
    server.start_in_thread()
    try:
        out = tmp_path / "reply.wav"
        code = main(["reply", "--tiny", "-i", str(HELLO), "-o", str(out), "--transcript", "hi",
                     "--llm-url", server.base_url, "--llm-model", "tiny", "--max-seconds", "1.2"])  # fmt: skip
    finally:
        server.stop_thread()
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("NOTE: --tiny")]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and "HTTP 500" in errors[0], err
    assert lines[-1] == errors[0], err  # nothing follows it
    assert not any(line.startswith("agent:") for line in lines), err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ tts


def _jsonl(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"Line {k}. Hello there."}) + "\n" for k in range(count)))
    return path


def test_tts_tiny_speaks_every_sample(cache: Path, tmp_path: Path) -> None:
    """16 requests, generated in batches: each sample draws its own text channel, and each speaks."""
    out = tmp_path / "out"
    code = main(["tts", "--jsonl", str(_jsonl(tmp_path / "r.jsonl", 16)), "--output-dir", str(out), "--tiny", "-q",
                 "--seed", "3"])  # fmt: skip
    assert code == 0
    lengths = [seconds_written(out / f"{k:04d}.wav") for k in range(16)]
    assert min(lengths) >= SHORTEST / RATE, lengths


def test_tts_tiny_greedy_speaks(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "greedy.wav"
    assert main(["tts", "First.", "--tiny", "-q", "--greedy", "-o", str(out), "--max-seconds", "2"]) == 0
    assert seconds_written(out) >= SHORTEST / RATE


def test_tts_on_a_make_tiny_local_checkpoint(tmp_path: Path, tiny_codec_dir: Path, capsys) -> None:
    """The random Local model of `make-tiny` ends its audio at once: said in one line (exit 0, no
    file) unless --min-seconds asks for a shortest length, which every sample then has."""
    assert main(["make-tiny", str(tmp_path / "models"), "--kind", "local"]) == 0
    model = ["--model", str(tmp_path / "models" / "local"), "--codec", str(tiny_codec_dir), "-q"]
    capsys.readouterr()
    empty = tmp_path / "empty.wav"
    assert main(["tts", "Hello there.", *model, "-o", str(empty)]) == 0
    assert not empty.exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("no audio for") and "--min-seconds" in lines[0]
    out = tmp_path / "out"
    code = main(["tts", "--jsonl", str(_jsonl(tmp_path / "r.jsonl", 8)), "--output-dir", str(out), *model,
                 "--min-seconds", "1"])  # fmt: skip
    assert code == 0
    lengths = np.array([seconds_written(out / f"{k:04d}.wav") for k in range(8)])
    assert lengths.min() >= SHORTEST / RATE, lengths


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["say", "hi", "--tiny", "--min-seconds", "-1"], "--min-seconds must be seconds >= 0"),
        (["say", "hi", "--tiny", "--min-seconds", "nan"], "--min-seconds must be seconds >= 0"),
        (["say", "hi", "--tiny", "--min-seconds", "3", "--max-seconds", "2"], "longer than --max-seconds"),
        (["tts", "hi", "--tiny", "--min-seconds", "3", "--max-seconds", "2"], "longer than --max-seconds"),
    ],
)
def test_bad_min_seconds_fail_before_loading(argv: list[str], message: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MOSS_AGENT_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing was made or loaded
