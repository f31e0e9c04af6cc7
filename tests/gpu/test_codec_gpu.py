"""The codec on CUDA: upstream parity in fp32, bf16 close to it, multi-slot streaming, CUDA-graph capture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moss_agent.models.codec import MossAudioTokenizer, load_codec
from moss_agent.models.codec.tiny import save_tiny_codec
from tests.conftest import parity_model_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ATOL_AUDIO = 3.814697265625e-05  # manifest models.codec.atol_audio
ATOL_HIDDEN = 5.9604644775390625e-06


@pytest.fixture(scope="module")
def folder(parity_dir: Path) -> Path:
    return parity_model_dir(parity_dir, "codec")


@pytest.fixture(scope="module")
def tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(str(folder / "inputs.safetensors")), load_file(str(folder / "outputs.safetensors"))


@pytest.fixture(scope="module")
def codec(folder: Path) -> MossAudioTokenizer:
    return load_codec(folder / "checkpoint", device="cuda", dtype=torch.float32)


def test_parity_in_fp32_on_cuda(codec: MossAudioTokenizer, tensors: tuple[dict, dict]) -> None:
    inputs, outputs = tensors
    for wave in ("w1p0s", "w2p3s", "w1p2s"):
        codes, lengths = codec.encode(inputs[f"wave.{wave}"][None, None].cuda())
        assert torch.equal(codes.cpu(), outputs[f"codec.encode.{wave}.audio_codes"])
        assert torch.equal(lengths.cpu(), outputs[f"codec.encode.{wave}.audio_codes_lengths"])
        latents, _ = codec.encode_latents(inputs[f"wave.{wave}"][None, None].cuda())
        torch.testing.assert_close(latents.cpu(), outputs[f"codec.encode.{wave}.encoder_hidden_states"],
                                   atol=ATOL_HIDDEN, rtol=0)
    wav, _ = codec.decode(inputs["codes.decode"].cuda())
    torch.testing.assert_close(wav.cpu(), outputs["codec.decode.audio"], atol=ATOL_AUDIO, rtol=0)
    for frames in (1, 3):
        state = codec.init_decode_state(1)
        codes = inputs["codes.decode"].cuda()
        for index, start in enumerate(range(0, codes.shape[-1], frames)):
            chunk = codec.decode_step(codes[:, :, start : start + frames], state)
            expected = outputs[f"codec.streaming_decode.{frames}frame.chunk_{index:03d}"]
            torch.testing.assert_close(chunk.cpu(), expected, atol=ATOL_AUDIO, rtol=0)


def test_bf16_is_close_on_cuda(folder: Path, codec: MossAudioTokenizer, tensors: tuple[dict, dict]) -> None:
    inputs, outputs = tensors
    half = load_codec(folder / "checkpoint", device="cuda", dtype=torch.bfloat16)
    wav, _ = half.decode(inputs["codes.decode"].cuda())
    expected = outputs["codec.decode.audio"]
    assert float((wav.cpu() - expected).norm() / expected.norm()) < 0.05
    codes, _ = half.encode(inputs["wave.w2p3s"][None, None].cuda())
    assert (codes[:2].cpu() == outputs["codec.encode.w2p3s.audio_codes"][:2]).float().mean() > 0.8


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
