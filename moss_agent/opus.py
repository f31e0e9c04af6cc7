"""Raw Opus packets, one per codec frame: the ``opus`` encoding of the speech session protocol.

The speech API (``moss_agent.service.encoding``) muxes libopus output into Ogg for a file; the
session protocol needs no container: each 80 ms frame of agent audio is encoded as one Opus packet
(libopus accepts 80 ms frames since 1.2) and sent in its own binary message, whose header already
says which conversation, turn and frame it is. Both ends go through PyAV's libopus, as the speech
API does.

Opus is stateful, so one encoder and one decoder serve one turn: a turn's frames arrive in order,
and a new turn (the frames of an interrupted one are dropped unread) starts both afresh. Figures on
espeak-ng speech at 24 kHz and 32 kbit/s (2-core CPU): about 275 bytes a packet (pcm_s16le: 3,840),
waveform correlation 0.94-0.99 with the input once aligned, 1.5-2.3 ms to encode a frame (median;
the server does it in a worker thread) and 0.2-0.4 ms to decode one. The decoded audio lags the
input by the encoder's lookahead, 156 samples (6.5 ms) at 24 kHz; nothing trims it, so every
decoded frame stays 1920 samples (a turn's last 6.5 ms, silence after speech, are not carried).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from moss_agent.errors import AudioError, ConfigError
from moss_agent.events import FloatArray

DEFAULT_BITRATE = 32_000  # speech at 24 kHz: wideband-plus quality, 1/12 of pcm_s16le
MIN_BITRATE = 6_000  # libopus's floor
MAX_BITRATE = 128_000  # transparent for mono speech; more buys nothing
_DECODED_RATE = 48_000  # FFmpeg's libopus decoder always returns 48 kHz
_RATES = (8000, 12000, 16000, 24000, 48000)  # Opus's input rates
_FRAME_MS = (10, 20, 40, 60, 80, 100, 120)  # libopus frame durations in whole milliseconds


@functools.cache
def opus_available() -> bool:
    """Whether this machine's FFmpeg has libopus, to encode and to decode."""
    try:
        import av

        av.codec.Codec("libopus", "w")
        av.codec.Codec("libopus", "r")
    except Exception:
        return False
    return True


def check_opus(sample_rate: int, frame_s: float) -> None:
    """ConfigError unless Opus can carry frames of ``frame_s`` at ``sample_rate`` on this machine."""
    if not opus_available():
        raise ConfigError("this machine's FFmpeg (PyAV) has no libopus: use encoding pcm_s16le")
    frame_ms = frame_s * 1000
    if (
        sample_rate not in _RATES
        or round(frame_ms) not in _FRAME_MS
        or abs(frame_ms - round(frame_ms)) > 1e-6
    ):
        raise ConfigError(
            f"Opus cannot carry {frame_ms:g} ms frames at {sample_rate} Hz (rates {_RATES}, "
            f"frames {_FRAME_MS} ms): use encoding pcm_s16le"
        )


class OpusFrameEncoder:
    """Float32 mono frames of ``frame_samples`` -> one Opus packet each (one turn's stream)."""

    def __init__(self, sample_rate: int, frame_samples: int, bitrate: int = DEFAULT_BITRATE) -> None:
        import av

        check_opus(sample_rate, frame_samples / sample_rate)
        if not MIN_BITRATE <= bitrate <= MAX_BITRATE:
            raise ConfigError(f"opus_bitrate must be from {MIN_BITRATE} to {MAX_BITRATE}, got {bitrate}")
        self._av = av
        self.sample_rate = sample_rate
        self.frame_samples = frame_samples
        context: Any = av.CodecContext.create("libopus", "w")
        context.sample_rate = sample_rate
        context.layout = "mono"
        context.format = "flt"
        context.bit_rate = bitrate
        # application "audio" (the default) beat "voip" and "lowdelay" on speech at 24-32 kbit/s:
        # correlation 0.987 against 0.953 and 0.979 at 32 kbit/s
        context.options = {"frame_duration": f"{1000 * frame_samples / sample_rate:g}"}
        context.open()
        self._context = context
        self._pts = 0

    def encode(self, pcm: FloatArray) -> bytes:
        """One frame (shorter ones are padded with silence) -> its packet. Releases the GIL while
        libopus works (1-2 ms for 80 ms at 32 kbit/s), so it may run in a worker thread."""
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if samples.size > self.frame_samples:
            raise AudioError(f"an Opus frame holds {self.frame_samples} samples, got {samples.size}")
        if samples.size < self.frame_samples:
            samples = np.concatenate([samples, np.zeros(self.frame_samples - samples.size, np.float32)])
        frame = self._av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples)[None, :], format="flt", layout="mono"
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += self.frame_samples
        packets = self._context.encode(frame)
        if len(packets) != 1:  # libopus at this frame duration returns one packet per frame
            raise AudioError(f"libopus returned {len(packets)} packets for one frame")
        return bytes(packets[0])


class OpusFrameDecoder:
    """Opus packets of one turn, in order -> float32 mono frames of ``frame_samples``.

    Hostile input is expected: an empty, malformed or wrongly sized packet raises AudioError and
    leaves the decoder usable for the next packet."""

    def __init__(self, sample_rate: int, frame_samples: int) -> None:
        import av

        check_opus(sample_rate, frame_samples / sample_rate)
        self._av = av
        self.frame_samples = frame_samples
        self._step = _DECODED_RATE // sample_rate
        context: Any = av.CodecContext.create("libopus", "r")
        context.sample_rate = _DECODED_RATE
        context.layout = "mono"
        # libopus rather than FFmpeg's own decoder: exactly the packet's duration out of every packet
        context.options = {"request_sample_fmt": "flt"}
        self._context = context

    def decode(self, packet: bytes | memoryview) -> FloatArray:
        data = bytes(packet)
        if not data:  # an empty packet would be read as the end of the stream
            raise AudioError("an empty Opus packet")
        try:
            frames = self._context.decode(self._av.Packet(data))
        except self._av.FFmpegError as exc:
            raise AudioError(f"a malformed Opus packet ({len(data)} bytes): {exc}") from None
        decoded = [frame.to_ndarray().reshape(-1) for frame in frames]
        pcm = np.concatenate(decoded) if decoded else np.zeros(0, np.float32)
        if pcm.size != self.frame_samples * self._step:
            raise AudioError(
                f"an Opus packet of {1000 * pcm.size / _DECODED_RATE:g} ms; each frame is "
                f"{1000 * self.frame_samples * self._step / _DECODED_RATE:g} ms"
            )
        # The encoder's input was at sample_rate, so nothing above its Nyquist frequency was coded:
        # keeping every step-th sample loses nothing (measured: the same fidelity as soxr's filter).
        return pcm[:: self._step].astype(np.float32)
