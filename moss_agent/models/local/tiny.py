"""Tiny random MossTTSLocal v1 checkpoints in the official layout, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from moss_agent.models.delay.config import TTSModelConfig
from moss_agent.models.delay.tiny import delay_config_dict, random_weights, write_checkpoint


def save_tiny_local(
    folder: str | Path,
    *,
    n_vq: int = 4,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 4,
    ffn: int = 32,
    local_hidden: int = 12,
    local_ffn: int = 24,
    local_layers: int = 2,
    adapter_ffn: int = 16,
    seed: int = 0,
    steer: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_source: Path | None = None,
) -> Path:
    """Write a random Local v1 checkpoint into ``folder`` (same model_type as Delay, plus local_* fields)."""
    raw = delay_config_dict(
        n_vq=n_vq, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, ffn=ffn
    )
    raw.update(
        local_hidden_size=local_hidden,
        local_ffn_hidden_size=local_ffn,
        local_num_layers=local_layers,
        additional_mlp_ffn_hidden_size=adapter_ffn,
    )
    config = TTSModelConfig.from_dict(raw)
    gains = {config.audio_end_token_id: 8.0, config.audio_assistant_gen_slot_token_id: 8.0}
    weights = random_weights(config, seed=seed, steer=gains if steer else None)
    # Released checkpoints hold zeros at the embeddings' padding rows.
    weights["model.embedding_list.0.weight"][config.pad_token_id] = 0
    for c in range(1, n_vq + 1):
        weights[f"model.embedding_list.{c}.weight"][config.audio_pad_code] = 0
    return write_checkpoint(folder, raw, weights, dtype=dtype, tokenizer_source=tokenizer_source)
