"""Load the official MOSS-Audio-Tokenizer checkpoint layout (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from moss_agent.errors import CheckpointError, ConfigError
from moss_agent.models.codec.config import CodecConfig
from moss_agent.models.codec.model import MossAudioTokenizer
from moss_agent.models.loading import (
    check_model_type,
    check_state_dict,
    load_safetensors,
    pick_device,
    pick_dtype,
    read_config,
    resolve_checkpoint,
)

log = logging.getLogger(__name__)

# Spellings other exporters use for the same tensors (the upstream attention load hook accepts the
# first three; legacy weight_norm and merged 1x1 conv weights come from older torch / ONNX exports).
_RENAMES = [
    (re.compile(r"(\.self_attn)\.in_proj_weight$"), r"\1.in_projs.0.weight"),
    (re.compile(r"(\.self_attn)\.in_proj\.weight$"), r"\1.in_projs.0.weight"),
    (re.compile(r"(\.self_attn)\.out_proj\.weight$"), r"\1.out_projs.0.weight"),
    (re.compile(r"\.weight_g$"), r".parametrizations.weight.original0"),
    (re.compile(r"\.weight_v$"), r".parametrizations.weight.original1"),
]


def canonical_state_dict(tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rename alternative key spellings to the official ones; split merged weight-norm conv weights."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        new_key = key
        for pattern, replacement in _RENAMES:
            new_key = pattern.sub(replacement, new_key)
        merged_norm = new_key.removesuffix(".weight") + ".parametrizations.weight.original1"
        if new_key not in expected and new_key.endswith(".weight") and merged_norm in expected:
            # A plain conv weight W equals weight norm with v = W and g = ||W|| per output channel.
            weight = tensor if tensor.dim() == 3 else tensor[..., None]
            renamed[merged_norm] = weight
            renamed[merged_norm.replace("original1", "original0")] = weight.norm(dim=(1, 2), keepdim=True)
            continue
        renamed[new_key] = tensor
    return renamed


def build_codec(config: CodecConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                ) -> MossAudioTokenizer:
    """A codec with uninitialised (empty) weights on ``device``: for random-weight benchmarks and tests."""
    with torch.device("meta"):
        model = MossAudioTokenizer(config)
    model.to_empty(device=device)
    model.to(dtype)  # the quantizer keeps float32
    return model.requires_grad_(False).eval()


def load_codec(
    path_or_id: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> MossAudioTokenizer:
    """Load MOSS-Audio-Tokenizer from a checkpoint folder or a Hugging Face hub id.

    ``device`` defaults to CUDA when present; ``dtype`` to bf16 on CUDA and fp32 on the CPU. The
    transformers run in ``dtype``; the quantizer stays fp32. Sizes come from ``config.json`` only.
    Raises CheckpointError when the folder, config or weights are missing or do not match.
    """
    folder = resolve_checkpoint(path_or_id)
    raw = read_config(folder)
    check_model_type(raw, folder, ("speech_tokenizer", "moss-audio-tokenizer"), "MOSS-Audio-Tokenizer")
    try:
        config = CodecConfig.from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not a usable codec config: {exc}") from exc
    target_device = pick_device(device)
    target_dtype = pick_dtype(dtype, target_device)

    # Meta construction: no random init, so the 1.77B model is built in milliseconds.
    with torch.device("meta"):
        model = MossAudioTokenizer(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    tensors = canonical_state_dict(load_safetensors(folder), set(expected))
    check_state_dict(expected, tensors, source=str(folder))

    state = {}
    for key in sorted(tensors):  # pop as we go: the CPU copy of each tensor is freed once converted
        wanted = torch.float32 if key.startswith("quantizer.") else target_dtype
        state[key] = tensors.pop(key).to(device=target_device, dtype=wanted)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    log.info("codec loaded", extra={"folder": str(folder), "device": str(target_device),
                                     "dtype": str(target_dtype)})
    return model
