"""The streaming-text speech session protocol, shared by the server (``moss_agent.service.sessions``)
and the client (``moss_agent.client``). ``docs/speech-protocol.md`` describes it for other clients.

Here: the version, message names, close codes, error codes and how they map onto our exception
tree, the binary frame header, the audio encodings (PCM here, Opus in ``moss_agent.opus``), and
checked readers for the fields of decoded JSON messages. No torch, no aiohttp: both ends import
this module.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from moss_agent.audio import float_to_pcm16, pcm16_to_float
from moss_agent.errors import (
    AudioError,
    ConfigError,
    EngineError,
    MossError,
    OverloadError,
    SessionClosedError,
    TransportError,
)
from moss_agent.events import FloatArray

PROTOCOL = 1
PATH = "/v1/speech/sessions"

# -- binary frames -------------------------------------------------------------------------------
# 16-byte little-endian header, then the samples:
#   version u8 | kind u8 | encoding u8 | reserved u8 | a u32 | b u32 | c u32
# kind AUDIO (server -> client): a = conversation, b = turn, c = frame index
# kind UPLOAD (client -> server): a = request id, b = chunk number (0, 1, ...), c = 0
HEADER = struct.Struct("<BBBBIII")
KIND_AUDIO = 1
KIND_UPLOAD = 2
U32_MAX = 2**32 - 1

# opus: one Opus packet per agent-audio frame (moss_agent.opus); its conversations upload pcm_s16le
ENCODINGS = {"pcm_s16le": 1, "pcm_f32le": 2, "opus": 3}
_ENCODING_NAMES = {code: name for name, code in ENCODINGS.items()}
_SAMPLE_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4}

# -- close codes ---------------------------------------------------------------------------------
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_POLICY = 1008  # over the message rate
CLOSE_TOO_BIG = 1009  # a message over max_message_bytes
CLOSE_INTERNAL = 1011
CLOSE_BUSY = 1013  # "try again later": the server holds its maximum of sockets

# -- error codes -> exceptions -------------------------------------------------------------------
_ERRORS: dict[str, type[MossError]] = {
    "bad_message": TransportError,  # not valid JSON, a missing or wrong field, an unknown type
    "busy": OverloadError,  # no engine slot free (retry_after_s says when to retry)
    "too_many": OverloadError,  # a per-socket limit: conversations, uploads, queued text
    "invalid": ConfigError,  # a value over its limit or refused (unknown voice, upload too long...)
    "invalid_audio": AudioError,
    "closed": SessionClosedError,  # the conversation or the turn was already closed
    "engine": EngineError,  # the engine failed or refused (see the message)
    "internal": EngineError,  # a bug in the server; it was logged there
}


def error_code(exc: BaseException) -> str:
    """The protocol's error code for an exception raised on the server (``protocol_code`` if it has one)."""
    code = getattr(exc, "protocol_code", None)
    if isinstance(code, str) and code in _ERRORS:
        return code
    if isinstance(exc, OverloadError):
        return "busy"
    if isinstance(exc, SessionClosedError):
        return "closed"
    if isinstance(exc, AudioError):
        return "invalid_audio"
    if isinstance(exc, ConfigError):
        return "invalid"
    if isinstance(exc, TransportError):
        return "bad_message"
    if isinstance(exc, MossError):
        return "engine"
    return "internal"


def remote_error(code: str, message: str, retry_after_s: float | None = None) -> MossError:
    """The exception a client raises for the server's error message: the class the in-process engine
    would raise, with the protocol's ``code`` and ``retry_after_s`` (for "busy") as attributes."""
    error = _ERRORS.get(code, EngineError)(message)
    error.code = code  # type: ignore[attr-defined]
    error.retry_after_s = retry_after_s  # type: ignore[attr-defined]
    return error


# -- binary helpers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded binary message."""

    kind: int
    encoding: str
    a: int
    b: int
    c: int
    payload: memoryview


def pack_frame(kind: int, encoding: str, a: int, b: int, c: int, payload: bytes) -> bytes:
    return HEADER.pack(PROTOCOL, kind, ENCODINGS[encoding], 0, a, b, c) + payload


def unpack_frame(data: bytes) -> Frame:
    """Header and samples of a binary message; TransportError when it is not a valid frame."""
    if len(data) < HEADER.size:
        raise TransportError(
            f"binary message of {len(data)} bytes is shorter than the {HEADER.size}-byte header"
        )
    version, kind, code, _reserved, a, b, c = HEADER.unpack_from(data)
    if version != PROTOCOL:
        raise TransportError(f"binary message of protocol version {version}; this side speaks {PROTOCOL}")
    encoding = _ENCODING_NAMES.get(code)
    if encoding is None:
        raise TransportError(f"binary message with unknown encoding {code}")
    payload = memoryview(data)[HEADER.size :]
    if encoding != "opus" and len(payload) % _SAMPLE_BYTES[encoding]:  # Opus is checked by its decoder
        raise TransportError(f"{encoding} payload of {len(payload)} bytes is not whole samples")
    return Frame(kind, encoding, a, b, c, payload)


def sample_bytes(encoding: str) -> int:
    return _SAMPLE_BYTES[encoding]


def upload_encoding(encoding: str) -> str:
    """The encoding of a conversation's uploads (voice, user audio): its own, pcm_s16le for opus."""
    return "pcm_s16le" if encoding == "opus" else encoding


def encodings_available() -> list[str]:
    """The encodings this machine can serve (opus needs PyAV's libopus), for ``hello``."""
    from moss_agent.opus import opus_available

    return sorted(name for name in ENCODINGS if name != "opus" or opus_available())


def encode_pcm(pcm: FloatArray, encoding: str) -> bytes:
    """Float32 mono samples -> bytes. pcm_s16le: ``moss_agent.audio.float_to_pcm16`` (x * 32768,
    rounded, clipped), the same as the speech API's ``pcm``."""
    samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if encoding == "pcm_f32le":
        return samples.astype("<f4", copy=False).tobytes()
    return float_to_pcm16(samples).astype("<i2", copy=False).tobytes()


def decode_pcm(data: bytes | memoryview, encoding: str) -> FloatArray:
    """Bytes -> float32 mono samples (a fresh, writable array); pcm_s16le divides by 32768."""
    if encoding == "pcm_f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    return pcm16_to_float(data).astype(np.float32, copy=False)


def quantize(pcm: FloatArray, encoding: str) -> FloatArray:
    """What ``pcm`` becomes after a trip through ``encoding``."""
    return decode_pcm(encode_pcm(pcm, encoding), encoding)


# -- checked field readers -----------------------------------------------------------------------


def field_str(
    message: dict[str, Any], key: str, *, optional: bool = False, max_chars: int | None = None
) -> Any:
    value = message.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TransportError(f"{key!r} must be a string")
    if max_chars is not None and len(value) > max_chars:
        raise ConfigError(f"{key!r} has {len(value)} characters; at most {max_chars} are accepted")
    return value


def field_int(
    message: dict[str, Any], key: str, *, optional: bool = False, low: int = 0, high: int = U32_MAX
) -> Any:
    value = message.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TransportError(f"{key!r} must be an integer in [{low}, {high}]")
    return value


def field_float(message: dict[str, Any], key: str, *, optional: bool = False, low: float = 0.0) -> Any:
    value = message.get(key)
    if value is None and optional:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < low
    ):
        raise TransportError(f"{key!r} must be a finite number >= {low}")
    return float(value)


def field_encoding(message: dict[str, Any], key: str = "encoding", default: str = "pcm_s16le") -> str:
    value = message.get(key, default)
    if value not in ENCODINGS:
        raise TransportError(f"{key!r} must be one of {sorted(ENCODINGS)}")
    return str(value)


def field_opus_bitrate(message: dict[str, Any], encoding: str, sample_rate: int, frame_s: float) -> int:
    """``opus_bitrate`` of an ``open`` (bit/s, default 32000); checks Opus can serve the conversation."""
    from moss_agent import opus

    if encoding != "opus":
        return opus.DEFAULT_BITRATE
    opus.check_opus(sample_rate, frame_s)
    bitrate = field_int(message, "opus_bitrate", optional=True, low=opus.MIN_BITRATE, high=opus.MAX_BITRATE)
    return opus.DEFAULT_BITRATE if bitrate is None else int(bitrate)


def field_object(message: dict[str, Any], key: str, *, optional: bool = True) -> Any:
    value = message.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise TransportError(f"{key!r} must be an object")
    return value
