"""Fixtures shared by the model tests; tests/models/conftest.py exposes them, other folders import them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from moss_agent.models.realtime.tiny import write_tokenizer
from moss_agent.models.tts_loading import LoadedTTS, load_tts
from tests.conftest import parity_model_dir
from tests.models.manifest import model_cases


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


def _parity_model(request: pytest.FixtureRequest) -> str:
    name = getattr(request.module, "PARITY_MODEL", None)
    if name is None:
        raise RuntimeError(f"{request.module.__name__} uses a parity fixture but sets no PARITY_MODEL")
    return name


@pytest.fixture(scope="module")
def model_dir(parity_dir: Path, request: pytest.FixtureRequest) -> Path:
    """The parity folder of the model the test module names in PARITY_MODEL ("realtime", "delay", "local")."""
    return parity_model_dir(parity_dir, _parity_model(request))


@pytest.fixture(scope="module")
def cases(parity_dir: Path, model_dir: Path, request: pytest.FixtureRequest) -> dict[str, dict]:
    """Case id -> manifest case for the module's PARITY_MODEL (skips with model_dir when absent)."""
    return model_cases(parity_dir, _parity_model(request))


@pytest.fixture(scope="module")
def goldens(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "goldens.safetensors"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedTTS:
    return load_tts(model_dir / "checkpoint", device="cpu", dtype="float32")


def drain_frames(gen: object, slot: int, limit: int = 400, *, with_eos: bool = True) -> list[torch.Tensor]:
    """Step a ``RealtimeGenerator`` until it has no work (at most ``limit`` ticks) -> the frames
    ``slot`` produced, its EOS frame included unless ``with_eos`` is False."""
    frames = []
    for _ in range(limit):
        if not gen.has_work():  # type: ignore[attr-defined]
            break
        out = gen.step()  # type: ignore[attr-defined]
        if out.produced[slot] and (with_eos or not out.eos[slot]):
            frames.append(out.frames[slot])
    return frames
