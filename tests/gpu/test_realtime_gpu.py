"""MOSS-TTS-Realtime on CUDA: parity goldens in fp32, batched bf16 generation with isolated slots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moss_agent.models.realtime import RealtimeGenerator, SamplingConfig, load_realtime, save_tiny_realtime
from tests.conftest import parity_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_parity_stream_on_gpu(parity_dir: Path) -> None:
    folder = parity_model_dir(parity_dir, "realtime")
    goldens = load_file(str(folder / "goldens.safetensors"))
    cases = {c["id"]: c for c in json.loads((parity_dir / "manifest.json").read_text())["cases"]}
    model, tokenizer = load_realtime(folder / "checkpoint", device="cuda", dtype="float32")
    with torch.inference_mode():
        hidden = model(goldens["a.input_ids"].cuda()).cpu()
    assert (hidden - goldens["a.last_hidden_state"]).abs().max() <= 1e-4
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256, upstream_compat=True)
    gen.start_conversation(1)
    gen.start_turn(1, sampling=SamplingConfig(greedy=True, mask_special_codes=False), max_frames=20)
    gen.push_tokens(1, cases["realtime.stream_no_voice_prompt"]["inputs"]["text_token_ids"])
    gen.end_text(1)
    frames = []
    while gen.has_work():
        out = gen.step()
        if out.produced[1]:
            frames.append(out.frames[1])
    assert torch.equal(torch.stack(frames), goldens["b1.frames"])


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
