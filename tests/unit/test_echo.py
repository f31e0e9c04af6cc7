"""The WebRTC echo canceller removes a delayed copy of the agent's voice and keeps the user's."""

from __future__ import annotations

import numpy as np
import pytest

from moss_agent.streaming.echo import WebRtcEchoCanceller

pytest.importorskip("aec_audio_processing", reason="aec-audio-processing is not installed")


def _db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-12))


def _voice_like(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """Noise shaped by a syllable-rate envelope: broadband and non-stationary like speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * np.arange(n) / rate) ** 2
    return (0.2 * rng.standard_normal(n) * envelope).astype(np.float32)


def test_echo_is_removed_and_the_user_is_kept() -> None:
    rate, delay = 16000, 640  # 40 ms
    far = _voice_like(4.0, seed=1)
    user = _voice_like(0.8, seed=2)
    echo = np.concatenate([np.zeros(delay, np.float32), 0.5 * far])[: len(far)]
    near = echo.copy()
    user_at = int(3.0 * rate)
    near[user_at : user_at + len(user)] += user
    aec = WebRtcEchoCanceller(rate, delay_ms=40)
    out = np.zeros(0, dtype=np.float32)
    for start in range(0, len(near), 320):  # 20 ms microphone chunks
        aec.feed_far(far[start : start + 320])
        out = np.concatenate([out, aec.process_near(near[start : start + 320])])
    assert len(out) == len(near)
    echo_only = slice(int(1.5 * rate), user_at)
    assert _db(near[echo_only]) - _db(out[echo_only]) > 15.0
    during_user = slice(user_at, user_at + len(user))
    assert _db(out[during_user]) > _db(user) - 8.0
