"""Offline codec calls on real speech with a tiny random codec: lengths, batches, dtypes, input errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moss_agent.audio import load_audio
from moss_agent.errors import ConfigError
from moss_agent.models.codec import MossAudioTokenizer, load_codec
from moss_agent.models.codec.tiny import save_tiny_codec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_codec(tmp_path_factory.mktemp("codec"), seed=5, num_quantizers=8, codebook_size=64)


@pytest.fixture(scope="module")
def codec(folder: Path) -> MossAudioTokenizer:
    return load_codec(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def speech(audio_dir: Path) -> list[torch.Tensor]:
    """Two real recordings at 24 kHz, cut to 2.5 s and 1.7 s (neither a whole number of frames)."""
    first = torch.from_numpy(load_audio(audio_dir / "user1.wav", 24000))[:60000]
    second = torch.from_numpy(load_audio(audio_dir / "reference_zh.wav", 24000))[:40800]
    return [first, second]


def _pad(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([w.numel() for w in waves])
    batch = torch.zeros(len(waves), 1, int(lengths.max()))
    for row, wave in enumerate(waves):
        batch[row, 0, : wave.numel()] = wave
    return batch, lengths


def test_round_trip_on_real_speech(codec: MossAudioTokenizer, speech: list[torch.Tensor]) -> None:
    batch, lengths = _pad(speech)
    codes, code_lengths = codec.encode(batch, lengths)
    assert codes.dtype == torch.long and codes.shape == (8, 2, 32)  # ceil(60000 / 1920) frames
    assert code_lengths.tolist() == [60000 // 1920, 40800 // 1920]
    assert int(codes.min()) >= 0 and int(codes.max()) < codec.codebook_size
    assert len(torch.unique(codes[0, 0, : code_lengths[0]])) > 4  # speech is not one code
    wav, wav_lengths = codec.decode(codes, code_lengths)
    assert wav.shape == (2, 1, 32 * 1920) and wav.dtype == torch.float32
    assert wav_lengths.tolist() == [31 * 1920, 21 * 1920]
    assert bool(torch.isfinite(wav).all()) and float(wav.std()) > 0
    # Causal and row-independent: each item alone gives the same valid codes and samples.
    for row, wave in enumerate(speech):
        alone, alone_lengths = codec.encode(wave[None])
        valid = int(alone_lengths[0])
        assert (alone[:, 0, :valid] == codes[:, row, :valid]).float().mean() > 0.99
        audio, _ = codec.decode(codes[:, row : row + 1, :valid])
        torch.testing.assert_close(audio[0, 0], wav[row, 0, : valid * 1920], atol=1e-4, rtol=0)


def test_prefix_codebooks(codec: MossAudioTokenizer, speech: list[torch.Tensor]) -> None:
    codes, _ = codec.encode(speech[0][None])
    prefix, _ = codec.encode(speech[0][None], num_quantizers=3)
    assert torch.equal(prefix, codes[:3])
    full, _ = codec.decode(codes)
    coarse, _ = codec.decode(codes[:3])
    assert coarse.shape == full.shape and not torch.equal(coarse, full)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_stays_close(folder: Path, codec: MossAudioTokenizer, speech: list[torch.Tensor],
                                           dtype: torch.dtype) -> None:
    half = load_codec(folder, device="cpu", dtype=dtype)
    wave = speech[0][None, None, : 20 * 1920]
    codes, _ = codec.encode(wave)
    half_codes, _ = half.encode(wave)
    # Low-margin LFQ decisions may flip; most codes of the first codebooks must agree.
    assert (half_codes[:2] == codes[:2]).float().mean() > 0.8
    reference, _ = codec.decode(codes)
    audio, _ = half.decode(codes)
    assert audio.dtype == torch.float32
    relative = float((audio - reference).norm() / reference.norm())
    assert relative < 0.05


def test_offline_input_errors(codec: MossAudioTokenizer) -> None:
    with pytest.raises(ConfigError, match="mono"):
        codec.encode(torch.zeros(1, 2, 1920))
    with pytest.raises(ConfigError, match="float"):
        codec.encode(torch.zeros(1, 1920, dtype=torch.long))
    with pytest.raises(ConfigError, match="lengths"):
        codec.encode(torch.zeros(2, 1920), lengths=[1920])
    with pytest.raises(ConfigError, match="num_quantizers"):
        codec.encode(torch.zeros(1, 1920), num_quantizers=9)
    with pytest.raises(ConfigError, match="codebooks"):
        codec.decode(torch.zeros(9, 1, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"\[0, 64\)"):
        codec.decode(torch.full((2, 1, 2), 64))
    with pytest.raises(ConfigError, match="integer"):
        codec.decode(torch.zeros(2, 1, 2))
    with pytest.raises(ConfigError, match="no samples"):
        codec.encode(torch.zeros(1, 0))
    with pytest.raises(ConfigError, match="no frames"):
        codec.decode(torch.zeros(2, 1, 0, dtype=torch.long))


def test_short_input_lengths(codec: MossAudioTokenizer) -> None:
    codes, lengths = codec.encode(torch.zeros(1, 3200))
    assert codes.shape[-1] == 2 and lengths.tolist() == [1]  # floor length, ceil frames (upstream rule)
    codes, lengths = codec.encode(torch.zeros(1, 100))
    assert codes.shape[-1] == 1 and lengths.tolist() == [0]
    wav, wav_lengths = codec.decode(codes[:, :, :1], lengths=[0])
    assert wav.shape == (1, 1, 1920) and wav_lengths.tolist() == [0]
