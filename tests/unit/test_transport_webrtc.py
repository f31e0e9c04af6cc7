"""WebRTC pieces without a network: the paced outbound track and the SDP candidate filter."""

from __future__ import annotations

import asyncio
import fractions

import numpy as np
import pytest

pytest.importorskip("aiortc")

from moss_agent.events import AudioChunk
from moss_agent.transports.playback import FramePacer, PlaybackBuffer
from moss_agent.transports.webrtc import filter_candidates, make_paced_track

OFFER = (
    "v=0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\n"
    "a=candidate:2 1 udp 2122260223 192.0.2.10 50001 typ host\r\n"
    "a=candidate:3 1 udp 2122260223 3f1c.local 50002 typ host\r\n"
    "a=mid:0\r\n"
)


def test_filter_candidates_keeps_only_allowed_addresses() -> None:
    kept = filter_candidates(OFFER, {"127.0.0.1"})
    assert "127.0.0.1 50000" in kept
    assert "192.0.2.10" not in kept and ".local" not in kept
    assert "a=mid:0" in kept and kept.startswith("v=0\r\nm=audio")


async def test_paced_track_emits_20ms_stereo_frames_with_continuous_pts(monkeypatch) -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    buffer = PlaybackBuffer(48_000, sample_rate=24_000)
    track = make_paced_track(buffer, pacer=FramePacer(960, 48_000, clock=lambda: now[0]))
    for _ in range(2):  # 2 x 20 ms at 24 kHz; the resampler releases output in blocks
        await buffer.write(AudioChunk(np.full(480, 0.25, np.float32), 24_000, turn_id=1))
    frames = [await track.recv() for _ in range(4)]
    assert [f.pts for f in frames] == [0, 960, 1920, 2880]
    assert all(f.samples == 960 and f.sample_rate == 48_000 for f in frames)
    assert all(f.time_base == fractions.Fraction(1, 48_000) for f in frames)
    assert all(f.layout.name == "stereo" for f in frames)
    assert now[0] == pytest.approx(0.06)  # three 20 ms waits after the first frame
    first = frames[0].to_ndarray().reshape(-1, 2)
    assert np.all(first[:, 0] == first[:, 1])  # mono duplicated to both channels
    assert np.abs(first).max() > 0.2 * 32768  # the written audio
    assert not frames[-1].to_ndarray().any()  # starved: silence
    assert buffer.played_s(1) > 0
    track.stop()
