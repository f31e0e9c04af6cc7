"""Batch TTS models on CUDA: fp32 greedy equals the CPU goldens, bf16 runs the full pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moss_agent.models.batch_sampling import preset
from moss_agent.models.delay.processor import BatchPrompt
from moss_agent.models.delay.requests import TTSRequest
from moss_agent.models.tts_loading import load_tts
from tests.conftest import parity_model_dir
from tests.models import test_delay_generation, test_local_parity
from tests.models.manifest import manifest_ids, max_new_tokens, model_cases, output_key, prompt_of, require

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GENERATE_IDS = [("delay", i) for i in manifest_ids("delay", "generate")]
GENERATE_IDS += [("local", i) for i in manifest_ids("local", "generate")]


@pytest.mark.parametrize(("model", "case_id"), GENERATE_IDS)
def test_cuda_fp32_greedy_matches_goldens(parity_dir: Path, model: str, case_id: str):
    """Each generate case of the set, with its stated settings, on CUDA in fp32."""
    folder = parity_model_dir(parity_dir, model)
    case = require(case_id, model_cases(parity_dir, model))
    goldens = load_file(str(folder / "goldens.safetensors"))
    loaded = load_tts(folder / "checkpoint", device="cuda", dtype="float32")
    options = {}
    if model == "local":
        params = test_local_parity.stated_params(case)
        options["n_vq_for_inference"] = test_local_parity.stated_n_vq(case)
    else:
        params = test_delay_generation.stated_params(case)
    results = loaded.generate(
        BatchPrompt(*prompt_of(case, goldens)),
        params=params,
        max_new_tokens=max_new_tokens(case),
        upstream_compatible=True,
        **options,
    )
    for index, result in enumerate(results):
        assert torch.equal(result.rows, goldens[output_key(case, "output_ids", index)])


@pytest.mark.parametrize("model", ["delay", "local"])
def test_cuda_bf16_sampling_batch(parity_dir: Path, model: str):
    folder = parity_model_dir(parity_dir, model)
    loaded = load_tts(folder / "checkpoint", device="cuda")
    assert loaded.model.dtype == torch.bfloat16
    n_vq = loaded.config.n_vq
    ref = torch.randint(0, loaded.config.audio_vocab_size, (6, n_vq))
    requests = [TTSRequest("Hello from the GPU."), TTSRequest("Clone this voice.", reference=ref)]
    params = preset("moss-tts" if model == "delay" else "moss-tts-local")
    results = loaded.generate(
        requests, params=params, max_new_tokens=24, generator=torch.Generator("cuda").manual_seed(0)
    )
    assert len(results) == 2
    for result in results:
        assert result.rows.device.type == "cpu"
        for segment in result.segments:
            assert segment.shape[1] == n_vq and int(segment.max()) < loaded.config.audio_vocab_size
