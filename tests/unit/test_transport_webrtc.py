"""WebRTC pieces without a network: the paced outbound track and its start buffer, the SDP candidate
filter, the offer checks, what a browser may see of an error, and the HTTP connection guard's
counting."""

from __future__ import annotations

import asyncio
import fractions
import re

import numpy as np
import pytest

pytest.importorskip("aiortc")

from moss_agent.errors import ConfigError, TransportError
from moss_agent.events import AudioChunk, ErrorEvent
from moss_agent.transports.connection import event_to_json
from moss_agent.transports.playback import FramePacer, PlaybackBuffer
from moss_agent.transports.webrtc import (
    MAX_MEDIA_SECTIONS,
    MAX_SDP_CHARS,
    browser_safe,
    candidate_addresses,
    filter_candidates,
    parse_offer,
)
from moss_agent.transports.webrtc_http import ConnectionGuard, HttpLimits
from moss_agent.transports.webrtc_track import FRAME_S, StartBuffer, make_paced_track, outbound_stats

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


def test_candidate_addresses_lists_every_candidate_and_none_for_an_sdp_without() -> None:
    assert candidate_addresses(OFFER) == ["127.0.0.1", "192.0.2.10", "3f1c.local"]
    assert candidate_addresses(filter_candidates(OFFER, set())) == []


def test_session_errors_reach_the_browser_as_a_generic_message_and_the_detail_is_logged(caplog) -> None:
    detail = "turn 4: text failed: LLM request to http://10.0.0.7:8000/v1 failed (connection): refused"
    event = event_to_json(ErrorEvent(detail, 4, detail={"kind": "connection"}))
    with caplog.at_level("WARNING", logger="moss_agent.transports.webrtc"):
        safe = browser_safe(event, "rtc-1")
    assert safe == {
        "type": "error",
        "code": "agent",
        "message": "the language model did not answer; try again (the server log says why)",
        "fatal": False,
        "turn_id": 4,
    }
    assert detail in caplog.text
    stt = browser_safe(event_to_json(ErrorEvent("speech recognition failed: x", detail={"kind": "stt"})))
    assert "speech recognition failed" in stt["message"] and "turn_id" not in stt
    fatal = browser_safe(event_to_json(ErrorEvent("session 'x' failed: boom", fatal=True)))
    assert fatal["fatal"] and "boom" not in fatal["message"]
    own = {
        "type": "error",
        "code": "bad_request",
        "message": "control messages are JSON objects sent as text",
    }
    assert browser_safe(own) is own  # the transport's own replies say what was wrong with the request


def feed(start: StartBuffer, queued_frames: float, turn_id: int) -> bool:
    """One frame of the track: True when it was held back; else pulls ``min(queued, 1)`` frames."""
    if start.hold(queued_frames * FRAME_S):
        return True
    start.played(turn_id if queued_frames > 0 else -1, min(queued_frames, 1.0) * FRAME_S)
    return False


def test_start_buffer_learns_the_gap_a_turn_had_and_holds_later_starts_by_that_much() -> None:
    start = StartBuffer(max_s=0.3)
    assert not feed(start, 4, turn_id=1)  # nothing learned yet: the first turn starts at once
    for _ in range(5):  # the producer is late: 5 frames with nothing to play, inside turn 1
        feed(start, 0, turn_id=1)
    assert not feed(start, 4, turn_id=1)
    assert start.target_s == pytest.approx(5 * FRAME_S)
    for _ in range(3):  # turn 1 ends; silence
        feed(start, 0, turn_id=1)
    # Turn 2's audio arrives: held for the 100 ms its producer was late before, however much is queued.
    held = [feed(start, queued, turn_id=2) for queued in (4, 5, 6, 7, 8, 9)]
    assert held == [True, True, True, True, True, False]
    for _ in range(3):
        feed(start, 0, turn_id=2)
    # Turn 3 arrives with max_s queued, which covers any gap learned here: no hold. Turn 2 played
    # without a gap, so the hold shrinks by one frame.
    assert not feed(start, 15, turn_id=3)
    assert start.target_s == pytest.approx(4 * FRAME_S)


def test_start_buffer_ignores_stalls_longer_than_it_could_cover_and_turn_changes() -> None:
    start = StartBuffer(max_s=0.1)
    feed(start, 2, turn_id=1)
    for _ in range(50):  # one second without audio inside turn 1: a stall, not jitter
        feed(start, 0, turn_id=1)
    feed(start, 2, turn_id=1)
    assert start.target_s == 0.0
    for _ in range(3):
        feed(start, 0, turn_id=1)
    feed(start, 2, turn_id=2)  # a new turn after silence is no gap
    assert start.target_s == 0.0
    with pytest.raises(ConfigError, match="initial_s <= max_s"):
        StartBuffer(initial_s=0.5, max_s=0.1)


async def test_paced_track_holds_a_start_and_counts_a_gap_per_turn(monkeypatch) -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    buffer = PlaybackBuffer(48_000)
    stats = outbound_stats()
    start = StartBuffer(initial_s=0.04, max_s=0.2)
    track = make_paced_track(buffer, pacer=FramePacer(960, 48_000, clock=lambda: now[0]), start_buffer=start,
                             stats=stats, clock=lambda: now[0])  # fmt: skip
    await buffer.write(AudioChunk(np.full(960, 0.25, np.float32), 48_000, turn_id=7))
    held = [await track.recv() for _ in range(2)]
    assert not any(f.to_ndarray().any() for f in held)  # 20 ms queued, 40 ms wanted: held back 40 ms
    assert np.abs((await track.recv()).to_ndarray()).max() > 0.2 * 32768
    for _ in range(3):
        await track.recv()  # dry inside turn 7
    await buffer.write(AudioChunk(np.full(1920, 0.25, np.float32), 48_000, turn_id=7))
    frames = [await track.recv() for _ in range(4)]  # after a gap the track buffers again
    assert [bool(np.abs(f.to_ndarray()).max() > 0.2 * 32768) for f in frames] == [False, False, True, True]
    assert stats["gaps"] == 1 and stats["turns"][7]["gaps"] == 1
    assert stats["turns"][7]["gap_s"] == pytest.approx(3 * FRAME_S) and stats["held_frames"] == 4
    assert stats["turns"][7]["held_s"] == pytest.approx(4 * FRAME_S)
    assert stats["frames"] == 10 and stats["late_frames"] == 0
    track.stop()


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
        (
            {"type": "offer", "sdp": SDP_HEAD + "m=audio 9 RTP/AVP 0\r\n" * (MAX_MEDIA_SECTIONS + 1)},
            "m-lines",
        ),
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
