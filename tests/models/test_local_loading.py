"""Local v1 loading keeps what the checkpoint holds at the embeddings' padding rows.

Upstream's loader zeroes the text pad row and the audio pad rows whatever the file holds (bug 1 of
the parity notes); ours loads the file as saved, as the realtime loader does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moss_agent.models.local.tiny import save_tiny_local
from moss_agent.models.tts_loading import LoadedTTS, load_tts

pytestmark = pytest.mark.usefixtures("one_thread")


def _pad_rows(loaded: LoadedTTS) -> list[tuple[str, int]]:
    """(state-dict key, row) of every padding row: the text pad, then each codebook's pad code."""
    config = loaded.config
    rows = [("model.embedding_list.0.weight", config.pad_token_id)]
    return rows + [(f"model.embedding_list.{c}.weight", config.audio_pad_code) for c in range(1, config.n_vq + 1)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(as written, with zero padding rows; the same with random non-zero padding rows)."""
    zero = save_tiny_local(tmp_path_factory.mktemp("local_zero_pads"), n_vq=3, seed=21)
    edited = tmp_path_factory.mktemp("local_filled_pads")
    for item in zero.iterdir():
        (edited / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(zero / "model.safetensors"))
    generator = torch.Generator().manual_seed(22)
    for key, row in _pad_rows(load_tts(zero, device="cpu", dtype="float32")):
        assert not weights[key][row].any(), "the tiny writer stores zero padding rows"
        weights[key][row] = torch.randn(weights[key].shape[-1], generator=generator).to(weights[key].dtype)
    save_file(weights, str(edited / "model.safetensors"), metadata={"format": "pt"})
    return zero, edited


def test_padding_rows_load_as_the_file_holds(checkpoints: tuple[Path, Path]) -> None:
    _, edited = checkpoints
    stored = load_file(str(edited / "model.safetensors"))
    loaded = load_tts(edited, device="cpu", dtype="float32")
    state = loaded.model.state_dict()
    for key, row in _pad_rows(loaded):
        assert stored[key][row].any()
        assert torch.equal(state[key][row], stored[key][row].float()), key


def test_forward_uses_the_files_padding_rows(checkpoints: tuple[Path, Path]) -> None:
    zero, edited = checkpoints
    with_zeros = load_tts(zero, device="cpu", dtype="float32")
    filled = load_tts(edited, device="cpu", dtype="float32")
    stored = load_file(str(edited / "model.safetensors"))
    config = filled.config
    # Two rows of real ids, then a row of padding in every channel (as left padding or a pad frame has).
    ids = torch.randint(0, config.audio_pad_code, (1, 3, 1 + config.n_vq), generator=torch.Generator().manual_seed(1))
    ids[0, -1, 0] = config.pad_token_id
    ids[0, -1, 1:] = config.audio_pad_code
    padding_sum = sum(stored[key][row].float() for key, row in _pad_rows(filled))
    torch.testing.assert_close(filled.model.embed(ids)[0, -1], padding_sum, atol=1e-6, rtol=0)
    assert not with_zeros.model.embed(ids)[0, -1].any()
    # Rows before the padding row never see it (causal), so only the last hidden state moves.
    hidden, reference = filled.model(ids), with_zeros.model(ids)
    torch.testing.assert_close(hidden[:, :-1], reference[:, :-1], atol=0, rtol=0)
    assert (hidden[:, -1] - reference[:, -1]).abs().max() > 1e-3
