"""``examples/pipecat_bot.py`` runs as a user would run it, offline: the tiny engine, pipecat's own
OpenAI LLM service on the local echo server, two typed turns, two wavs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moss_agent.audio import load_audio

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (pip install 'moss-agent[pipecat]')")
pytest.importorskip("openai", reason="pipecat's OpenAI LLM service needs openai (the [llm] extra)")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pipecat_bot.py"


def run_example(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_the_pipecat_example_documents_its_options() -> None:
    result = run_example("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    for option in ("--tiny", "--llm-url", "--engine-url", "--out-dir"):
        assert option in result.stdout
    assert "OpenMOSS-Team/MOSS-TTS-Realtime" in "".join(result.stdout.split())


def test_the_pipecat_example_answers_each_line_and_writes_its_audio(cache: Path, tmp_path: Path) -> None:
    result = run_example(
        "--tiny", "--device", "cpu", "--seed", "0", "--max-seconds", "0.8", "--out-dir", str(tmp_path),
        stdin="good evening\nhow are you\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "agent> You said: good evening" in result.stdout  # the words pipecat timed, in order
    assert "agent> You said: how are you" in result.stdout
    assert "UNTRAINED" in result.stderr and "Traceback" not in result.stderr
    for n in (1, 2):
        audio = load_audio(tmp_path / f"reply_{n}.wav", 24000)
        assert 0 < len(audio) <= int(0.8 * 24000) and abs(audio).max() > 0
