"""The MQTT wire format: topic scheme, audio packet header, Opus/PCM16 codecs, JSON messages.

See docs/mqtt.md for the scheme in prose. Everything lives under ``<root>`` (default ``moss/v1``):

=============================================  ===========  =========================================
topic                                           direction    payload
=============================================  ===========  =========================================
``<root>/c/<client>/request``                   client->any  JSON session request (shared subscription)
``<root>/c/<client>/event``                     worker->cl.  JSON events not tied to a session (errors)
``<root>/c/<client>/status``                    client will  JSON ``{"online": false, "instance"}`` (died)
``<root>/c/<client>/s/<session>/up/audio``      client->wk.  audio packet (header + Opus or PCM16)
``<root>/c/<client>/s/<session>/up/control``    client->wk.  JSON control (interrupt, text, close)
``<root>/c/<client>/s/<session>/down/audio``    worker->cl.  audio packet
``<root>/c/<client>/s/<session>/down/event``    worker->cl.  JSON events (session.started, error...)
``<root>/w/<worker>/status``                    worker will  JSON ``{"worker", "online"}``
=============================================  ===========  =========================================

Everything a client may touch is under ``<root>/c/<its username>/``, so per-device broker roles
isolate clients (docs/mosquitto/); workers read ``$share/<group>/<root>/c/+/request``.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moss_agent._optional import require
from moss_agent.audio import StreamResampler, float_to_pcm16, pcm16_to_float
from moss_agent.errors import ConfigError, TransportError
from moss_agent.events import FloatArray
from moss_agent.transports.capture import av_frame_to_mono

DEFAULT_ROOT = "moss/v1"
CODECS = ("opus", "pcm16")
OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)
FRAME_S = 0.02
MAX_AUDIO_BYTES = 65_536
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAGIC = b"MA"
_VERSION = 1
_HEADER = struct.Struct("!2sBBIIi")
HEADER_BYTES = _HEADER.size
_CODEC_IDS = {"pcm16": 0, "opus": 1}
_CODEC_NAMES = {v: k for k, v in _CODEC_IDS.items()}

JsonDict = dict[str, Any]


def check_name(value: object, what: str) -> str:
    """Client, session and worker ids become topic levels: letters, digits, ``_ . -``; 1-64 chars."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise TransportError(f"{what} {value!r} is not valid: use 1-64 letters, digits, '_', '.' or '-'")
    return value


@dataclass(frozen=True)
class Topics:
    """The topic scheme under one root."""

    root: str = DEFAULT_ROOT

    def request(self, client: str) -> str:
        return f"{self.root}/c/{client}/request"

    def shared_requests(self, group: str) -> str:
        return f"$share/{group}/{self.root}/c/+/request"

    def client_event(self, client: str) -> str:
        return f"{self.root}/c/{client}/event"

    def client_status(self, client: str) -> str:
        return f"{self.root}/c/{client}/status"

    def session(self, client: str, session: str) -> str:
        return f"{self.root}/c/{client}/s/{session}"

    def up_audio(self, client: str, session: str) -> str:
        return f"{self.session(client, session)}/up/audio"

    def up_control(self, client: str, session: str) -> str:
        return f"{self.session(client, session)}/up/control"

    def up_filter(self, client: str, session: str) -> str:
        return f"{self.session(client, session)}/up/+"

    def down_audio(self, client: str, session: str) -> str:
        return f"{self.session(client, session)}/down/audio"

    def down_event(self, client: str, session: str) -> str:
        return f"{self.session(client, session)}/down/event"

    def down_filter(self, client: str) -> str:
        return f"{self.root}/c/{client}/s/+/down/+"

    def worker_status(self, worker: str) -> str:
        return f"{self.root}/w/{worker}/status"

    def all_worker_status(self) -> str:
        return f"{self.root}/w/+/status"

    def parse(self, topic: str) -> tuple[str, ...]:
        """The levels after the root, e.g. ('c', 'dev1', 's', 'abc', 'up', 'audio'); () if foreign."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return ()
        return tuple(topic[len(prefix) :].split("/"))


@dataclass(frozen=True)
class AudioHeader:
    """The 16-byte header in front of every audio payload (network byte order).

    ``magic 'MA' | version u8 | codec u8 (0 pcm16, 1 opus) | sample_rate u32 | seq u32 | turn_id i32``
    """

    codec: str
    sample_rate: int
    seq: int
    turn_id: int = -1


def encode_audio_packet(header: AudioHeader, payload: bytes) -> bytes:
    return (
        _HEADER.pack(
            _MAGIC, _VERSION, _CODEC_IDS[header.codec], header.sample_rate, header.seq, header.turn_id
        )
        + payload
    )


def decode_audio_packet(data: bytes) -> tuple[AudioHeader, bytes]:
    """Split and validate a packet; TransportError says what is wrong with a malformed one."""
    if len(data) < HEADER_BYTES:
        raise TransportError(
            f"audio packet of {len(data)} bytes is shorter than the {HEADER_BYTES}-byte header"
        )
    if len(data) > MAX_AUDIO_BYTES:
        raise TransportError(f"audio packet of {len(data)} bytes is larger than {MAX_AUDIO_BYTES}")
    magic, version, codec_id, rate, seq, turn_id = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise TransportError("audio packet has a wrong magic/version; expected b'MA' version 1")
    if codec_id not in _CODEC_NAMES:
        raise TransportError(f"audio packet has unknown codec id {codec_id}; expected 0 (pcm16) or 1 (opus)")
    payload = data[HEADER_BYTES:]
    codec = _CODEC_NAMES[codec_id]
    if codec == "pcm16" and len(payload) % 2:
        raise TransportError("a pcm16 payload must have an even number of bytes")
    return AudioHeader(codec, rate, seq, turn_id), payload


def check_audio_format(codec: object, sample_rate: object) -> tuple[str, int]:
    if codec not in CODECS:
        raise TransportError(f"codec {codec!r} is not supported; use one of {list(CODECS)}")
    if (
        not isinstance(sample_rate, int)
        or isinstance(sample_rate, bool)
        or not 8_000 <= sample_rate <= 48_000
    ):
        raise TransportError(f"sample_rate {sample_rate!r} must be an integer from 8000 to 48000")
    if codec == "opus" and sample_rate not in OPUS_RATES:
        raise TransportError(f"opus needs a sample_rate in {list(OPUS_RATES)}, got {sample_rate}")
    return str(codec), sample_rate


class AudioEncoder:
    """Mono float32 audio -> 20 ms packets (Opus packet or PCM16 bytes) with sequence numbers."""

    def __init__(self, codec: str, sample_rate: int, *, bitrate: int = 24_000) -> None:
        self.codec, self.sample_rate = check_audio_format(codec, sample_rate)
        self._frame = round(sample_rate * FRAME_S)
        self._pending = np.zeros(0, dtype=np.float32)
        self._seq = 0
        self._pts = 0
        self._opus: Any = None
        if self.codec == "opus":
            av = require("av", "mqtt")
            context = av.CodecContext.create("libopus", "w")
            context.sample_rate = sample_rate
            context.layout = "mono"
            context.format = "s16"
            context.bit_rate = bitrate
            context.open()
            self._opus = context

    def encode(self, pcm: FloatArray, turn_id: int = -1) -> list[bytes]:
        """pcm [n] float32 at ``sample_rate`` -> complete packets (a partial frame waits for more)."""
        self._pending = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32)])
        whole = len(self._pending) // self._frame * self._frame
        frames, self._pending = self._pending[:whole], self._pending[whole:]
        return [self._packet(frames[i : i + self._frame], turn_id) for i in range(0, whole, self._frame)]

    def flush(self, turn_id: int = -1) -> list[bytes]:
        """Pad the partial frame with silence and send it."""
        if not len(self._pending):
            return []
        padded = np.zeros(self._frame, dtype=np.float32)
        padded[: len(self._pending)] = self._pending
        self._pending = np.zeros(0, dtype=np.float32)
        return [self._packet(padded, turn_id)]

    def _packet(self, frame: FloatArray, turn_id: int) -> bytes:
        pcm16 = float_to_pcm16(frame)
        if self._opus is None:
            payload = pcm16.astype("<i2").tobytes()
        else:
            av = require("av", "mqtt")
            audio = av.AudioFrame.from_ndarray(pcm16.reshape(1, -1), format="s16", layout="mono")
            audio.sample_rate = self.sample_rate
            audio.pts = self._pts
            self._pts += len(frame)
            payload = b"".join(bytes(p) for p in self._opus.encode(audio))
        header = AudioHeader(self.codec, self.sample_rate, self._seq, turn_id)
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return encode_audio_packet(header, payload)


class AudioDecoder:
    """Audio packets -> mono float32 at ``sample_rate``; drops duplicates and late (reordered) packets."""

    def __init__(self, codec: str, sample_rate: int) -> None:
        self.codec, self.sample_rate = check_audio_format(codec, sample_rate)
        self._last_seq: int | None = None
        self.lost_packets = 0
        self._opus: Any = None
        self._resampler: StreamResampler | None = None
        if self.codec == "opus":
            self._opus = require("av", "mqtt").CodecContext.create("opus", "r")

    def decode(self, data: bytes) -> tuple[FloatArray, AudioHeader]:
        """One packet -> (pcm [n] float32, header); pcm is empty for a duplicate or late packet."""
        header, payload = decode_audio_packet(data)
        return self.decode_payload(header, payload), header

    def decode_payload(self, header: AudioHeader, payload: bytes) -> FloatArray:
        """The payload of a packet already split by ``decode_audio_packet`` -> pcm [n] float32."""
        if header.codec != self.codec or header.sample_rate != self.sample_rate:
            raise TransportError(
                f"audio packet is {header.codec}/{header.sample_rate} Hz but the session uses "
                f"{self.codec}/{self.sample_rate} Hz"
            )
        empty = np.zeros(0, dtype=np.float32)
        if self._last_seq is not None:
            ahead = (header.seq - self._last_seq) & 0xFFFFFFFF
            if ahead == 0 or ahead > 0x7FFFFFFF:
                return empty
            self.lost_packets += ahead - 1
        self._last_seq = header.seq
        if self._opus is None:
            return pcm16_to_float(payload)
        return self._decode_opus(payload)

    def _decode_opus(self, payload: bytes) -> FloatArray:
        av = require("av", "mqtt")
        try:
            frames = self._opus.decode(av.Packet(payload))
        except (av.error.FFmpegError, ValueError) as exc:
            raise TransportError(f"the Opus packet could not be decoded: {exc}") from None
        parts = []
        for frame in frames:
            mono = av_frame_to_mono(frame)
            if frame.sample_rate != self.sample_rate:
                # FFmpeg's Opus decoder always outputs 48 kHz.
                if self._resampler is None:
                    self._resampler = StreamResampler(frame.sample_rate, self.sample_rate)
                mono = self._resampler.process(mono)
            parts.append(np.asarray(mono, dtype=np.float32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def encode_json(message: JsonDict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SessionRequest:
    session: str
    codec: str
    sample_rate: int
    instance: str | None = None
    """The requesting client connection's id: its last will ends only its own sessions."""


def parse_session_request(message: JsonDict) -> SessionRequest:
    """``{"type": "session.request", "session", "codec", "sample_rate", "instance"?}``."""
    if message.get("type") != "session.request":
        raise TransportError("a request must have type 'session.request'")
    session = check_name(message.get("session"), "session id")
    codec, rate = check_audio_format(message.get("codec", "opus"), message.get("sample_rate", 24_000))
    instance = message.get("instance")
    return SessionRequest(
        session, codec, rate, None if instance is None else check_name(instance, "instance id")
    )


def parse_client_status(message: JsonDict) -> tuple[bool, str | None]:
    """A device's ``status`` (its last will): ``{"online": bool, "instance"?: id}`` -> (online, instance)."""
    online = message.get("online")
    if not isinstance(online, bool):
        raise TransportError("a client status needs a boolean 'online' field")
    instance = message.get("instance")
    return online, None if instance is None else check_name(instance, "instance id")


_OPUS_FRAME_S = (0.010, 0.020, 0.040, 0.060)  # SILK configs 0-11, by config % 4
_CELT_FRAME_S = (0.0025, 0.005, 0.010, 0.020)  # CELT configs 16-31


def packet_seconds(header: AudioHeader, payload: bytes) -> float:
    """How much audio a packet claims to carry, without decoding it (RFC 6716 3.1 for Opus).

    Rate limits count this, so a sender cannot pass six times the audio in 120 ms Opus packets.
    A malformed Opus packet counts as one 20 ms frame; its decoder rejects it afterwards.
    """
    if header.codec == "pcm16":
        return len(payload) / 2 / max(header.sample_rate, 1)
    if not payload:
        return FRAME_S
    config, code = payload[0] >> 3, payload[0] & 3
    if config < 12:
        frame_s = _OPUS_FRAME_S[config % 4]
    elif config < 16:
        frame_s = 0.010 if config % 2 == 0 else 0.020
    else:
        frame_s = _CELT_FRAME_S[config % 4]
    frames = 1 if code == 0 else 2 if code in (1, 2) else max(1, payload[1] & 0x3F if len(payload) > 1 else 1)
    return min(frame_s * frames, 0.120)


class TokenBucket:
    """At most ``rate`` units per second on average and ``burst`` at once (units: audio seconds, events)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ConfigError(f"a rate limit needs a positive rate and burst, got {rate} and {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def admit(self, cost: float = 1.0) -> bool:
        """Take ``cost`` if available; False (nothing taken) when over the limit."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True

    @property
    def full(self) -> bool:
        """True once the sender has stayed under the rate long enough to refill the whole burst."""
        return self._tokens + (self._clock() - self._at) * self.rate >= self.burst


def check_topic_root(root: str) -> str:
    if not root or any(c in root for c in "+#") or root.startswith("/") or root.endswith("/"):
        raise ConfigError(f"topic root {root!r} must be non-empty, without wildcards or outer slashes")
    return root
