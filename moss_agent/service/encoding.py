"""Streaming audio encoders for the speech API: float32 mono chunks in, bytes ready to send out.

``pcm`` is raw 16-bit little-endian samples, ``wav`` the same after a header whose sizes are the
streaming placeholder 0xFFFFFFFF (the length is unknown when the header leaves), the others go
through PyAV (FFmpeg) into the containers OpenAI uses: ``mp3`` (MPEG layer III), ``opus`` (Ogg
Opus), ``aac`` (ADTS), ``flac`` (native FLAC). :func:`available_formats` says which this machine's
FFmpeg can encode. An encoder writes to no seekable file, so nothing is rewritten at the end: what
it returns can be sent at once. A streamed FLAC therefore declares its length as unknown (0 in
STREAMINFO, as the FLAC format allows for streams); some readers (libsndfile) cannot read that.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from typing import Any

import numpy as np

from moss_agent.audio import float_to_pcm16
from moss_agent.errors import AudioError

CONTENT_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
}
# format -> (FFmpeg container, encoder, bit rate or None)
_PYAV = {
    "mp3": ("mp3", "libmp3lame", 64_000),
    "opus": ("ogg", "libopus", 32_000),
    "aac": ("adts", "aac", 64_000),
    "flac": ("flac", "flac", None),
}
# Ogg holds its pages for up to a second by default; a page per 20 ms lets each chunk leave at once.
_MUXER_OPTIONS = {"ogg": {"page_duration": "20000"}}
FORMATS = ("pcm", "wav", *_PYAV)


class StreamEncoder:
    """``encode(pcm)`` -> bytes ready now (maybe none); ``finish()`` -> the rest."""

    content_type = "application/octet-stream"

    def encode(self, pcm: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class PcmEncoder(StreamEncoder):
    content_type = CONTENT_TYPES["pcm"]

    def encode(self, pcm: np.ndarray) -> bytes:
        return float_to_pcm16(pcm).astype("<i2", copy=False).tobytes()


class WavEncoder(PcmEncoder):
    content_type = CONTENT_TYPES["wav"]

    def __init__(self, sample_rate: int) -> None:
        self._header: bytes | None = wav_stream_header(sample_rate)

    def encode(self, pcm: np.ndarray) -> bytes:
        header, self._header = self._header or b"", None
        return header + super().encode(pcm)

    def finish(self) -> bytes:
        header, self._header = self._header or b"", None
        return header


def wav_stream_header(sample_rate: int, channels: int = 1) -> bytes:
    """A 44-byte PCM16 wav header with placeholder sizes, for a stream of unknown length."""
    unknown = 0xFFFFFFFF
    block = channels * 2
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", unknown, b"WAVE", b"fmt ", 16, 1, channels, sample_rate, sample_rate * block, block, 16,
        b"data", unknown,
    )  # fmt: skip


class _Sink:
    """A write-only file for PyAV: not seekable, so muxers never go back to rewrite a header."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class PyAVEncoder(StreamEncoder):
    def __init__(self, response_format: str, sample_rate: int) -> None:
        import av

        container_format, codec, bit_rate = _PYAV[response_format]
        self.content_type = CONTENT_TYPES[response_format]
        self._av = av
        self._rate = sample_rate
        self._sink = _Sink()
        try:
            options = _MUXER_OPTIONS.get(container_format, {})
            self._container = av.open(self._sink, mode="w", format=container_format, options=options)
            self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
            if bit_rate is not None:
                self._stream.bit_rate = bit_rate
        except Exception as exc:  # FFmpeg builds differ: say which format, not a raw av error
            raise AudioError(f"this server's FFmpeg cannot encode {response_format}: {exc}") from exc
        self._pts = 0
        self._finished = False

    def encode(self, pcm: np.ndarray) -> bytes:
        samples = np.ascontiguousarray(pcm, dtype=np.float32)
        if samples.size == 0:
            return b""
        frame = self._av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._pts
        self._pts += samples.size
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        if not self._finished:
            self._finished = True
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        return self._sink.take()

    def close(self) -> None:
        """Release FFmpeg's state without finishing the stream (the client went away)."""
        if not self._finished:
            self._finished = True
            # closing a half-written stream may complain; nothing is sent any more
            with contextlib.suppress(Exception):
                self._container.close()


@functools.cache
def available_formats() -> tuple[str, ...]:
    """The response formats this machine can encode (pcm and wav always; the rest if FFmpeg has them)."""
    found = ["pcm", "wav"]
    try:
        import av
    except ImportError:
        return tuple(found)
    for name, (container_format, codec, _rate) in _PYAV.items():
        try:
            av.codec.Codec(codec, "w")
        except Exception:
            continue
        if container_format in av.formats_available:
            found.append(name)
    return tuple(found)


@functools.cache
def tempo_available() -> bool:
    """Whether this machine's FFmpeg has the atempo filter ``speed`` needs."""
    try:
        import av.filter
    except ImportError:
        return False
    return "atempo" in av.filter.filters_available


def make_encoder(response_format: str, sample_rate: int) -> StreamEncoder:
    if response_format == "pcm":
        return PcmEncoder()
    if response_format == "wav":
        return WavEncoder(sample_rate)
    if response_format in _PYAV:
        return PyAVEncoder(response_format, sample_rate)
    raise AudioError(f"unknown response format {response_format!r}; use one of {', '.join(FORMATS)}")


class Tempo:
    """Change the tempo, not the pitch, of a float32 mono stream: FFmpeg's ``atempo`` (WSOLA) through
    PyAV, chained so each stage stays within 0.5x-2x, where it sounds best. ``speed`` 2.0 gives half
    the samples. The output trails the input by the filter's window (tens of ms); ``flush`` ends it."""

    def __init__(self, speed: float, sample_rate: int) -> None:
        import av
        import av.filter

        if not 0.25 <= speed <= 4.0:
            raise AudioError(f"speed must be from 0.25 to 4.0, got {speed}")
        self._av = av
        self._rate = sample_rate
        stages: list[float] = []
        rest = speed
        while rest > 2.0:
            stages.append(2.0)
            rest /= 2.0
        while rest < 0.5:
            stages.append(0.5)
            rest /= 0.5
        stages.append(rest)
        graph = av.filter.Graph()
        node = graph.add_abuffer(
            format="flt", sample_rate=sample_rate, layout="mono", time_base=f"1/{sample_rate}"
        )
        for factor in stages:
            stage = graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        sink = graph.add("abuffersink")
        node.link_to(sink)
        graph.configure()
        self._graph = graph
        self._pts = 0

    def process(self, pcm: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(pcm, dtype=np.float32)
        if samples.size:
            frame = self._av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
            frame.sample_rate = self._rate
            frame.pts = self._pts
            self._pts += samples.size
            self._graph.push(frame)
        return self._drain()

    def flush(self) -> np.ndarray:
        self._graph.push(None)
        return self._drain()

    def _drain(self) -> np.ndarray:
        out: list[np.ndarray] = []
        while True:
            try:
                frame = self._graph.pull()
            except (self._av.BlockingIOError, self._av.EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros(0, np.float32)
