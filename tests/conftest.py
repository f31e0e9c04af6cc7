from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # The models under test are tiny: one thread avoids oversubscribing small CI machines, where
    # intra-op threads of parallel test processes (and helper threads) fight for two cores.
    import torch

    torch.set_num_threads(1)


REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def _parity_root() -> Path | None:
    """Upstream-computed goldens: $MOSS_PARITY_DIR, else ../shared/parity, else the copy in fixtures."""
    candidates = [os.environ.get("MOSS_PARITY_DIR"), REPO.parent / "shared" / "parity", FIXTURES / "parity"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _audio_root() -> Path | None:
    for candidate in (REPO.parent / "shared" / "audio", FIXTURES / "audio"):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    return None


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    root = _parity_root()
    if root is None:
        pytest.skip("parity goldens not found (set MOSS_PARITY_DIR or keep ../shared/parity)")
    return root


def parity_model_dir(root: Path, model: str) -> Path:
    folder = root / model
    if not folder.is_dir():
        pytest.skip(f"parity goldens for {model} are not in {root}")
    return folder


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    root = _audio_root()
    if root is None:
        pytest.skip("real speech recordings not found (../shared/audio or tests/fixtures/audio)")
    return root


@pytest.fixture(scope="session")
def tiny_codec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random codec with the realtime model's 16 codebooks of 1024 codes."""
    from moss_agent.models.codec.tiny import save_tiny_codec

    return save_tiny_codec(tmp_path_factory.mktemp("tiny_codec"), seed=7, num_quantizers=16, codebook_size=1024)


@pytest.fixture(scope="session")
def tiny_realtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MOSS-TTS-Realtime checkpoint (hidden 64, 2 + 2 layers, the real vocabulary)."""
    from moss_agent.models.realtime.tiny import save_tiny_realtime

    return save_tiny_realtime(tmp_path_factory.mktemp("tiny_realtime"), seed=3)


@pytest.fixture(scope="session")
def tiny_realtime_endless_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_realtime_dir, but its audio-EOS logit is always 0 while the others spread around it,
    so greedy turns run to their frame cap: pipeline tests get replies long enough to talk over."""
    from moss_agent.models.realtime.tiny import save_tiny_realtime

    return save_tiny_realtime(tmp_path_factory.mktemp("tiny_realtime_endless"), seed=3, eos_gain=0.0)
