"""Batch TTS models on CUDA: fp32 greedy equals the CPU goldens, bf16 runs the full pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moss_agent.models.batch_sampling import SamplingParams, preset
from moss_agent.models.delay.processor import BatchPrompt
from moss_agent.models.delay.requests import TTSRequest
from moss_agent.models.tts_loading import load_tts
from tests.conftest import parity_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("model", ["delay", "local"])
def test_cuda_fp32_greedy_matches_goldens(parity_dir: Path, model: str):
    folder = parity_model_dir(parity_dir, model)
    goldens = load_file(str(folder / "goldens.safetensors"))
    loaded = load_tts(folder / "checkpoint", device="cuda", dtype="float32")
    case = "reference"
    results = loaded.generate(
        _prompt(goldens, model, case),
        params=SamplingParams().greedy(),
        max_new_tokens=30 if model == "delay" else 10,
        upstream_compatible=True,
    )
    expected = goldens[f"{model}.generate.{case}.0.output_ids"]
    assert torch.equal(results[0].rows, expected)


def _prompt(goldens: dict[str, torch.Tensor], model: str, case: str) -> BatchPrompt:
    return BatchPrompt(
        goldens[f"{model}.proc.{case}.input_ids"], goldens[f"{model}.proc.{case}.attention_mask"]
    )


@pytest.mark.parametrize("model", ["delay", "local"])
def test_cuda_bf16_sampling_batch(parity_dir: Path, model: str):
    folder = parity_model_dir(parity_dir, model)
    loaded = load_tts(folder / "checkpoint", device="cuda")
    assert loaded.model.dtype == torch.bfloat16
    n_vq = loaded.config.n_vq
    ref = torch.randint(0, 1024, (6, n_vq))
    requests = [TTSRequest("Hello from the GPU."), TTSRequest("Clone this voice.", reference=ref)]
    params = preset("moss-tts" if model == "delay" else "moss-tts-local")
    results = loaded.generate(
        requests, params=params, max_new_tokens=24, generator=torch.Generator("cuda").manual_seed(0)
    )
    assert len(results) == 2
    for result in results:
        assert result.rows.device.type == "cpu"
        for segment in result.segments:
            assert segment.shape[1] == n_vq and int(segment.max()) < 1024
