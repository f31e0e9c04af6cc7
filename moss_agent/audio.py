"""Audio I/O for the whole package: decode files and network bytes, resample, convert sample formats.

numpy only (soundfile, PyAV and soxr underneath), so torch-free code can use it. Every function returns
float32 mono arrays of shape [T] and raises :class:`moss_agent.errors.AudioError` for bad input; no raw
library exception escapes.

soundfile (libsndfile) reads wav, flac, ogg and mp3; everything else (m4a/AAC, opus in webm, ...) goes
through PyAV. Resampling is soxr in high quality; :class:`StreamResampler` gives the same samples for
20 ms chunks as :func:`resample` gives for the whole signal.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path
from typing import IO, Literal

import numpy as np
import soundfile as sf
import soxr

from moss_agent.errors import AudioError
from moss_agent.limiter import limit as limit_peaks
from moss_agent.limiter import log_limited

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_AUDIO_BYTES",
    "MAX_AUDIO_SECONDS",
    "AudioTooLong",
    "StreamResampler",
    "decode_audio_bytes",
    "float_to_pcm16",
    "load_audio",
    "pcm16_to_float",
    "resample",
    "wav_bytes",
    "write_wav",
]

PathLike = str | os.PathLike[str]
SampleFormat = Literal["pcm16", "float32"]
ResampleQuality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]

_PCM16_SCALE = 32768.0
# An mp3's declared length comes from its Xing/LAME header or, without one, an estimate from the
# file size; allow a couple of MPEG frames (1152 samples each) or 2 % before calling it truncated.
_MP3_LENGTH_SLACK_FRAMES = 2 * 1152
_MP3_LENGTH_SLACK_FRACTION = 0.02
# AAC encoder priming (2112 samples) and container rounding make a decoded m4a a little shorter than
# its declared duration; only a larger shortfall means the file was cut.
_DECLARED_DURATION_SLACK_S = 0.1
_DECLARED_DURATION_SLACK_FRACTION = 0.02
# A wav data size this large (about 2 GiB) is a streaming placeholder, not a real length.
_WAV_PLACEHOLDER_SIZE = 0x7FFF0000
# Sample sizes a wav header may state, per format tag (PCM, IEEE float); anything else makes
# libsndfile read the data with the wrong stride (a "7-bit" wav loads twice the samples).
_WAV_PCM, _WAV_FLOAT, _WAV_EXTENSIBLE = 1, 3, 0xFFFE
_WAV_BITS = {_WAV_PCM: (8, 16, 24, 32), _WAV_FLOAT: (32, 64)}
_WAV_MAX_CHUNKS = 1024  # chunks walked looking for fmt and data; real files have a handful

# Limits on one decoded file or upload. A voice reference, a user's utterance or a continuation is
# seconds to minutes long; longer input is a mistake (or an attack on memory and CPU). Callers may
# pass their own ``max_seconds`` (None: no duration limit).
MAX_AUDIO_SECONDS = 600.0
MAX_AUDIO_BYTES = 1 << 30
# Float audio lives in [-1, 1]; overshoot to +12 dBFS (decoded mp3/aac, loud masters) is kept, but
# peaks beyond that are unscaled integer samples or garbage that would drive the codec far off its
# training range.
MAX_FLOAT_PEAK = 4.0


class AudioTooLong(AudioError):
    """The audio is longer than the caller's limit; ``seconds`` (as declared or decoded so far) and
    ``limit`` say by how much."""

    def __init__(self, message: str, *, seconds: float, limit: float) -> None:
        super().__init__(message)
        self.seconds = seconds
        self.limit = limit


# --------------------------------------------------------------------------------------------------
# sample formats


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16, scaled by 32768, rounded to nearest and clipped.

    The scale matches :func:`pcm16_to_float`, so int16 -> float -> int16 is exact for every value.
    x: [...] float; returns int16 of the same shape. Raises AudioError on NaN/inf.
    """
    samples = np.asarray(x)
    if samples.dtype.kind != "f":
        raise AudioError(f"float_to_pcm16 needs float samples, got dtype {samples.dtype}")
    _check_finite(samples, "samples passed to float_to_pcm16")
    scaled = np.rint(samples.astype(np.float64) * _PCM16_SCALE)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def pcm16_to_float(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Little-endian PCM16 bytes or an int16 array -> float32 in [-1, 1) (divided by 32768).

    Returns an array of the same shape as an int16 input, or [T] for bytes.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) % 2:
            raise AudioError(f"PCM16 data must have an even number of bytes, got {len(raw)}")
        samples = np.frombuffer(raw, dtype="<i2")
    else:
        samples = np.asarray(data)
        if samples.dtype != np.int16:
            raise AudioError(f"pcm16_to_float needs int16 samples or bytes, got dtype {samples.dtype}")
    return (samples.astype(np.float32) / np.float32(_PCM16_SCALE)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# resampling


def resample(
    x: np.ndarray, from_rate: float, to_rate: float, *, quality: ResampleQuality = "HQ"
) -> np.ndarray:
    """Resample float32 mono audio x: [T] -> [round(T * to_rate / from_rate)] with soxr."""
    _check_rate(from_rate, "from_rate")
    _check_rate(to_rate, "to_rate")
    samples = as_mono_float(x, "audio passed to resample")
    if from_rate == to_rate or samples.size == 0:
        return samples.copy()
    return np.asarray(soxr.resample(samples, from_rate, to_rate, quality=quality), dtype=np.float32)


class StreamResampler:
    """Resample a stream chunk by chunk (e.g. 20 ms frames) with no seams between chunks.

    ``process(chunk)`` returns whatever output is ready (it may be empty at first: the filter has a
    few milliseconds of delay); ``flush()`` returns the tail once the stream ends. The concatenated
    output equals :func:`resample` on the whole signal. After ``flush()`` the resampler starts a new
    stream. Not thread-safe: one stream per instance.
    """

    def __init__(self, from_rate: float, to_rate: float, *, quality: ResampleQuality = "HQ") -> None:
        _check_rate(from_rate, "from_rate")
        _check_rate(to_rate, "to_rate")
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._passthrough = from_rate == to_rate
        self._stream = (
            None
            if self._passthrough
            else soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality=quality)
        )

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """chunk: [n] float32 mono -> [m] float32, m about n * to_rate / from_rate over time."""
        samples = as_mono_float(chunk, "chunk passed to StreamResampler.process")
        if self._stream is None:
            return samples.copy()
        return np.asarray(self._stream.resample_chunk(samples, last=False), dtype=np.float32)

    def flush(self) -> np.ndarray:
        """End the stream: return the delayed tail and reset for a new stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = np.asarray(
            self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True), dtype=np.float32
        )
        self._stream.clear()
        return tail

    def reset(self) -> None:
        """Drop buffered input (e.g. after an interruption) without returning it."""
        if self._stream is not None:
            self._stream.clear()


# --------------------------------------------------------------------------------------------------
# decoding


def load_audio(
    path: PathLike, sample_rate: int = 24000, *, max_seconds: float | None = MAX_AUDIO_SECONDS
) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate``: returns [T].

    wav (PCM 8/16/24/32-bit, float 32/64), flac, ogg and mp3 go through soundfile; m4a/AAC and
    anything else FFmpeg knows through PyAV. Channels are averaged; the rate is converted with soxr
    (HQ). Raises AudioError for a missing file, a directory, an empty, truncated or unreadable file,
    a wav header that contradicts itself, NaN/inf samples, float samples beyond ±MAX_FLOAT_PEAK, no
    samples at all, or a file over MAX_AUDIO_BYTES; AudioTooLong (an AudioError) for more than
    ``max_seconds`` of audio, found from the header where it says, before decoding.
    """
    _check_rate(sample_rate, "sample_rate")
    file = Path(path)
    label = str(file)
    if not file.exists():
        raise AudioError(f"audio file {label} does not exist; check the path")
    if file.is_dir():
        raise AudioError(f"{label} is a directory, not an audio file")
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise AudioError(f"cannot read audio file {label}: {exc}") from exc
    if size == 0:
        raise AudioError(f"audio file {label} is empty (0 bytes)")
    _check_size(size, label)
    try:
        with open(file, "rb") as handle:
            samples, native_rate = _decode(handle, label, size, max_seconds)
    except OSError as exc:
        raise AudioError(f"cannot read audio file {label}: {exc}") from exc
    return _finish(samples, native_rate, sample_rate, label)


def decode_audio_bytes(
    data: bytes,
    sample_rate: int = 24000,
    *,
    name: str = "audio data",
    max_seconds: float | None = MAX_AUDIO_SECONDS,
) -> np.ndarray:
    """Decode an encoded audio file held in memory (e.g. an upload) to float32 mono [T].

    Same formats, limits and errors as :func:`load_audio`; ``name`` labels the data in error messages.
    """
    _check_rate(sample_rate, "sample_rate")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AudioError(f"{name}: expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if not raw:
        raise AudioError(f"{name} is empty (0 bytes)")
    _check_size(len(raw), name)
    samples, native_rate = _decode(io.BytesIO(raw), name, len(raw), max_seconds)
    return _finish(samples, native_rate, sample_rate, name)


def _decode(handle: IO[bytes], label: str, size: int, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode a seekable binary stream -> (samples [T, C] float32, native rate)."""
    _check_wav_header(handle, label, size)
    handle.seek(0)
    try:
        return _decode_soundfile(handle, label, max_seconds)
    except _NotForSoundfile as sf_failure:
        handle.seek(0)
        try:
            return _decode_pyav(handle, label, max_seconds)
        except _PyAVFailure as av_failure:
            raise AudioError(
                f"cannot decode {label}: not a recognised audio format, or the file is corrupt "
                f"(soundfile: {sf_failure}; FFmpeg: {av_failure})"
            ) from None


class _NotForSoundfile(Exception):
    """libsndfile cannot open this data; PyAV gets a try."""


class _PyAVFailure(Exception):
    """PyAV cannot decode this data either."""


def _decode_soundfile(handle: IO[bytes], label: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(handle) as reader:
            declared = reader.frames
            native_rate = reader.samplerate
            audio_format = reader.format
            if native_rate > 0:
                _check_duration(declared / native_rate, max_seconds, label)
            samples = reader.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except sf.LibsndfileError as exc:
        # libsndfile reports unknown data in a file object as "does not exist ... (possibly a pipe?)".
        message = exc.error_string
        raise _NotForSoundfile("format not recognised" if "does not exist" in message else message) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        # libsndfile decoders (mpg123 in particular) can fail mid-stream on corrupt data.
        raise AudioError(f"cannot decode {label}: the file is corrupt ({exc})") from None

    read = samples.shape[0]
    tolerance = 0
    if audio_format == "MP3":
        tolerance = max(_MP3_LENGTH_SLACK_FRAMES, int(_MP3_LENGTH_SLACK_FRACTION * declared))
    if read + tolerance < declared:
        raise AudioError(
            f"{label} is truncated: its header declares {declared} frames but only {read} could be "
            "decoded; re-export or re-download the file"
        )
    return samples, native_rate


def _check_wav_header(handle: IO[bytes], label: str, size: int) -> None:
    """Raise if a RIFF/WAVE file's fmt chunk contradicts itself or its data chunk is cut short.

    libsndfile trusts the header: a sample size no PCM or float wav has, or a block size that is not
    channels x sample size, makes it read the data with the wrong stride and return noise of the
    wrong length. It also silently reads what is there, so a cut download would otherwise pass as a
    short clip. Writers that stream to a pipe put a placeholder data size in the header (0,
    0xFFFFFFFF, espeak-ng's 0x7FFFF000); sizes that large or zero are accepted. Other files pass.
    """
    handle.seek(0)
    header = handle.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return
    offset = 12
    for _ in range(_WAV_MAX_CHUNKS):
        if offset + 8 > size:
            return
        handle.seek(offset)
        chunk_id, chunk_size = struct.unpack("<4sI", handle.read(8))
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt = handle.read(min(chunk_size, 40))
            if len(fmt) < min(chunk_size, 16):
                raise AudioError(
                    f"cannot decode {label}: it ends inside its wav header; re-export or re-download the file"
                )
            _check_wav_format(fmt, label)
        elif chunk_id == b"data":
            available = size - body
            placeholder = chunk_size == 0 or chunk_size >= _WAV_PLACEHOLDER_SIZE
            if not placeholder and available < chunk_size:
                raise AudioError(
                    f"{label} is truncated: its data chunk declares {chunk_size} bytes but only "
                    f"{available} are present; re-export or re-download the file"
                )
            return
        offset = body + chunk_size + (chunk_size & 1)


def _check_wav_format(fmt: bytes, label: str) -> None:
    """The fields of a wav fmt chunk (WAVEFORMAT, or WAVEFORMATEXTENSIBLE with its subformat)."""
    if len(fmt) < 16:
        raise AudioError(
            f"cannot decode {label}: its wav fmt chunk has {len(fmt)} bytes, not the 16 every wav has"
        )
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _WAV_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # the first two bytes of the subformat GUID
    problem = None
    if channels == 0:
        problem = "0 channels"
    elif rate == 0:
        problem = "a sample rate of 0 Hz"
    elif tag in _WAV_BITS and bits not in _WAV_BITS[tag]:
        kind = "PCM" if tag == _WAV_PCM else "float"
        allowed = "/".join(map(str, _WAV_BITS[tag]))
        problem = f"{bits} bits per sample ({kind} wav files have {allowed})"
    elif tag in _WAV_BITS and block_align != channels * bits // 8:
        problem = (
            f"{block_align} bytes per frame where {channels} channel(s) of {bits} bits take "
            f"{channels * bits // 8}"
        )
    if problem:
        raise AudioError(f"{label} has a broken wav header: it states {problem}; re-export the file")


def _decode_pyav(handle: IO[bytes], label: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av  # PyAV loads FFmpeg; only files soundfile cannot read pay for it

    planes: list[np.ndarray] = []
    try:
        with av.open(handle, mode="r") as container:
            if not container.streams.audio:
                raise _PyAVFailure("the container holds no audio stream")
            stream = container.streams.audio[0]
            # PyAV raises AttributeError for the rate of a stream whose codec it cannot open.
            native_rate = getattr(stream, "rate", None) or getattr(stream.codec_context, "sample_rate", None)
            declared_s = _declared_duration_s(stream)
            if declared_s is not None:
                _check_duration(declared_s, max_seconds, label)
            # Planar float keeps channels apart and the native rate; soxr does the resampling.
            converter = av.AudioResampler(format="fltp")
            decoded = 0
            for frame in container.decode(stream):
                planes.extend(f.to_ndarray() for f in converter.resample(frame))
                decoded += frame.samples
                if native_rate:  # a stream that understates its length is stopped as it decodes
                    _check_duration(decoded / native_rate, max_seconds, label)
            planes.extend(f.to_ndarray() for f in converter.resample(None))
    except AudioError:
        raise
    except av.FFmpegError as exc:
        raise _PyAVFailure(str(exc)) from None
    except (ValueError, RuntimeError, OSError, EOFError) as exc:
        raise _PyAVFailure(f"{type(exc).__name__}: {exc}") from None
    if not native_rate:
        raise _PyAVFailure("the audio stream does not state its sample rate")
    if not planes:
        raise AudioError(f"{label} contains no audio samples")
    samples = np.concatenate(planes, axis=1).T.astype(np.float32, copy=False)
    decoded_s = samples.shape[0] / native_rate
    if declared_s is not None:
        slack = max(_DECLARED_DURATION_SLACK_S, _DECLARED_DURATION_SLACK_FRACTION * declared_s)
        if decoded_s + slack < declared_s:
            raise AudioError(
                f"{label} is truncated: it declares {declared_s:.2f} s of audio but only "
                f"{decoded_s:.2f} s could be decoded; re-export or re-download the file"
            )
    return np.ascontiguousarray(samples), int(native_rate)


def _declared_duration_s(stream: object) -> float | None:
    duration = getattr(stream, "duration", None)
    time_base = getattr(stream, "time_base", None)
    if not duration or time_base is None:
        return None
    return float(duration * time_base)


def _finish(samples: np.ndarray, native_rate: int, sample_rate: int, label: str) -> np.ndarray:
    """[T, C] at native_rate -> [T'] mono float32 at sample_rate, after sanity checks."""
    if samples.shape[0] == 0:
        raise AudioError(f"{label} contains no audio samples (zero length)")
    if native_rate <= 0:
        raise AudioError(f"{label} declares an invalid sample rate {native_rate}")
    _check_finite(samples, label)
    peak = float(np.abs(samples).max())
    if peak > MAX_FLOAT_PEAK:
        raise AudioError(
            f"{label} has samples up to ±{peak:.4g}; float audio lies in [-1, 1] and peaks above "
            f"{MAX_FLOAT_PEAK:g} are refused (unscaled integer samples?); normalise or re-export the file"
        )
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if native_rate != sample_rate:
        mono = np.asarray(soxr.resample(mono, native_rate, sample_rate, quality="HQ"), dtype=np.float32)
    return mono


# --------------------------------------------------------------------------------------------------
# writing


def write_wav(
    path: PathLike | IO[bytes],
    x: np.ndarray,
    sample_rate: int,
    *,
    sample_format: SampleFormat = "pcm16",
    limit: bool = True,
) -> None:
    """Write audio x: [T] (mono) or [T, C] to a wav file or binary file object.

    Float audio first goes through the output safety limiter (:mod:`moss_agent.limiter`): peaks are
    turned down to the -1 dBFS ceiling (1 dB of headroom) instead of clipping, NaN/inf samples become
    0, and what it changed is logged (``-v``). Audio already within the ceiling is written unchanged.
    ``limit=False`` writes the samples as given (NaN/inf then raise AudioError); int16 is never changed.

    "pcm16" rounds with :func:`float_to_pcm16`, so loading it back gives exactly
    ``pcm16_to_float(float_to_pcm16(y))`` for the limited samples y; "float32" stores y unchanged.
    """
    _check_rate(sample_rate, "sample_rate")
    label = str(path) if isinstance(path, str | os.PathLike) else "wav output"
    samples = np.asarray(x)
    if samples.ndim not in (1, 2) or samples.size == 0:
        raise AudioError(f"{label}: expected non-empty audio of shape [T] or [T, C], got {samples.shape}")
    if samples.dtype.kind != "f" and samples.dtype != np.int16:
        raise AudioError(f"{label}: audio must be float in [-1, 1] or int16, got dtype {samples.dtype}")
    if limit and samples.dtype.kind == "f":
        samples, stats = limit_peaks(samples, sample_rate)
        log_limited(logger, stats, label, logging.WARNING if stats.nonfinite else logging.INFO)
    _check_finite(samples, f"audio written to {label}")
    if sample_format == "pcm16":
        data, subtype = (samples if samples.dtype == np.int16 else float_to_pcm16(samples)), "PCM_16"
    elif sample_format == "float32":
        data, subtype = samples.astype(np.float32, copy=False), "FLOAT"
    else:
        raise AudioError(f"unknown sample_format {sample_format!r}; use 'pcm16' or 'float32'")
    if not float(sample_rate).is_integer():
        raise AudioError(f"{label}: wav needs an integer sample rate, got {sample_rate}")
    try:
        sf.write(path, data, int(sample_rate), subtype=subtype, format="WAV")
    except (sf.LibsndfileError, OSError, RuntimeError) as exc:
        raise AudioError(f"cannot write wav to {label}: {exc}") from exc


def wav_bytes(
    x: np.ndarray, sample_rate: int, *, sample_format: SampleFormat = "pcm16", limit: bool = True
) -> bytes:
    """The bytes of a wav file holding x: [T] (for uploads and HTTP responses); see :func:`write_wav`."""
    buffer = io.BytesIO()
    write_wav(buffer, x, sample_rate, sample_format=sample_format, limit=limit)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# checks


def _check_rate(rate: object, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int | float | np.integer | np.floating):
        raise AudioError(f"{name} must be a number of samples per second, got {rate!r}")
    if not np.isfinite(rate) or rate <= 0:
        raise AudioError(f"{name} must be a positive sample rate in Hz, got {rate}")


def _check_size(size: int, label: str) -> None:
    if size > MAX_AUDIO_BYTES:
        raise AudioError(
            f"{label} is {size / 2**20:.0f} MiB; audio input is limited to {MAX_AUDIO_BYTES // 2**20} MiB: "
            "cut or compress it"
        )


def _check_duration(seconds: float, max_seconds: float | None, label: str) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLong(
            f"{label} is {seconds:.1f} s long; at most {max_seconds:g} s of audio are accepted here",
            seconds=seconds,
            limit=max_seconds,
        )


def _check_finite(samples: np.ndarray, label: str) -> None:
    if samples.dtype.kind == "f" and not np.isfinite(samples).all():
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise AudioError(f"{label} contains {bad} NaN or infinite samples; the audio is corrupt")


def as_mono_float(x: np.ndarray, label: str) -> np.ndarray:
    """Check ``x`` is finite mono float audio [T] -> float32 contiguous; AudioError naming ``label``."""
    samples = np.asarray(x)
    if samples.ndim != 1:
        raise AudioError(f"{label} must be mono with shape [T], got shape {samples.shape}")
    if samples.dtype.kind != "f":
        raise AudioError(
            f"{label} must be float samples in [-1, 1], got dtype {samples.dtype}; "
            "convert PCM16 with pcm16_to_float"
        )
    _check_finite(samples, label)
    return np.ascontiguousarray(samples, dtype=np.float32)
