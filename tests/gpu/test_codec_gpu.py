"""The codec on CUDA: upstream parity in fp32, bf16 close to it, multi-slot streaming, CUDA-graph capture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moss_agent.models.codec import MossAudioTokenizer, load_codec
from moss_agent.models.codec.tiny import save_tiny_codec
from tests.models.test_codec_parity import Goldens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def goldens(parity_dir: Path) -> Goldens:
    return Goldens(parity_dir)


@pytest.fixture(scope="module")
def codec(goldens: Goldens) -> MossAudioTokenizer:
    return load_codec(goldens.folder / "checkpoint", device="cuda", dtype=torch.float32)


def test_parity_in_fp32_on_cuda(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    for case in goldens.of_kind("encode"):
        samples = goldens.tensor(case["inputs"]["input_values"])[None, None].cuda()
        codes, lengths = codec.encode(samples)
        assert torch.equal(codes.cpu(), goldens.tensor(case["outputs"]["audio_codes"])), case["id"]
        assert torch.equal(lengths.cpu(), goldens.tensor(case["outputs"]["audio_codes_lengths"]))
        latents, _ = codec.encode_latents(samples)
        goldens.close_hidden(latents.cpu(), goldens.tensor(case["outputs"]["encoder_hidden_states"]), case["id"])
    for case in goldens.of_kind("decode"):
        wav, _ = codec.decode(goldens.tensor(case["inputs"]["audio_codes"]).cuda())
        goldens.close_audio(wav.cpu(), goldens.tensor(case["outputs"]["audio"]), case["id"])
    for case in goldens.of_kind("streaming_decode"):
        codes = goldens.tensor(case["inputs"]["audio_codes"]).cuda()
        frames = case["inputs"]["frames_per_call"]
        state = codec.init_decode_state(1)
        expected = goldens.chunks(case["outputs"]["chunks"])
        for index, start in enumerate(range(0, codes.shape[-1], frames)):
            chunk = codec.decode_step(codes[:, :, start : start + frames], state)
            goldens.close_audio(chunk.cpu(), expected[index], f"{case['id']} call {index}")


def test_bf16_is_close_on_cuda(goldens: Goldens) -> None:
    half = load_codec(goldens.folder / "checkpoint", device="cuda", dtype=torch.bfloat16)
    for case in goldens.of_kind("decode"):
        wav, _ = half.decode(goldens.tensor(case["inputs"]["audio_codes"]).cuda())
        expected = goldens.tensor(case["outputs"]["audio"])
        assert float((wav.cpu() - expected).norm() / expected.norm()) < 0.05
    for case in goldens.of_kind("encode"):
        codes, _ = half.encode(goldens.tensor(case["inputs"]["input_values"])[None, None].cuda())
        expected = goldens.tensor(case["outputs"]["audio_codes"])
        assert (codes[:2].cpu() == expected[:2]).float().mean() > 0.8


def test_multi_slot_streaming_on_cuda(tmp_path: Path) -> None:
    gpu = load_codec(save_tiny_codec(tmp_path, seed=2), device="cuda", dtype=torch.float32)
    cpu = load_codec(tmp_path, device="cpu", dtype=torch.float32)
    codes = torch.randint(0, gpu.codebook_size, (gpu.num_quantizers, 4, 15), generator=torch.Generator().manual_seed(0))
    gpu_state, cpu_state = gpu.init_decode_state(4), cpu.init_decode_state(4)
    active = torch.tensor([True, True, False, True])
    for start in range(0, 15, 3):
        piece = codes[:, :, start : start + 3]
        on_gpu = gpu.decode_step(piece.cuda(), gpu_state, active.cuda())
        on_cpu = cpu.decode_step(piece, cpu_state, active)
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)
    gpu_state.reset([0])
    assert gpu_state.frames.tolist() == [0, 15, 0, 15]


def test_decode_step_can_be_captured_in_a_cuda_graph(tmp_path: Path) -> None:
    codec = load_codec(save_tiny_codec(tmp_path, seed=6), device="cuda", dtype=torch.float32)
    codes = torch.randint(0, codec.codebook_size, (codec.num_quantizers, 3, 8), device="cuda")
    eager_state = codec.init_decode_state(3)
    eager = [codec.decode_step(codes[:, :, t : t + 1], eager_state) for t in range(8)]

    state = codec.init_decode_state(3)
    static_codes = codes[:, :, :1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up builds the quantizer tables outside the capture
        codec.decode_step(static_codes, codec.init_decode_state(3))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = codec.decode_step(static_codes, state)
    assert state.frames.tolist() == [0, 0, 0]  # capture records kernels without running them
    for t in range(8):
        static_codes.copy_(codes[:, :, t : t + 1])
        graph.replay()
        torch.testing.assert_close(static_out, eager[t], atol=1e-5, rtol=0)
