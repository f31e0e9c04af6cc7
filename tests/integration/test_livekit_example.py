"""examples/livekit_agent.py runs as its docstring says, in its offline form (no LiveKit server needed):
``synthesize`` speaks a text through the LiveKit plugin and writes a wav, through a ``moss-agent
speech-server --tiny`` started first, as a user would. (Its in-process form, ``synthesize --tiny``,
runs verbatim from the README in test_readme.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile

pytest.importorskip(
    "livekit.agents", reason="livekit-agents is not installed (pip install 'moss-agent[livekit]')"
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "livekit_agent.py"
TEXT = "Hello from the LiveKit plugin."


def synthesize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "synthesize", "--text", TEXT, *args],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip


def check_reply(result: subprocess.CompletedProcess[str], wav: Path) -> None:
    assert result.returncode == 0, result.stderr
    audio, rate = soundfile.read(wav)
    assert rate == 24000 and 0 < len(audio) <= round(2.0 * rate)  # --max-seconds 2 caps the reply
    timings = [
        line.split() for line in result.stdout.splitlines() if re.match(r"\s*\d+\.\d\d\s+\d+\.\d\d\s", line)
    ]
    assert [words[2] for words in timings] == TEXT.split()  # one timing per word, in order
    assert f"wrote {wav}" in result.stdout


def test_synthesize_through_a_speech_server(cache: Path, tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "moss_agent.cli", "speech-server", "--tiny", "--no-auth", "--port", "0",
         "--slots", "1", "--max-seconds", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        found = re.search(r"http://([0-9.]+:[0-9]+)", line)
        assert found, line + (server.stderr.read() if server.poll() is not None and server.stderr else "")
        address = found.group(1)
        deadline = time.monotonic() + 120
        while True:  # ready once the engine is warm
            try:
                with urllib.request.urlopen(f"http://{address}/readyz", timeout=5) as ready:
                    if ready.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the speech server never got ready"
            time.sleep(0.2)
        wav = tmp_path / "reply.wav"
        check_reply(synthesize("--engine-url", f"ws://{address}", "--out", str(wav)), wav)
    finally:
        server.terminate()
        server.wait(30)

    # nothing listening there any more: a clear error, not a traceback
    result = synthesize("--engine-url", f"ws://{address}", "--out", str(tmp_path / "none.wav"))
    assert result.returncode == 1 and "cannot reach the speech server" in result.stderr, result.stderr
    assert "speech-server` running there?" in result.stderr and "Traceback" not in result.stderr
