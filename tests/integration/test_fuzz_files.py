"""Fuzzing the file decoders (issue 15): random JSONL lines at the batch CLI's JSONL reader and random
audio headers and bytes at the audio decoders. Nothing but ConfigError / AudioError may come out.

Bounded in count (``max_examples``) and derandomized, so a run is repeatable and takes seconds.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moss_agent.audio import decode_audio_bytes, wav_bytes
from moss_agent.commands.batch_common import REQUEST_FIELDS, _OutputFolder, read_jsonl
from moss_agent.errors import AudioError, ConfigError

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# ---------------------------------------------------------------------------------------- JSONL

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    sorted({name for fields in REQUEST_FIELDS.values() for name in fields} | {"kind", "output"})
)
outputs = st.sampled_from(
    ["a.wav", "../x.wav", "/tmp/x.wav", "escape/x.wav", "escape", "", ".", "sub/../../y.wav"]
)
requests = st.dictionaries(field_names, json_values | outputs, max_size=6)
raw_lines = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" "))
lines = st.one_of(
    requests.map(lambda r: json.dumps(r).encode()),
    raw_lines,
    st.integers(1, 40).map(lambda n: b"[" * n + b"]" * n),
    json_values.map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture(scope="module")
def jsonl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "out").mkdir()
    (root / "out" / "escape").symlink_to(root)
    (root / "a.wav").write_bytes(wav_bytes(np.zeros(2400, np.float32), 24000))
    return root


@FUZZ
@given(kind=st.sampled_from(sorted(REQUEST_FIELDS)), body=st.lists(lines, min_size=1, max_size=4))
def test_random_jsonl_gives_requests_or_a_config_error(
    jsonl_folder: Path, kind: str, body: list[bytes]
) -> None:
    path = jsonl_folder / "fuzz.jsonl"
    path.write_bytes(b"\n".join(body))
    outputs_folder = _OutputFolder(jsonl_folder / "out")
    try:
        items = read_jsonl(path, kind, outputs_folder)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
        return
    for item in items:  # whatever passed stays inside the folder and has its required fields
        assert item.target.resolve().is_relative_to((jsonl_folder / "out").resolve())
        assert all(
            item.fields.get(name) is not None for name, required in REQUEST_FIELDS[kind].items() if required
        )


# ---------------------------------------------------------------------------------------- audio


def _wav(channels: int, bits: int, tag: int, block_align: int, rate: int, data: bytes) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block_align) & 0xFFFFFFFF, block_align, bits)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


wav_headers = st.builds(
    _wav,
    channels=st.integers(0, 9),
    bits=st.sampled_from([0, 1, 4, 7, 8, 12, 16, 20, 24, 32, 64, 65535]),
    tag=st.sampled_from([0, 1, 2, 3, 6, 7, 0x11, 0xFFFE, 0x1234]),
    block_align=st.integers(0, 40),
    rate=st.sampled_from([0, 1, 8000, 16000, 44100, 2**31, 2**32 - 1]),
    data=st.binary(max_size=4000),
)
GOOD = wav_bytes((0.3 * np.sin(np.arange(4800) * 0.05)).astype(np.float32), 24000)
flipped_wavs = st.lists(
    st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8
).map(lambda edits: _apply(GOOD, edits))


def _apply(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    changed = bytearray(data)
    for offset, value in edits:
        changed[offset] = value
    return bytes(changed)


def _encoded(fmt: str) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(np.arange(8000) * 0.05)).astype(np.float32), 16000, format=fmt)
    return buffer.getvalue()


ENCODED = [_encoded("FLAC"), _encoded("OGG"), _encoded("MP3")]
cut_or_flipped = st.tuples(
    st.sampled_from(range(len(ENCODED))),
    st.integers(0, 4000),
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
).map(
    lambda t: _apply(
        ENCODED[t[0]][: max(1, len(ENCODED[t[0]]) - t[1])],
        [(o % max(1, len(ENCODED[t[0]]) - t[1]), v) for o, v in t[2]],
    )
)
audio_bytes = st.one_of(wav_headers, flipped_wavs, cut_or_flipped, st.binary(min_size=1, max_size=3000))


@FUZZ
@given(data=audio_bytes)
@example(data=_wav(channels=1, bits=0, tag=0, block_align=0, rate=1, data=b""))  # PyAV: a stream with no rate
def test_random_audio_gives_samples_or_an_audio_error(data: bytes) -> None:
    try:
        samples = decode_audio_bytes(data, 24000, name="fuzz.wav", max_seconds=30)
    except AudioError as exc:
        assert "fuzz.wav" in str(exc)
        return
    assert samples.dtype == np.float32 and samples.ndim == 1 and np.isfinite(samples).all()
    assert len(samples) <= 30 * 24000 + 24000
