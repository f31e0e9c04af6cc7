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

logger = logging.getLogger(__name__)

__all__ = [
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


def load_audio(path: PathLike, sample_rate: int = 24000) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate``: returns [T].

    wav (PCM 16/24/32-bit, float), flac, ogg and mp3 go through soundfile; m4a/AAC and anything else
    FFmpeg knows through PyAV. Channels are averaged; the rate is converted with soxr (HQ).
    Raises AudioError for a missing file, a directory, an empty, truncated or unreadable file,
    NaN/inf samples or no samples at all.
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
    try:
        with open(file, "rb") as handle:
            samples, native_rate = _decode(handle, label, size)
    except OSError as exc:
        raise AudioError(f"cannot read audio file {label}: {exc}") from exc
    return _finish(samples, native_rate, sample_rate, label)


def decode_audio_bytes(data: bytes, sample_rate: int = 24000, *, name: str = "audio data") -> np.ndarray:
    """Decode an encoded audio file held in memory (e.g. an upload) to float32 mono [T].

    Same formats and errors as :func:`load_audio`; ``name`` labels the data in error messages.
    """
    _check_rate(sample_rate, "sample_rate")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AudioError(f"{name}: expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if not raw:
        raise AudioError(f"{name} is empty (0 bytes)")
    samples, native_rate = _decode(io.BytesIO(raw), name, len(raw))
    return _finish(samples, native_rate, sample_rate, name)


def _decode(handle: IO[bytes], label: str, size: int) -> tuple[np.ndarray, int]:
    """Decode a seekable binary stream -> (samples [T, C] float32, native rate)."""
    try:
        return _decode_soundfile(handle, label, size)
    except _NotForSoundfile as sf_failure:
        handle.seek(0)
        try:
            return _decode_pyav(handle, label)
        except _PyAVFailure as av_failure:
            raise AudioError(
                f"cannot decode {label}: not a recognised audio format, or the file is corrupt "
                f"(soundfile: {sf_failure}; FFmpeg: {av_failure})"
            ) from None


class _NotForSoundfile(Exception):
    """libsndfile cannot open this data; PyAV gets a try."""


class _PyAVFailure(Exception):
    """PyAV cannot decode this data either."""


def _decode_soundfile(handle: IO[bytes], label: str, size: int) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(handle) as reader:
            declared = reader.frames
            native_rate = reader.samplerate
            audio_format = reader.format
            samples = reader.read(dtype="float32", always_2d=True)
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
    if audio_format == "WAV":
        _check_wav_data_chunk(handle, label, size)
    return samples, native_rate


def _check_wav_data_chunk(handle: IO[bytes], label: str, size: int) -> None:
    """Raise if a RIFF/WAVE file's data chunk is shorter than its header says.

    libsndfile silently reads what is there, so a cut download would otherwise pass as a short clip.
    Writers that stream to a pipe put a placeholder size in the header (0, 0xFFFFFFFF, espeak-ng's
    0x7FFFF000); sizes that large or zero are accepted.
    """
    handle.seek(0)
    header = handle.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= size:
        handle.seek(offset)
        chunk_id, chunk_size = struct.unpack("<4sI", handle.read(8))
        body = offset + 8
        if chunk_id == b"data":
            available = size - body
            placeholder = chunk_size == 0 or chunk_size >= _WAV_PLACEHOLDER_SIZE
            if not placeholder and available < chunk_size:
                raise AudioError(
                    f"{label} is truncated: its data chunk declares {chunk_size} bytes but only "
                    f"{available} are present; re-export or re-download the file"
                )
            return
        offset = body + chunk_size + (chunk_size & 1)


def _decode_pyav(handle: IO[bytes], label: str) -> tuple[np.ndarray, int]:
    import av  # PyAV loads FFmpeg; only files soundfile cannot read pay for it

    planes: list[np.ndarray] = []
    try:
        with av.open(handle, mode="r") as container:
            if not container.streams.audio:
                raise _PyAVFailure("the container holds no audio stream")
            stream = container.streams.audio[0]
            native_rate = stream.rate or stream.codec_context.sample_rate
            # Planar float keeps channels apart and the native rate; soxr does the resampling.
            converter = av.AudioResampler(format="fltp")
            for frame in container.decode(stream):
                planes.extend(f.to_ndarray() for f in converter.resample(frame))
            planes.extend(f.to_ndarray() for f in converter.resample(None))
            declared_s = _declared_duration_s(stream)
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
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if native_rate != sample_rate:
        mono = np.asarray(soxr.resample(mono, native_rate, sample_rate, quality="HQ"), dtype=np.float32)
    return mono


# --------------------------------------------------------------------------------------------------
# writing


def write_wav(
    path: PathLike | IO[bytes], x: np.ndarray, sample_rate: int, *, sample_format: SampleFormat = "pcm16"
) -> None:
    """Write audio x: [T] (mono) or [T, C] to a wav file or binary file object.

    "pcm16" rounds with :func:`float_to_pcm16`, so loading it back gives exactly
    ``pcm16_to_float(float_to_pcm16(x))``; "float32" stores the samples unchanged.
    """
    _check_rate(sample_rate, "sample_rate")
    label = str(path) if isinstance(path, str | os.PathLike) else "wav output"
    samples = np.asarray(x)
    if samples.ndim not in (1, 2) or samples.size == 0:
        raise AudioError(f"{label}: expected non-empty audio of shape [T] or [T, C], got {samples.shape}")
    if samples.dtype.kind != "f" and samples.dtype != np.int16:
        raise AudioError(f"{label}: audio must be float in [-1, 1] or int16, got dtype {samples.dtype}")
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


def wav_bytes(x: np.ndarray, sample_rate: int, *, sample_format: SampleFormat = "pcm16") -> bytes:
    """The bytes of a wav file holding x: [T] (for uploads and HTTP responses)."""
    buffer = io.BytesIO()
    write_wav(buffer, x, sample_rate, sample_format=sample_format)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# checks


def _check_rate(rate: object, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int | float | np.integer | np.floating):
        raise AudioError(f"{name} must be a number of samples per second, got {rate!r}")
    if not np.isfinite(rate) or rate <= 0:
        raise AudioError(f"{name} must be a positive sample rate in Hz, got {rate}")


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
