"""WebRTC pieces without a network: the paced outbound track, the SDP candidate filter, the offer
checks and the HTTP connection guard's counting."""

from __future__ import annotations

import asyncio
import fractions
import re

import numpy as np
import pytest

pytest.importorskip("aiortc")

from moss_agent.errors import ConfigError, TransportError
from moss_agent.events import AudioChunk
from moss_agent.transports.playback import FramePacer, PlaybackBuffer
from moss_agent.transports.webrtc import (
    MAX_MEDIA_SECTIONS,
    MAX_SDP_CHARS,
    filter_candidates,
    make_paced_track,
    parse_offer,
)
from moss_agent.transports.webrtc_http import ConnectionGuard, HttpLimits

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


SDP_HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def test_parse_offer_returns_the_sdp_of_a_well_formed_offer() -> None:
    sdp = SDP_HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    assert parse_offer({"type": "offer", "sdp": sdp}) == sdp


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"type": "answer", "sdp": SDP_HEAD}, '"type": "offer"'),
        ({"type": "offer", "sdp": ["v=0"]}, '"type": "offer"'),
        ({"type": "offer"}, '"type": "offer"'),
        ({"type": "offer", "sdp": "x" + SDP_HEAD}, "start with 'v=0'"),
        ({"type": "offer", "sdp": SDP_HEAD + "s=\u00e9\r\nm=audio 9 RTP/AVP 0\r\n"}, "ASCII"),
        ({"type": "offer", "sdp": SDP_HEAD + "a=\x1b\r\nm=audio 9 RTP/AVP 0\r\n"}, "control character"),
        ({"type": "offer", "sdp": SDP_HEAD + "m=audio 9 RTP/AVP 0\r\n" * (MAX_MEDIA_SECTIONS + 1)}, "m-lines"),
        ({"type": "offer", "sdp": SDP_HEAD + "m=video 9 RTP/AVP 96\r\n"}, "no audio m-line"),
        ({"type": "offer", "sdp": SDP_HEAD + "a=" + "x" * MAX_SDP_CHARS}, "characters; at most"),
    ],
)
def test_parse_offer_says_what_is_wrong(body: dict, words: str) -> None:
    with pytest.raises(TransportError, match=re.escape(words)):
        parse_offer(body)


def test_http_limits_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="header_timeout_s must be positive"):
        HttpLimits(header_timeout_s=0)


def test_connection_guard_counts_per_address_and_in_total() -> None:
    guard = ConnectionGuard(HttpLimits(max_connections_per_address=2, max_connections=3))
    assert guard.admit("10.0.0.1") is None and guard.admit("10.0.0.1") is None
    assert "too many open connections from 10.0.0.1" in (guard.admit("10.0.0.1") or "")
    assert guard.admit("10.0.0.2") is None
    assert "too many open connections; retry later" in (guard.admit("10.0.0.3") or "")
    guard.release("10.0.0.1")
    assert guard.connections_from("10.0.0.1") == 1 and guard.open_connections == 2
    assert guard.admit("10.0.0.3") is None
