"""Loading MOSS-TTS-Realtime checkpoints: the official key layout, dtype handling, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moss_agent.errors import CheckpointError, ConfigError
from moss_agent.models.realtime import RealtimeConfig, load_realtime, save_tiny_realtime
from moss_agent.models.realtime.model import expected_checkpoint_shapes

UNUSED = "language_model.embed_tokens.weight"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_realtime(tmp_path_factory.mktemp("rt") / "tiny", seed=4, hidden=32)


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    return folder


def _edit_weights(folder: Path, edit) -> None:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_tiny_checkpoint_round_trip(tiny_dir: Path) -> None:
    model, tokenizer = load_realtime(tiny_dir, device="cpu", dtype="float32")
    stored = load_file(str(tiny_dir / "model.safetensors"))
    assert stored[UNUSED].dtype == torch.bfloat16 and UNUSED not in model.state_dict()
    ours = model.state_dict()
    assert set(stored) - {UNUSED} == set(ours)
    for key, value in ours.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, stored[key].float()), key  # bf16 -> fp32 is exact
    assert tokenizer.convert_tokens_to_ids("<|text_pad|>") == model.config.text_pad_id
    assert model.config.hidden_size == 32 and model.language_model.config.num_hidden_layers == 2


def test_bf16_load_and_eager_attention(tiny_dir: Path) -> None:
    reference, _ = load_realtime(tiny_dir, device="cpu", dtype="float32")
    half, _ = load_realtime(tiny_dir, device="cpu", dtype="bfloat16")
    eager, _ = load_realtime(tiny_dir, device="cpu", dtype="float32", attn_implementation="eager")
    assert half.dtype == torch.bfloat16
    ids = torch.full((1, 20, 17), 1024)
    ids[0, :, 0] = torch.arange(100, 120)
    ids[0, 10:, 1:] = torch.randint(0, 1024, (10, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(ids)
        assert torch.allclose(eager(ids), expected, atol=1e-5)
        cache = eager.new_backbone_cache(1, 32)
        assert torch.allclose(eager.prefill(cache, 0, ids[0], 0), expected[0], atol=1e-5)
        assert (half(ids).float() - expected).abs().max() < 0.1


def test_full_size_key_layout_matches_upstream(parity_dir: Path) -> None:
    listing = json.loads((parity_dir / "fullsize_state_dict_keys.json").read_text())["realtime"]["keys"]
    qwen3_1p7b = {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "max_position_embeddings": 40960,
    }
    local = {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 1.0},
    }
    config = RealtimeConfig.from_dict({"language_config": qwen3_1p7b, "local_config": local})
    shapes = {key: list(shape) for key, shape in expected_checkpoint_shapes(config).items()}
    assert shapes == listing


def test_missing_and_misshaped_keys_are_named(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path)

    def damage(state: dict[str, torch.Tensor]) -> None:
        del state["local_transformer.local_lm_heads.3.weight"]
        state["embed_tokens.2.weight"] = state["embed_tokens.2.weight"][:100].clone()
        state["extra.weight"] = torch.zeros(2)

    _edit_weights(folder, damage)
    with pytest.raises(CheckpointError) as info:
        load_realtime(folder, device="cpu")
    message = str(info.value)
    assert "local_transformer.local_lm_heads.3.weight" in message
    assert "embed_tokens.2.weight: checkpoint (100, 32)" in message
    assert "extra.weight" in message


def test_unused_backbone_embedding_may_be_absent(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path)
    _edit_weights(folder, lambda state: state.pop(UNUSED))
    model, _ = load_realtime(folder, device="cpu")
    assert model.language_model.embed_tokens is None


def test_config_and_tokenizer_errors(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    with pytest.raises(CheckpointError, match=r"model_type 'qwen3', not MOSS-TTS-Realtime"):
        load_realtime(folder, device="cpu")
    (folder / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "language_config"})
    )
    with pytest.raises(CheckpointError, match="language_config"):
        load_realtime(folder, device="cpu")
    (folder / "config.json").write_text(json.dumps(config))
    text = (folder / "tokenizer.json").read_text().replace('"<|text_pad|>"', '"<|image_pad|>"')
    (folder / "tokenizer.json").write_text(text)
    config_text = (folder / "tokenizer_config.json").read_text().replace('"<|text_pad|>"', '"<|image_pad|>"')
    (folder / "tokenizer_config.json").write_text(config_text)
    with pytest.raises(CheckpointError, match="text_pad"):
        load_realtime(folder, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_realtime(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ConfigError, match="flash"):
        load_realtime(tiny_dir, device="cpu", attn_implementation="flash_attention_2")


def test_random_model_made_in_place_follows_the_checkpoint_rules() -> None:
    """The benchmark's in-place random model (used for the full 1.7B shape) has every weight of the
    checkpoint layout filled: no uninitialised memory, zero audio pad rows, scaled EOS logit row."""
    from moss_agent.models.realtime.tiny import random_realtime_model, tiny_config

    config = tiny_config(hidden=32)
    model = random_realtime_model(config, torch.device("cpu"), torch.float32, seed=3, eos_gain=4.0)
    state = model.state_dict()
    assert set(state) == set(expected_checkpoint_shapes(config)) - {UNUSED}
    assert all(bool(torch.isfinite(value).all()) for value in state.values())
    assert not bool(state["local_transformer.local_lm_heads.0.weight"].eq(0).any())
    for key, value in state.items():
        if "embed_tokens" in key and value.shape[0] == config.audio_vocab_size:
            assert bool(value[config.audio_pad].eq(0).all()) and bool(value[config.audio_pad + 1].ne(0).any())
    head = state["local_transformer.local_lm_heads.0.weight"]
    assert float(head[config.audio_eos].norm()) > 2 * float(head[: config.audio_eos].norm(dim=1).mean())
    again = random_realtime_model(config, torch.device("cpu"), torch.float32, seed=3, eos_gain=4.0).state_dict()
    assert all(torch.equal(state[key], again[key]) for key in state)
