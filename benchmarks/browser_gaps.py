"""Gaps in the agent's WebRTC audio as Chromium hears them: concealed samples per turn, 1..N tabs.

Runs the real ``moss-agent serve`` (default ``--tiny --loopback-only``: offline, on this machine) and
headless Chromium whose fake microphone loops an espeak-ng question followed by silence, so each
loop is one user turn and one full agent reply. Every tab reports, per agent turn, the samples its
jitter buffer concealed (a packet was missing) from the turn's start to the next turn's start,
how many of them were concealed silence, and when the reply became audible; the server's own
figures for the turn are printed beside them. Figures depend on the machine: the load average is
printed with them.

    .venv/bin/python benchmarks/browser_gaps.py --tabs 1 2 --seconds 60
    .venv/bin/python benchmarks/browser_gaps.py --tabs 2 -- --slots 2 --llm-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from moss_agent.testing.chromium import Chromium

QUESTION = "Hello there. What is the weather like in Paris today?"
PAUSE_S = 7.0  # after the question: long enough for the agent's whole reply
REPORT = """JSON.stringify({
  turns: window.results.turns || {},
  rows: [...document.querySelectorAll('#turns tr')].map((r) => [...r.cells].map((c) => c.textContent)),
  status: document.getElementById('status').textContent,
})"""


def chromium_binary() -> str:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("headless Chromium is needed (apt install chromium)")


def user_audio(path: Path) -> None:
    speech = path.with_suffix(".speech.wav")
    subprocess.run(["espeak-ng", "-w", str(speech), "--", QUESTION], check=True, capture_output=True)
    pcm, rate = sf.read(speech, dtype="float32")
    sf.write(path, np.concatenate([pcm, np.zeros(int(PAUSE_S * rate), np.float32)]), rate)


async def start_server(serve_args: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    command = [sys.executable, "-m", "moss_agent.cli", "serve", "--port", "0", "--token", "gaps", *serve_args]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True
    )
    assert proc.stdout is not None
    async with asyncio.timeout(300):
        while line := (await proc.stdout.readline()).decode():
            match = re.search(r"open (http://\S+)", line)
            if match:
                return proc, match.group(1)
    raise SystemExit(f"moss-agent serve exited ({await proc.wait()}) before serving")


async def run(tabs: int, seconds: float, serve_args: list[str], work: Path) -> list[dict[str, Any]]:
    wav = work / "user.wav"
    user_audio(wav)
    proc, url = await start_server(serve_args)
    try:
        async with Chromium(chromium_binary(), work / f"profile-{tabs}", fake_audio=wav) as browser:
            pages = [await browser.open(f"{url}&client=tab{i}&autostart=1&processing=0") for i in range(tabs)]
            await asyncio.sleep(seconds)
            return [await page.evaluate(REPORT) for page in pages]
    finally:
        proc.terminate()
        await proc.wait()


def show(tabs: int, reports: list[str], load: tuple[float, float]) -> None:
    concealed: list[int] = []
    print(f"\n{tabs} tab(s); load average {load[0]:.2f} before, {load[1]:.2f} after")
    for index, raw in enumerate(reports):
        report = json.loads(raw)
        print(f"  tab{index} ({report['status']})")
        rows = {row[0]: row for row in report["rows"]}
        turns = sorted(report["turns"].items(), key=lambda item: int(item[0]))
        for turn_id, turn in turns[:-1]:  # the last turn is still open
            concealed.append(turn["concealedSamples"])
            heard = turn.get("heardMs")
            heard_ms = "-" if heard is None else f"{heard:.0f}"
            server = rows.get(turn_id, ["", "", "", ""])[3]
            e2e = re.search(r"e2e (\d+) ms", server)
            print(
                f"    turn {turn_id:>3}: concealed {turn['concealedSamples']:>7} ({turn['silentConcealedSamples']:>7} silent,"
                f" {turn['concealmentEvents']:>3} events), heard after {heard_ms:>6} ms,"
                f" server e2e {e2e.group(1) if e2e else '-':>5} ms"
            )
    if concealed:
        print(
            f"  concealed per turn: median {statistics.median(concealed):.0f}, max {max(concealed)}"
            f" ({len(concealed)} turns)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tabs", type=int, nargs="+", default=[1, 2], help="tab counts to run, one after another")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each run listens (default 60)")
    parser.add_argument("serve_args", nargs="*", help="after --: options for moss-agent serve")
    args = parser.parse_args()
    serve_args = args.serve_args or ["--tiny", "--loopback-only"]
    with tempfile.TemporaryDirectory(prefix="moss_gaps_") as folder:
        for tabs in args.tabs:
            before = os.getloadavg()[0]
            reports = await run(tabs, args.seconds, serve_args, Path(folder))
            show(tabs, reports, (before, os.getloadavg()[0]))


if __name__ == "__main__":
    asyncio.run(main())
