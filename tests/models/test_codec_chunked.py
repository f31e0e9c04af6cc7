"""Chunked offline codec calls on tiny random codecs: memory stays bounded on long inputs, every batch
row equals its own call, short rows take the offline path, and chunking equals offline while the
window holds. Parity with upstream's chunk_duration is in test_codec_parity.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from moss_agent.errors import ConfigError
from moss_agent.models.codec import MossAudioTokenizer, load_codec
from moss_agent.models.codec.tiny import save_tiny_codec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> MossAudioTokenizer:
    """0.32 s (4-frame) windows: chunked runs of a few seconds wrap every ring many times."""
    return load_codec(save_tiny_codec(tmp_path_factory.mktemp("codec"), seed=11), device="cpu")


@pytest.fixture(scope="module")
def wide_codec(tmp_path_factory: pytest.TempPathFactory) -> MossAudioTokenizer:
    """A 2 s (25-frame) window, longer than the 20-frame inputs below: no ring ever wraps."""
    return load_codec(save_tiny_codec(tmp_path_factory.mktemp("wide"), seed=12, context_duration=2.0), device="cpu")


def _noise(batch: int, samples: int, seed: int) -> torch.Tensor:
    return 0.3 * torch.randn(batch, 1, samples, generator=torch.Generator().manual_seed(seed))


def _codes(codec: MossAudioTokenizer, batch: int, frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, codec.codebook_size, (codec.num_quantizers, batch, frames), generator=generator)


def _storages(tree: object) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class _LargestIntermediate(TorchDispatchMode):
    """Records the bytes of every tensor an op allocates: outputs that share an input's storage
    (views, in-place updates) allocate nothing and are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[int, int]] = []  # (storage pointer, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _storages((args, kwargs))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.created.append((tensor.untyped_storage().data_ptr(), tensor.nbytes))
        return out


def _peak_working_bytes(call: Callable[[], tuple[torch.Tensor, ...]]) -> int:
    """Largest tensor ``call`` creates, the buffers it returns not counted."""
    with _LargestIntermediate() as recorder:
        results = call()
    returned = _storages(results)
    return max(size for pointer, size in recorder.created if pointer not in returned)


def test_chunked_memory_does_not_grow_with_the_input(codec: MossAudioTokenizer) -> None:
    """Four times longer input, same largest working tensor: only a chunk is ever in flight."""
    frame = codec.frame_size
    short, long = 12, 48  # frames; both far past the 4-frame window
    for seed, frames in enumerate((short, long)):
        codes = _codes(codec, 2, frames, seed)
        wav = _noise(2, frames * frame + 700, seed)  # a partial trailing frame too
        peaks = (
            _peak_working_bytes(lambda c=codes: codec.decode_chunked(c, chunk_frames=4)),
            _peak_working_bytes(lambda w=wav: codec.encode_chunked(w, chunk_frames=4)),
        )
        if frames == short:
            short_peaks = peaks
    assert peaks == short_peaks
    # The check has teeth: the offline calls' working tensors grow with the input.
    offline_short = _peak_working_bytes(lambda: codec.decode(_codes(codec, 2, short, 0)))
    offline_long = _peak_working_bytes(lambda: codec.decode(_codes(codec, 2, long, 0)))
    assert offline_long > 3 * offline_short
    # A long file may stay on the CPU in float64; only chunks are converted.
    samples = _noise(1, long * frame, 3).double()
    assert _peak_working_bytes(lambda: codec.encode_chunked(samples, chunk_frames=4)) == short_peaks[1]


def test_each_batch_row_equals_its_own_call(codec: MossAudioTokenizer) -> None:
    """Ragged rows: long rows stream (some end on a partial frame, some on a short last chunk),
    rows within one chunk run offline; rows of different schedules share steps without mixing."""
    frame = codec.frame_size
    lengths = [29 * frame + 500, 3 * frame, 11 * frame, frame + 1, 17 * frame + frame // 2]
    wav = _noise(len(lengths), max(lengths), seed=5)
    codes, code_lengths, latents = codec.encode_chunked(wav, lengths, chunk_frames=3)
    assert code_lengths.tolist() == [n // frame for n in lengths]
    for row, length in enumerate(lengths):
        alone, alone_lengths, alone_latents = codec.encode_chunked(wav[row : row + 1, :, :length], chunk_frames=3)
        width = alone.shape[-1]
        assert torch.equal(codes[:, row : row + 1, :width], alone), row
        assert not codes[:, row, width:].any() and not latents[row, :, width:].any()
        torch.testing.assert_close(latents[row : row + 1, :, :width], alone_latents, atol=2e-6, rtol=0)
        assert alone_lengths.tolist() == [length // frame]

    frames = [23, 3, 10, 1, 7]
    batch = _codes(codec, len(frames), max(frames), seed=6)
    audio, audio_lengths = codec.decode_chunked(batch, frames, chunk_frames=3)
    assert audio.shape == (len(frames), 1, max(frames) * frame)
    assert audio_lengths.tolist() == [n * frame for n in frames]
    for row, count in enumerate(frames):
        alone, _ = codec.decode_chunked(batch[:, row : row + 1, :count], chunk_frames=3)
        torch.testing.assert_close(audio[row : row + 1, :, : count * frame], alone, atol=2e-5, rtol=0)
        assert not audio[row, :, count * frame :].any()


def test_rows_within_one_chunk_are_encoded_offline(codec: MossAudioTokenizer) -> None:
    """As upstream: no streaming, and the zero-padded partial frame keeps its code (ceil frames)."""
    wav = _noise(1, 3 * codec.frame_size + 100, seed=7)
    codes, lengths, latents = codec.encode_chunked(wav, chunk_frames=4)
    offline, offline_lengths = codec.encode(wav)
    offline_latents, _ = codec.encode_latents(wav)
    assert codes.shape[-1] == 4 and torch.equal(codes, offline) and torch.equal(lengths, offline_lengths)
    torch.testing.assert_close(latents, offline_latents, atol=0, rtol=0)
    audio, _ = codec.decode_chunked(codes, chunk_frames=4)
    torch.testing.assert_close(audio, codec.decode(codes)[0], atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_equals_offline_while_the_window_holds(wide_codec: MossAudioTokenizer, chunk: int) -> None:
    frames = 20
    codes = _codes(wide_codec, 2, frames, seed=8)
    chunked, _ = wide_codec.decode_chunked(codes, chunk_frames=chunk)
    torch.testing.assert_close(chunked, wide_codec.decode(codes)[0], atol=2e-5, rtol=0)
    wav = _noise(2, frames * wide_codec.frame_size, seed=9)
    _, _, latents = wide_codec.encode_chunked(wav, chunk_frames=chunk)
    torch.testing.assert_close(latents, wide_codec.encode_latents(wav)[0], atol=2e-5, rtol=0)


def test_chunk_size_forms_and_limits(codec: MossAudioTokenizer) -> None:
    codes = _codes(codec, 1, 9, seed=10)
    by_frames, _ = codec.decode_chunked(codes, chunk_frames=2)
    by_seconds, _ = codec.decode_chunked(codes, chunk_duration=2 * codec.frame_size / codec.sample_rate)
    assert torch.equal(by_frames, by_seconds)
    window = codec.max_chunk_frames("decode")
    assert window == codec.max_chunk_frames("encode") == 4  # the tiny codec's 0.32 s window
    default, _ = codec.decode_chunked(codes)  # half the window
    assert torch.equal(default, by_frames)
    wav = _noise(1, 9 * codec.frame_size, seed=10)
    bad = [
        ({"chunk_frames": 2, "chunk_duration": 0.16}, "not both"),
        ({"chunk_duration": 0.1}, "whole number"),
        ({"chunk_duration": 0.0}, "whole number"),
        ({"chunk_frames": 0}, "1 to 4 frames"),
        ({"chunk_frames": window + 1}, "1 to 4 frames"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            codec.decode_chunked(codes, **kwargs)
        with pytest.raises(ConfigError, match=message):
            codec.encode_chunked(wav, **kwargs)
    with pytest.raises(ConfigError, match="lengths"):
        codec.encode_chunked(wav, [wav.shape[-1] + 1])
