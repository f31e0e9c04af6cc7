"""Every codec case of the upstream parity goldens (../shared/parity/codec), reproduced on the CPU in fp32.

Chunked encode/decode and streaming decode goldens come from upstream's B=1 streaming; they are
replayed through our multi-slot state API (as slot 0 of one, and of a batch of several streams).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moss_agent.models.codec import MossAudioTokenizer, load_codec
from tests.conftest import parity_model_dir

WAVES = ["w1p0s", "w2p3s", "w1p2s"]


class Goldens:
    def __init__(self, root: Path) -> None:
        folder = parity_model_dir(root, "codec")
        self.folder = folder
        self.inputs = load_file(str(folder / "inputs.safetensors"))
        self.outputs = load_file(str(folder / "outputs.safetensors"))
        manifest = json.loads((root / "manifest.json").read_text())
        self.cases = {case["id"]: case for case in manifest["cases"] if case["model"] == "codec"}
        info = manifest["models"]["codec"]
        self.atol_hidden = float(info["atol_encoder_hidden_states"])
        self.atol_audio = float(info["atol_audio"])
        self.contexts = info["contexts_tokens"]

    def close_audio(self, actual: torch.Tensor, key: str) -> None:
        expected = self.outputs[key]
        assert actual.shape == expected.shape, key
        torch.testing.assert_close(actual, expected, atol=self.atol_audio, rtol=0, msg=key)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models run fastest on one thread, and two threads stall badly on a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def goldens(parity_dir: Path) -> Goldens:
    return Goldens(parity_dir)


@pytest.fixture(scope="module")
def codec(goldens: Goldens) -> MossAudioTokenizer:
    return load_codec(goldens.folder / "checkpoint", device="cpu", dtype=torch.float32)


def test_every_codec_case_is_covered(goldens: Goldens) -> None:
    covered = {f"codec.encode.{w}" for w in WAVES} | {
        "codec.encode_chunked.w2p3s", "codec.batch_encode", "codec.decode", "codec.batch_decode",
        "codec.decode_of_encode.w1p0s", "codec.decode_chunked", "codec.streaming_decode.1frame",
        "codec.streaming_decode.3frame",
    }
    assert set(goldens.cases) == covered


def test_sizes_come_from_the_config(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    config = json.loads((goldens.folder / "checkpoint" / "config.json").read_text())
    assert codec.sample_rate == 24000 and codec.frame_size == 1920
    assert codec.num_quantizers == config["quantizer_kwargs"]["num_quantizers"]
    assert codec.codebook_size == config["quantizer_kwargs"]["codebook_size"]
    assert [stage.capacity for stage in codec._transformers(codec.encoder)] == goldens.contexts["encoder"]
    assert [stage.capacity for stage in codec._transformers(codec.decoder)] == goldens.contexts["decoder"]


@pytest.mark.parametrize("wave", WAVES)
def test_encode(codec: MossAudioTokenizer, goldens: Goldens, wave: str) -> None:
    samples = goldens.inputs[f"wave.{wave}"]
    key = f"codec.encode.{wave}"
    codes, lengths = codec.encode(samples[None, None])
    assert torch.equal(codes, goldens.outputs[f"{key}.audio_codes"])
    assert torch.equal(lengths, goldens.outputs[f"{key}.audio_codes_lengths"])
    facts = goldens.cases[key]["facts"]
    assert codes.shape[-1] == facts["ceil_frames"] and int(lengths[0]) == facts["floor_length"]
    latents, frame_lengths = codec.encode_latents(samples[None])  # [B, T] input form too
    torch.testing.assert_close(latents, goldens.outputs[f"{key}.encoder_hidden_states"],
                               atol=goldens.atol_hidden, rtol=0)
    assert torch.equal(frame_lengths, lengths)
    prefix, _ = codec.encode(samples[None, None], num_quantizers=3)
    assert torch.equal(prefix, goldens.outputs[f"{key}.prefix3.audio_codes"])
    assert torch.equal(prefix, codes[:3])


def test_batch_encode_pads_and_keeps_floor_lengths(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    first, second = goldens.inputs["wave.w1p0s"], goldens.inputs["wave.w2p3s"]
    batch = torch.zeros(2, 1, max(first.numel(), second.numel()))
    batch[0, 0, : first.numel()] = first
    batch[1, 0, : second.numel()] = second
    lengths = torch.tensor([first.numel(), second.numel()])
    codes, code_lengths = codec.encode(batch, lengths=lengths)
    assert torch.equal(codes, goldens.outputs["codec.batch_encode.audio_codes"])
    assert torch.equal(code_lengths, goldens.outputs["codec.batch_encode.audio_codes_lengths"])
    latents, _ = codec.encode_latents(batch, lengths)
    torch.testing.assert_close(latents, goldens.outputs["codec.batch_encode.encoder_hidden_states"],
                               atol=goldens.atol_hidden, rtol=0)


def test_decode_and_prefix_decode(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    codes = goldens.inputs["codes.decode"]
    wav, lengths = codec.decode(codes)
    goldens.close_audio(wav, "codec.decode.audio")
    assert torch.equal(lengths, goldens.outputs["codec.decode.audio_lengths"])
    prefix, _ = codec.decode(codes[:3])
    goldens.close_audio(prefix, "codec.decode.prefix3.audio")


def test_batch_decode(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    first, second = goldens.inputs["codes.decode"][:, 0], goldens.inputs["codes.decode_b"]
    codes = torch.zeros(first.shape[0], 2, first.shape[1], dtype=torch.long)
    codes[:, 0] = first
    codes[:, 1, : second.shape[1]] = second
    wav, lengths = codec.decode(codes, lengths=[first.shape[1], second.shape[1]])
    goldens.close_audio(wav, "codec.batch_decode.audio")
    assert torch.equal(lengths, goldens.outputs["codec.batch_decode.audio_lengths"])


def test_decode_of_encode(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    wav, _ = codec.decode(goldens.outputs["codec.encode.w1p0s.audio_codes"])
    goldens.close_audio(wav, "codec.decode_of_encode.w1p0s.audio")


def _stream_decode(codec: MossAudioTokenizer, codes: torch.Tensor, frames: int, slots: int = 1) -> list[torch.Tensor]:
    """Feed codes [nq, 1, N] to slot 0 of a ``slots``-wide state, ``frames`` per step; other slots get noise."""
    state = codec.init_decode_state(slots)
    generator = torch.Generator().manual_seed(7)
    chunks = []
    for start in range(0, codes.shape[-1], frames):
        piece = codes[:, :, start : start + frames]
        if slots > 1:
            others = torch.randint(0, codec.codebook_size, (piece.shape[0], slots - 1, piece.shape[-1]),
                                   generator=generator)
            piece = torch.cat([piece, others], dim=1)
        chunks.append(codec.decode_step(piece, state)[:1])
    return chunks


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("slots", [1, 4])
def test_streaming_decode(codec: MossAudioTokenizer, goldens: Goldens, frames: int, slots: int) -> None:
    case = goldens.cases[f"codec.streaming_decode.{frames}frame"]
    chunks = _stream_decode(codec, goldens.inputs["codes.decode"], frames, slots)
    assert len(chunks) == case["facts"]["num_calls"]
    for index, chunk in enumerate(chunks):
        goldens.close_audio(chunk, f"codec.streaming_decode.{frames}frame.chunk_{index:03d}")


def test_streaming_departs_from_offline_where_upstream_does(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    """Upstream semantics, not noise: frames agree with offline decode until the first stage window fills."""
    codes = goldens.inputs["codes.decode"]
    offline, _ = codec.decode(codes)
    streamed = torch.cat(_stream_decode(codec, codes, 1), dim=-1)
    gaps = (streamed - offline).abs().reshape(codes.shape[-1], -1).amax(-1)
    first = goldens.cases["codec.streaming_decode.1frame"]["facts"]["first_frame_differing_from_offline_decode"]
    assert float(gaps[:first].max()) <= goldens.atol_audio
    assert float(gaps[first]) > 100 * goldens.atol_audio


def test_chunked_decode(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    wav = torch.cat(_stream_decode(codec, goldens.inputs["codes.decode"], 2), dim=-1)
    goldens.close_audio(wav, "codec.decode_chunked.audio")


@pytest.mark.parametrize("slots", [1, 3])
def test_chunked_encode(codec: MossAudioTokenizer, goldens: Goldens, slots: int) -> None:
    """encode(chunk_duration=0.16): 2 whole frames per step; the trailing partial frame is dropped."""
    samples = goldens.inputs["wave.w2p3s"]
    frames = samples.numel() // codec.frame_size
    whole = samples[: frames * codec.frame_size].reshape(1, 1, -1)
    batch = torch.cat([whole, torch.randn(slots - 1, 1, whole.shape[-1])]) if slots > 1 else whole
    state = codec.init_encode_state(slots)
    codes, latents = [], []
    step = 2 * codec.frame_size
    for start in range(0, whole.shape[-1], step):
        hidden = codec.encode_latents_step(batch[..., start : start + step], state)
        latents.append(hidden[:1])
        codes.append(codec.quantizer.encode(hidden.transpose(1, 2), None, codec.num_quantizers)[:, :1])
    expected = goldens.outputs["codec.encode_chunked.w2p3s.audio_codes"]
    assert torch.equal(torch.cat(codes, dim=-1), expected)
    assert expected.shape[-1] == goldens.cases["codec.encode_chunked.w2p3s"]["facts"]["frames"]
    torch.testing.assert_close(torch.cat(latents, dim=-1),
                               goldens.outputs["codec.encode_chunked.w2p3s.encoder_hidden_states"],
                               atol=goldens.atol_hidden, rtol=0)
    # encode_step is the same path with the quantizer attached.
    state = codec.init_encode_state(slots)
    stepped = torch.cat([codec.encode_step(batch[..., s : s + step], state)[:, :1]
                         for s in range(0, whole.shape[-1], step)], dim=-1)
    assert torch.equal(stepped, expected)
