"""Tiny random MOSS-Audio-Tokenizer checkpoints in the official layout, for tests and demos.

The real 240/2/2/2 patch chain is kept, so framing, lengths and patch interleaving are exercised
exactly; only widths, depths, codebooks and the attention window shrink.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moss_agent.models.codec.config import CodecConfig, make_config_dict
from moss_agent.models.codec.model import MossAudioTokenizer


def random_codec_state_dict(config: CodecConfig, seed: int = 0, layer_scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Seeded random weights for every checkpoint key; ``layer_scale`` is raised far above the 0.01
    init so each random transformer layer actually changes the signal."""
    with torch.device("meta"):
        model = MossAudioTokenizer(config)
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    tensors = {}
    for key, meta in model.state_dict().items():
        shape = meta.shape
        if key.endswith("codebook.weight") or key.endswith("original1"):
            value = normal(shape)
        elif key.endswith("original0"):
            value = 0.5 + 0.5 * torch.rand(shape, generator=generator)
        elif key.endswith(".scale"):
            value = layer_scale + 0.1 * layer_scale * normal(shape)
        elif ".norm" in key and key.endswith(".weight"):
            value = 1 + 0.2 * normal(shape)
        elif key.endswith(".bias"):
            value = 0.1 * normal(shape)
        else:  # linear weights [out, in]
            value = normal(shape) / math.sqrt(shape[-1])
        tensors[key] = value.contiguous()
    return tensors


def save_tiny_codec(folder: str | Path, seed: int = 0, *, layer_scale: float = 0.3, **sizes: Any) -> Path:
    """Write ``config.json`` + ``model.safetensors`` of a tiny random codec into ``folder``.

    ``sizes`` are passed to :func:`make_config_dict` (d_model, num_layers, num_quantizers,
    codebook_size, context_duration, ...); the defaults give a ~190k-parameter model with 4
    quantizers of 16 codes and 0.32 s windows (so short tests wrap the ring caches).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = make_config_dict(**sizes)
    config = CodecConfig.from_dict(raw)
    save_file(random_codec_state_dict(config, seed, layer_scale), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(raw, indent=1, sort_keys=True))
    return folder
