"""MOSS-TTS-Realtime on CUDA: parity goldens in fp32, batched bf16 generation with isolated slots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moss_agent.models.realtime import RealtimeGenerator, SamplingConfig, load_realtime, save_tiny_realtime
from tests.conftest import parity_model_dir
from tests.models.manifest import case_kind, golden_key, model_cases, model_info
from tests.models.test_realtime_parity import chain_of, replay, stream_generator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_HIDDEN_ATOL = 1e-4  # CUDA kernels move fp32 results further than the CPU-derived atol


def test_parity_stream_on_gpu(parity_dir: Path) -> None:
    """The teacher-forced hidden states and every stream case of the set, in fp32 on CUDA."""
    folder = parity_model_dir(parity_dir, "realtime")
    goldens = load_file(str(folder / "goldens.safetensors"))
    cases = model_cases(parity_dir, "realtime")
    driver = model_info(parity_dir, "realtime").get("sampling", {})
    model, tokenizer = load_realtime(folder / "checkpoint", device="cuda", dtype="float32")
    for case in cases.values():
        if case_kind(case) == "teacher_forced":
            with torch.inference_mode():
                hidden = model(goldens[golden_key(case["inputs"]["input_ids"])].cuda()).cpu()
            expected = goldens[golden_key(case["outputs"]["last_hidden_state"])]
            assert (hidden - expected).abs().max() <= GPU_HIDDEN_ATOL
    ends = [c["id"] for c in cases.values() if case_kind(c) == "stream"]
    ends = [i for i in ends if not any(i in chain_of(j, cases)[:-1] for j in ends)]  # longest chains only
    for end in ends:
        gen = stream_generator((model, tokenizer), cases, goldens, driver, num_slots=2)
        for case in chain_of(end, cases):
            replay(gen, 1, case, goldens, driver, hidden_atol=GPU_HIDDEN_ATOL)


def test_bf16_slots_are_isolated(tmp_path: Path) -> None:
    folder = save_tiny_realtime(tmp_path / "tiny", hidden=128, heads=8, kv_heads=4, eos_gain=0.0)
    model, tokenizer = load_realtime(folder, device="cuda", dtype="bfloat16")
    assert model.dtype == torch.bfloat16

    def run(with_others: bool) -> torch.Tensor:
        gen = RealtimeGenerator(model, tokenizer, num_slots=4, max_context=512)
        active = [0, 1, 3] if with_others else [1]
        for slot in active:
            gen.start_conversation(slot)
            gen.start_turn(slot, "Hi", None, sampling=SamplingConfig(), seed=slot, max_frames=30)
            gen.push_text(slot, "Hello there, this is a test on the GPU. " * (slot + 1))
            gen.end_text(slot)
        frames = []
        while gen.has_work():
            out = gen.step()
            if out.produced[1]:
                frames.append(out.frames[1])
        return torch.stack(frames)

    assert torch.equal(run(False), run(True))
