"""moss_agent.audio: decoding real and synthetic files, resampling (one-shot and streaming), PCM16
conversion, wav writing, and a clear AudioError for every kind of bad input."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from moss_agent.audio import (
    MAX_FLOAT_PEAK,
    AudioTooLong,
    StreamResampler,
    decode_audio_bytes,
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    resample,
    wav_bytes,
    write_wav,
)
from moss_agent.errors import AudioError

# AAC decoders drop the encoder's priming samples (2112 at most), so an m4a decodes slightly shorter
# than the duration its container declares.
AAC_SLACK_S = 0.06


def _sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def _native_duration_s(path: Path) -> tuple[float, float]:
    """(duration the file declares, allowed error) without going through moss_agent.audio."""
    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate, 0.0
    except sf.LibsndfileError:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            return float(stream.duration * stream.time_base), AAC_SLACK_S


def _encode_m4a(x: np.ndarray, rate: int, path: Path) -> None:
    with av.open(str(path), "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.stack([x, x]), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# ---------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize("rate", [16000, 24000])
def test_every_shared_recording_loads_with_its_declared_duration(audio_dir: Path, rate: int) -> None:
    files = sorted(p for p in audio_dir.iterdir() if p.is_file())
    assert files
    for path in files:
        x = load_audio(path, rate)
        declared_s, slack_s = _native_duration_s(path)
        assert x.dtype == np.float32 and x.ndim == 1, path.name
        assert abs(len(x) / rate - declared_s) <= slack_s + 1.0 / rate, path.name
        assert float(np.sqrt(np.mean(x**2))) > 0.001 and np.abs(x).max() <= 1.5, path.name


def test_shared_recordings_cover_stereo_24bit_and_m4a(audio_dir: Path) -> None:
    """The formats the loader must handle are really exercised by the shared files."""
    kinds = set()
    for path in audio_dir.iterdir():
        if path.suffix == ".m4a":
            kinds.add("m4a")
            continue
        info = sf.info(str(path))
        kinds.add(info.subtype)
        if info.channels == 2:
            kinds.add("stereo")
            stereo = sf.read(str(path), dtype="float32")[0]
            mono = load_audio(path, info.samplerate)
            np.testing.assert_allclose(mono, stereo.mean(axis=1), atol=1e-6)
    assert {"m4a", "PCM_24", "PCM_16", "stereo"} <= kinds


def test_m4a_decoded_by_pyav_matches_the_same_file_as_wav(audio_dir: Path) -> None:
    m4a = audio_dir / "reference_en.m4a"
    if not m4a.exists():
        pytest.skip("reference_en.m4a not in the shared audio")
    x = load_audio(m4a, 16000)
    assert decode_audio_bytes(m4a.read_bytes(), 16000).tolist() == x.tolist()


# ----------------------------------------------------------------------------------- synthetic files


def test_stereo_wav_is_mixed_down_to_the_channel_mean(tmp_path: Path) -> None:
    left = _sine(440, 0.5, 22050)
    right = _sine(1000, 0.5, 22050, amplitude=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), 22050, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path, 22050), (left + right) / 2, atol=1e-7)


def test_24bit_wav_keeps_its_precision(tmp_path: Path) -> None:
    x = _sine(300, 0.25, 48000, amplitude=0.9)
    path = tmp_path / "deep.wav"
    sf.write(str(path), x, 48000, subtype="PCM_24")
    y = load_audio(path, 48000)
    assert np.abs(y - x).max() <= 2.0**-23


@pytest.mark.parametrize("rate_in", [8000, 22050, 44100, 48000])
def test_resampled_load_keeps_pitch_and_duration(tmp_path: Path, rate_in: int) -> None:
    path = tmp_path / "tone.flac"
    sf.write(str(path), _sine(440, 1.0, rate_in), rate_in)
    y = load_audio(path, 24000)
    assert len(y) == 24000
    assert abs(_dominant_frequency(y, 24000) - 440) < 2


def test_m4a_made_here_decodes_through_pyav(tmp_path: Path) -> None:
    x = _sine(440, 1.0, 24000)
    path = tmp_path / "tone.m4a"
    _encode_m4a(x, 24000, path)
    y = load_audio(path, 16000)
    # PyAV's muxer writes no edit list, so the encoder's priming frame and the padding of the last
    # 1024-sample frame stay in the decoded audio.
    assert 1.0 <= len(y) / 16000 <= 1.0 + 2 * 1024 / 24000 + 1e-3
    assert abs(_dominant_frequency(y, 16000) - 440) < 2
    assert decode_audio_bytes(path.read_bytes(), 16000).tolist() == y.tolist()


def test_mp3_float_wav_and_ogg_decode(tmp_path: Path) -> None:
    x = _sine(440, 0.5, 16000)
    for name, kwargs in [
        ("a.mp3", {"format": "MP3"}),
        ("b.wav", {"subtype": "FLOAT"}),
        ("c.ogg", {"format": "OGG", "subtype": "VORBIS"}),
    ]:
        path = tmp_path / name
        sf.write(str(path), x, 16000, **kwargs)
        y = load_audio(path, 16000)
        assert abs(len(y) - len(x)) <= 1152, name
        assert abs(_dominant_frequency(y, 16000) - 440) < 2, name


# ------------------------------------------------------------------------------------- wav writing


def test_pcm16_wav_round_trip_is_exact_after_quantisation(tmp_path: Path) -> None:
    x = np.random.default_rng(0).uniform(-1.2, 1.2, 4000).astype(np.float32)
    path = tmp_path / "out.wav"
    write_wav(path, x, 16000, limit=False)
    assert sf.info(str(path)).subtype == "PCM_16"
    np.testing.assert_array_equal(load_audio(path, 16000), pcm16_to_float(float_to_pcm16(x)))


def test_float_wav_round_trip_is_lossless(tmp_path: Path) -> None:
    x = np.random.default_rng(1).uniform(-1, 1, 4000).astype(np.float32)
    path = tmp_path / "out.wav"
    write_wav(path, x, 24000, sample_format="float32", limit=False)
    assert sf.info(str(path)).subtype == "FLOAT"
    np.testing.assert_array_equal(load_audio(path, 24000), x)


def test_written_wavs_go_through_the_limiter(audio_dir: Path, tmp_path: Path) -> None:
    """A real recording 20x too loud is turned down to the -1 dBFS ceiling, not clipped; the same
    recording at its own level is written exactly as without the limiter."""
    ceiling = 10 ** (-1 / 20)
    speech = load_audio(audio_dir / "user1.wav", 24000)
    loud = speech * 20
    assert np.abs(loud).max() > 5 and np.mean(np.abs(loud) >= 1.0) > 0.05  # would clip without it
    for sample_format in ("pcm16", "float32"):
        path = tmp_path / f"loud_{sample_format}.wav"
        write_wav(path, loud, 24000, sample_format=sample_format)
        written = load_audio(path, 24000)
        assert len(written) == len(loud)
        assert np.abs(written).max() <= ceiling + 1 / 32768, sample_format
        # turned down, not flattened: the written speech follows the original's shape
        assert np.corrcoef(written, loud)[0, 1] > 0.9
    assert np.abs(speech).max() < ceiling
    write_wav(tmp_path / "speech.wav", speech, 24000)
    write_wav(tmp_path / "speech_raw.wav", speech, 24000, limit=False)
    assert (tmp_path / "speech.wav").read_bytes() == (tmp_path / "speech_raw.wav").read_bytes()


def test_nan_samples_are_written_as_silence_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x = _sine(440, 0.1, 16000)
    x[[3, 50]] = [np.nan, -np.inf]
    path = tmp_path / "out.wav"
    with caplog.at_level("INFO", logger="moss_agent.audio"):
        write_wav(path, x, 16000)
    y = load_audio(path, 16000)
    assert y[3] == 0 and y[50] == 0
    clean = np.delete(np.arange(len(x)), [3, 50])
    np.testing.assert_array_equal(y[clean], pcm16_to_float(float_to_pcm16(x[clean])))
    assert any(r.levelname == "WARNING" and "2 NaN/inf samples set to 0" in r.getMessage() for r in caplog.records)


def test_int16_audio_is_written_unchanged(tmp_path: Path) -> None:
    x = np.array([-32768, -1, 0, 1, 32767] * 100, dtype=np.int16)
    path = tmp_path / "out.wav"
    write_wav(path, x, 16000)
    np.testing.assert_array_equal(load_audio(path, 16000), pcm16_to_float(x))


def test_wav_bytes_decode_back() -> None:
    x = _sine(440, 0.2, 16000)
    data = wav_bytes(x, 16000)
    assert data[:4] == b"RIFF"
    np.testing.assert_array_equal(decode_audio_bytes(data, 16000), pcm16_to_float(float_to_pcm16(x)))


@pytest.mark.parametrize("placeholder", [0x7FFFF000, 0xFFFFFFFF])
def test_wav_streamed_to_a_pipe_with_placeholder_sizes_loads(placeholder: int) -> None:
    """espeak-ng --stdout and ffmpeg pipes write a dummy length into the header; that is no truncation."""
    x = _sine(440, 0.2, 16000)
    data = bytearray(wav_bytes(x, 16000))
    data_chunk = data.index(b"data")
    data[4:8] = placeholder.to_bytes(4, "little")
    data[data_chunk + 4 : data_chunk + 8] = placeholder.to_bytes(4, "little")
    np.testing.assert_array_equal(decode_audio_bytes(bytes(data), 16000), pcm16_to_float(float_to_pcm16(x)))


# ---------------------------------------------------------------------------------- PCM16 conversion


def test_float_to_pcm16_known_values() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 1 / 32768, 0.4 / 32768, 0.6 / 32768, -0.6 / 32768])
    expected = [0, 16384, -16384, 32767, -32768, 32767, -32768, 1, 0, 1, -1]
    out = float_to_pcm16(x.astype(np.float32))
    assert out.dtype == np.int16
    assert out.tolist() == expected


def test_pcm16_to_float_known_values() -> None:
    raw = np.array([-32768, 32767, 16384, 0, -1], dtype="<i2").tobytes()
    out = pcm16_to_float(raw)
    assert out.dtype == np.float32
    assert out.tolist() == [-1.0, 32767 / 32768, 0.5, 0.0, -1 / 32768]
    assert pcm16_to_float(np.frombuffer(raw, dtype=np.int16)).tolist() == out.tolist()


def test_every_int16_value_survives_float_and_back() -> None:
    every = np.arange(-32768, 32768, dtype=np.int16)
    np.testing.assert_array_equal(float_to_pcm16(pcm16_to_float(every)), every)
    np.testing.assert_array_equal(float_to_pcm16(pcm16_to_float(every.tobytes())), every)


def test_pcm16_conversion_rejects_bad_input() -> None:
    with pytest.raises(AudioError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(AudioError, match="int16"):
        pcm16_to_float(np.zeros(4, dtype=np.int32))
    with pytest.raises(AudioError, match="NaN"):
        float_to_pcm16(np.array([0.0, np.inf], dtype=np.float32))


# ---------------------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(("from_rate", "to_rate"), [(24000, 16000), (16000, 24000), (44100, 16000)])
def test_resample_keeps_pitch_and_length(from_rate: int, to_rate: int) -> None:
    x = _sine(1000, 1.0, from_rate)
    y = resample(x, from_rate, to_rate)
    assert y.dtype == np.float32 and len(y) == to_rate
    assert abs(_dominant_frequency(y, to_rate) - 1000) < 2


@pytest.mark.parametrize(
    ("from_rate", "to_rate"), [(24000, 16000), (16000, 24000), (44100, 16000), (48000, 48000)]
)
def test_stream_resampler_in_20ms_chunks_equals_one_shot(from_rate: int, to_rate: int) -> None:
    rng = np.random.default_rng(2)
    x = (0.3 * rng.standard_normal(from_rate + 137)).astype(np.float32)
    chunk = from_rate // 50
    expected = resample(x, from_rate, to_rate)
    stream = StreamResampler(from_rate, to_rate)
    for _ in range(2):  # flush() must leave the resampler ready for a fresh stream
        pieces = [stream.process(x[i : i + chunk]) for i in range(0, len(x), chunk)]
        pieces.append(stream.flush())
        out = np.concatenate(pieces)
        assert len(out) == len(expected) == round(len(x) * to_rate / from_rate)
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_stream_resampler_reset_drops_buffered_input() -> None:
    x = _sine(440, 0.2, 24000)
    stream = StreamResampler(24000, 16000)
    stream.process(np.random.default_rng(3).standard_normal(480).astype(np.float32))
    stream.reset()
    out = np.concatenate([stream.process(x), stream.flush()])
    np.testing.assert_allclose(out, resample(x, 24000, 16000), atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input


def _truncated(source: bytes) -> bytes:
    return source[: len(source) // 2]


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    x = _sine(440, 1.0, 16000)
    wav = wav_bytes(x, 16000)
    mp3_buffer = io.BytesIO()
    sf.write(mp3_buffer, x, 16000, format="MP3")
    nan = x.copy()
    nan[100] = np.nan
    files = {
        "empty": b"",
        "truncated wav": _truncated(wav),
        "truncated wav header": wav[:30],
        "truncated mp3": _truncated(mp3_buffer.getvalue()),
        "mp3 header only": mp3_buffer.getvalue()[:200],
        "random bytes": np.random.default_rng(4).bytes(8000),
        "text file": b"this is not audio at all\n" * 40,
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / (name.replace(" ", "_") + ".wav")
        path.write_bytes(data)
        paths[name] = path
    # write_wav refuses NaN, so the corrupt file is made with soundfile directly.
    paths["nan samples"] = tmp_path / "nan_samples.wav"
    sf.write(str(paths["nan samples"]), nan, 16000, subtype="FLOAT")
    zero = tmp_path / "zero_frames.wav"
    sf.write(str(zero), np.zeros(0, dtype=np.float32), 16000)
    paths["zero frames"] = zero
    paths["directory"] = tmp_path
    paths["missing"] = tmp_path / "no_such_file.wav"
    return paths


EXPECTED_MESSAGES = {
    "empty": "empty",
    "truncated wav": "truncated",
    "truncated wav header": "cannot decode",
    "truncated mp3": "truncated",
    "mp3 header only": "cannot decode",
    "random bytes": "cannot decode",
    "text file": "not a recognised audio format",
    "nan samples": "NaN",
    "zero frames": "no audio samples",
    "directory": "directory",
    "missing": "does not exist",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_MESSAGES))
def test_bad_file_raises_audio_error_naming_file_and_problem(tmp_path: Path, case: str) -> None:
    path = _bad_files(tmp_path)[case]
    with pytest.raises(AudioError, match=EXPECTED_MESSAGES[case]) as caught:
        load_audio(path, 16000)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("case", ["empty", "truncated wav", "truncated mp3", "random bytes", "nan samples"])
def test_bad_bytes_raise_audio_error_with_their_name(tmp_path: Path, case: str) -> None:
    data = _bad_files(tmp_path)[case].read_bytes()
    with pytest.raises(AudioError, match=EXPECTED_MESSAGES[case]) as caught:
        decode_audio_bytes(data, 16000, name="upload from peer 7")
    assert "upload from peer 7" in str(caught.value)


@pytest.mark.parametrize("rate", [0, -16000, float("nan"), "16000"])
def test_unsupported_rates_are_rejected_everywhere(tmp_path: Path, rate: object) -> None:
    path = tmp_path / "ok.wav"
    x = _sine(440, 0.1, 16000)
    write_wav(path, x, 16000)
    calls = [
        lambda: load_audio(path, rate),  # type: ignore[arg-type]
        lambda: decode_audio_bytes(path.read_bytes(), rate),  # type: ignore[arg-type]
        lambda: resample(x, rate, 16000),  # type: ignore[arg-type]
        lambda: resample(x, 16000, rate),  # type: ignore[arg-type]
        lambda: StreamResampler(rate, 16000),  # type: ignore[arg-type]
        lambda: write_wav(tmp_path / "out.wav", x, rate),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(AudioError, match="rate"):
            call()


def test_non_finite_or_misshaped_samples_are_rejected(tmp_path: Path) -> None:
    x = _sine(440, 0.1, 16000)
    x[3] = np.inf
    with pytest.raises(AudioError, match="NaN or infinite"):
        resample(x, 16000, 24000)
    with pytest.raises(AudioError, match="NaN or infinite"):
        StreamResampler(16000, 24000).process(x)
    with pytest.raises(AudioError, match="NaN or infinite"):
        write_wav(tmp_path / "bad.wav", x, 16000, limit=False)
    with pytest.raises(AudioError, match="shape"):
        resample(np.zeros((2, 100), dtype=np.float32), 16000, 24000)
    with pytest.raises(AudioError, match="pcm16_to_float"):
        StreamResampler(16000, 24000).process(np.zeros(320, dtype=np.int16))
    with pytest.raises(AudioError, match="cannot write"):
        write_wav(tmp_path / "missing_dir" / "out.wav", np.zeros(10, dtype=np.float32), 16000)


def _with_fmt(wav: bytes, **fields: int) -> bytes:
    """``wav`` (a plain 44-byte-header wav) with fmt fields replaced: channels, block_align, bits."""
    data = bytearray(wav)
    offsets = {"tag": 20, "channels": 22, "block_align": 32, "bits": 34}
    for name, value in fields.items():
        data[offsets[name] : offsets[name] + 2] = struct.pack("<H", value)
    return bytes(data)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bits": 7, "block_align": 1}, "7 bits per sample"),
        ({"bits": 12}, "12 bits per sample"),
        ({"block_align": 4}, "4 bytes per frame"),
        ({"channels": 0}, "0 channels"),
        ({"tag": 3}, "16 bits per sample (float wav files have 32/64)"),
    ],
)
def test_wav_header_that_contradicts_itself_is_refused(fields: dict[str, int], message: str) -> None:
    wav = _with_fmt(wav_bytes(_sine(440, 0.2, 16000), 16000), **fields)
    with pytest.raises(AudioError, match="broken wav header") as caught:
        decode_audio_bytes(wav, 16000, name="odd.wav")
    assert message in str(caught.value) and "odd.wav" in str(caught.value)


def test_float_samples_far_outside_unit_range_are_refused_and_mild_overshoot_kept(tmp_path: Path) -> None:
    x = _sine(440, 0.2, 16000)
    loud = tmp_path / "unscaled.wav"
    sf.write(str(loud), x * 1796, 16000, subtype="FLOAT")  # peaks of about ±898
    with pytest.raises(AudioError, match=r"unscaled.wav has samples up to ±89\d") as caught:
        load_audio(loud, 16000)
    assert f"peaks above {MAX_FLOAT_PEAK:g}" in str(caught.value)
    hot = tmp_path / "hot.wav"
    sf.write(str(hot), x * 3, 16000, subtype="FLOAT")  # +3.5 dBFS: kept as it is
    assert np.abs(load_audio(hot, 16000)).max() == pytest.approx(1.5, abs=1e-3)


def test_audio_longer_than_the_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    write_wav(path, np.zeros(16000 * 12, dtype=np.float32), 16000)
    with pytest.raises(AudioTooLong, match=r"long.wav is 12.0 s long; at most 10 s") as caught:
        load_audio(path, 16000, max_seconds=10)
    assert (caught.value.seconds, caught.value.limit) == (12.0, 10)
    assert len(load_audio(path, 16000, max_seconds=None)) == 16000 * 12
    m4a = io.BytesIO()
    with av.open(m4a, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for _ in range(0, 16000 * 3, 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(AudioTooLong, match=r"upload.m4a is 3.\d s long; at most 2 s"):
        decode_audio_bytes(m4a.getvalue(), 16000, name="upload.m4a", max_seconds=2)


def test_audio_and_speech_recognition_do_not_import_torch() -> None:
    """The asyncio side (transports, pipeline) uses these modules and must stay torch-free."""
    code = (
        "import sys, moss_agent.audio, moss_agent.speech, moss_agent.speech.stt, moss_agent.testing.speech\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
