"""Fixtures shared by the model tests; tests/models/conftest.py exposes them, other folders import them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from moss_agent.models.realtime.tiny import write_tokenizer
from moss_agent.models.tts_loading import LoadedTTS, load_tts
from tests.conftest import parity_model_dir


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and two threads stall badly on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The realtime model's text tokenizer, written by the tiny-checkpoint helper."""
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


@pytest.fixture(scope="module")
def model_dir(parity_dir: Path, request: pytest.FixtureRequest) -> Path:
    """The parity folder of the model the test module names in PARITY_MODEL ("delay" or "local")."""
    name = getattr(request.module, "PARITY_MODEL", None)
    if name is None:
        raise RuntimeError(f"{request.module.__name__} uses model_dir but sets no PARITY_MODEL")
    return parity_model_dir(parity_dir, name)


@pytest.fixture(scope="module")
def goldens(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "goldens.safetensors"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedTTS:
    return load_tts(model_dir / "checkpoint", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def generation_cases(model_dir: Path) -> dict:
    return json.loads((model_dir / "cases.json").read_text())["generation"]
