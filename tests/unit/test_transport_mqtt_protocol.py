"""The MQTT wire format without a broker: topics, packet header, Opus/PCM16 round trips, validation."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moss_agent.errors import TransportError
from moss_agent.transports.connection import parse_control
from moss_agent.transports.mqtt_protocol import (
    HEADER_BYTES,
    AudioDecoder,
    AudioEncoder,
    AudioHeader,
    SessionRequest,
    Topics,
    decode_audio_packet,
    encode_audio_packet,
    packet_seconds,
    parse_client_status,
    parse_session_request,
)
from moss_agent.wire import decode_json_object


def sine(hz: float, seconds: float, rate: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def test_topics_keep_each_client_under_its_own_subtree() -> None:
    topics = Topics("moss/v1")
    assert topics.up_audio("dev1", "s1") == "moss/v1/c/dev1/s/s1/up/audio"
    assert topics.shared_requests("g") == "$share/g/moss/v1/c/+/request"
    assert topics.parse("moss/v1/c/dev1/s/s1/down/event") == ("c", "dev1", "s", "s1", "down", "event")
    assert topics.parse("other/c/dev1/request") == ()


def test_header_round_trip_and_rejections() -> None:
    packet = encode_audio_packet(AudioHeader("opus", 24_000, 4_000_000_000, -1), b"abc")
    header, payload = decode_audio_packet(packet)
    assert header == AudioHeader("opus", 24_000, 4_000_000_000, -1)
    assert payload == b"abc"
    assert len(packet) == HEADER_BYTES + 3
    with pytest.raises(TransportError, match="shorter"):
        decode_audio_packet(b"MA")
    with pytest.raises(TransportError, match="magic"):
        decode_audio_packet(b"XX" + packet[2:])
    with pytest.raises(TransportError, match="codec id"):
        decode_audio_packet(packet[:3] + b"\x09" + packet[4:])
    with pytest.raises(TransportError, match="even"):
        decode_audio_packet(encode_audio_packet(AudioHeader("pcm16", 16_000, 0), b"abc"))


def test_pcm16_round_trip_is_exact_to_a_sample_step_and_drops_duplicates() -> None:
    encoder, decoder = AudioEncoder("pcm16", 16_000), AudioDecoder("pcm16", 16_000)
    audio = sine(440, 0.1, 16_000)
    packets = encoder.encode(audio, turn_id=3)
    assert len(packets) == 5  # 20 ms each
    decoded = [decoder.decode(p) for p in packets]
    pcm = np.concatenate([d[0] for d in decoded])
    assert np.max(np.abs(pcm - audio)) <= 1 / 32768
    assert {d[1].turn_id for d in decoded} == {3}
    assert len(decoder.decode(packets[2])[0]) == 0  # a replay is ignored


def test_opus_round_trip_keeps_the_tone_and_counts_losses() -> None:
    encoder, decoder = AudioEncoder("opus", 24_000), AudioDecoder("opus", 24_000)
    packets = encoder.encode(sine(440, 1.0, 24_000))
    assert len(packets) == 50
    assert all(len(p) < 200 for p in packets)  # compressed: raw PCM16 would be 960 bytes
    out = np.concatenate([decoder.decode(p)[0] for i, p in enumerate(packets) if i != 10])
    assert decoder.lost_packets == 1
    spectrum = np.abs(np.fft.rfft(out[4800:]))
    assert abs(np.argmax(spectrum) * 24_000 / len(out[4800:]) - 440) < 5


def test_session_request_validation() -> None:
    request = {"type": "session.request", "session": "abc", "codec": "pcm16", "sample_rate": 16000}
    assert parse_session_request(request) == SessionRequest("abc", "pcm16", 16000)
    assert parse_session_request({**request, "instance": "app2"}).instance == "app2"
    with pytest.raises(TransportError, match="instance id"):
        parse_session_request({**request, "instance": "a/+"})
    with pytest.raises(TransportError, match="opus needs"):
        parse_session_request({"type": "session.request", "session": "abc", "codec": "opus", "sample_rate": 22050})
    with pytest.raises(TransportError, match="session id"):
        parse_session_request({"type": "session.request", "session": "a/#"})


# --- fuzz: every MQTT decoder turns anything into TransportError or a valid result, nothing else ---



FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
_messages = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["type", "session", "codec", "sample_rate", "instance", "online", "text"]), _json)
    .map(lambda d: json.dumps(d).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)


@FUZZ
@given(_messages)
def test_fuzzed_json_messages_give_only_transport_errors(data: bytes) -> None:
    for what, parse in (
        ("session request", parse_session_request),
        ("client status", parse_client_status),
        ("control message", parse_control),
    ):
        with contextlib.suppress(TransportError):
            parse(decode_json_object(data, what=what))


@FUZZ
@given(
    st.sampled_from([b"MA", b"XX"]), st.integers(0, 3), st.integers(0, 3), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1), st.binary(max_size=400),
)  # fmt: skip
def test_fuzzed_audio_packets_give_only_transport_errors(
    magic: bytes, version: int, codec: int, rate: int, seq: int, turn: int, payload: bytes
) -> None:
    packet = struct.pack("!2sBBIIi", magic, version, codec, rate, seq, turn) + payload
    for decoder in (AudioDecoder("pcm16", 24_000), AudioDecoder("opus", 24_000)):
        try:
            header, body = decode_audio_packet(packet)
            assert packet_seconds(header, body) >= 0
            pcm = decoder.decode_payload(header, body)
            assert pcm.dtype == np.float32 and np.all(np.isfinite(pcm))
        except TransportError:
            pass
