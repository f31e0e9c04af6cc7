"""The output level as a user meets it: ``moss-agent reply --tiny`` (whose random model makes noise far
above full scale) writes a wav that stays under the -1 dBFS ceiling, and ``-v`` says how much the
session's limiter turned down."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from moss_agent.cli import main

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello.wav"
CEILING_PCM16 = 29204  # -1 dBFS rounded down to a whole PCM16 step



def test_reply_tiny_writes_a_wav_under_the_ceiling_and_reports_the_limiting(cache, tmp_path, caplog):
    out = tmp_path / "reply.wav"
    # A sampled turn may end before its first frame (an empty reply, no file): the next seed speaks.
    with caplog.at_level(logging.INFO, logger="moss_agent"):
        for seed in range(1, 6):
            code = main(["-v", "reply", "--tiny", "-i", str(HELLO), "-o", str(out), "--transcript", "Hello there.",
                         "--max-seconds", "1.2", "--seed", str(seed)])
            assert code == 0
            if out.exists():
                break
    assert out.exists(), "five seeds gave no reply audio"
    pcm, rate = sf.read(str(out), dtype="int16")
    assert rate == 24000 and len(pcm) > 0
    assert int(np.abs(pcm.astype(np.int32)).max()) <= CEILING_PCM16
    # the session's limiter turned the random model's noise down, and said so with -v
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("limiter: turn ")]
    assert lines, "the session's limiter did not report"
    found = re.search(r"reduced ([\d.]+)% of samples, peak ([+-][\d.]+) dBFS", lines[-1])
    assert found is not None, lines[-1]
    assert float(found.group(1)) > 0 and float(found.group(2)) > -1.0
