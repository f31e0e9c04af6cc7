"""The soak benchmark's short form: concurrent sessions with interrupts and LLM failures on one
tiny engine; every conversation's audio equals its solo replay, and nothing is left behind."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.conftest import REPO


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_soak_has_no_cross_talk_and_no_leaks(tiny_realtime_dir: Path, tiny_codec_dir: Path) -> None:
    soak = load_soak()
    # 8 sessions x 50 turns on one engine; two conversations are replayed alone for the
    # exact cross-talk check (every one costs a solo run), chunks with a wrong turn id count for all;
    # short turns (8 frames) keep the churn of 400 turns, interrupts and failures in under a minute.
    report = await soak.run_soak(tiny_realtime_dir, tiny_codec_dir, sessions=8, turns=50, seed=1, replay_sessions=2, max_frames=8)
    print("\n".join(report.lines()))
    assert report.interrupted > 0 and report.llm_failures > 0, "the run exercised neither interrupts nor failures"
    assert report.cross_talk_exact == 0 and report.wrong_turn_chunks == 0
    assert report.leaked_tasks == 0 and report.leaked_slots == 0
