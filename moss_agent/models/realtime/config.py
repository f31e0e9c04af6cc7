"""MOSS-TTS-Realtime configuration, read from the checkpoint's config.json (never hard-coded sizes).

The layout follows the official checkpoint: a top-level dict with ``language_config`` (a Qwen3
config for the backbone), ``local_config`` (the 16-position depth transformer) and a few audio ids.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from moss_agent.errors import CheckpointError

# Upstream hard-codes these in the local transformer config; the checkpoint repeats them.
DEFAULT_RVQ = 16
DEFAULT_AUDIO_PAD = 1024
DEFAULT_AUDIO_VOCAB = 1027
DEFAULT_TEXT_PAD_ID = 151655
DEFAULT_AUDIO_PAD_TEXT_ID = 151654
# The model reads 12 text tokens before it speaks the first frame (training layout).
DELAY_TOKENS = 12


@dataclass(frozen=True)
class LocalConfig:
    """The depth transformer that turns one backbone hidden state into 16 codes."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_factor: float = 1.0
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LocalConfig:
        rope = raw.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", raw.get("rope_type", "linear"))
        if rope_type not in ("linear", "default"):
            raise CheckpointError(
                f"local_config rope_type {rope_type!r} is not supported; MOSS-TTS-Realtime uses 'linear'"
            )
        heads = _need(raw, "num_attention_heads", "local_config")
        hidden = _need(raw, "hidden_size", "local_config")
        return cls(
            hidden_size=hidden,
            intermediate_size=_need(raw, "intermediate_size", "local_config"),
            num_hidden_layers=_need(raw, "num_hidden_layers", "local_config"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 1_000_000.0))),
            rope_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
            hidden_act=raw.get("hidden_act", "silu"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "max_position_embeddings": 33,
            "model_type": "moss_tts_realtime_local_transformer",
            "pad_token_id": DEFAULT_AUDIO_PAD,
            "audio_pad_token": DEFAULT_AUDIO_PAD,
            "audio_vocab_size": DEFAULT_AUDIO_VOCAB,
            "rvq": DEFAULT_RVQ,
            "rope_theta": self.rope_theta,
            "rope_type": "linear",
            "rope_parameters": {
                "rope_type": "linear",
                "rope_theta": self.rope_theta,
                "factor": self.rope_factor,
            },
            "use_cache": True,
        }


@dataclass(frozen=True)
class RealtimeConfig:
    """Top-level config. ``language_config`` is the raw Qwen3 dict; build the backbone from a copy."""

    language_config: dict[str, Any]
    local: LocalConfig
    rvq: int = DEFAULT_RVQ
    audio_pad: int = DEFAULT_AUDIO_PAD
    audio_vocab_size: int = DEFAULT_AUDIO_VOCAB
    text_pad_id: int = DEFAULT_TEXT_PAD_ID
    audio_pad_text_id: int = DEFAULT_AUDIO_PAD_TEXT_ID
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def audio_bos(self) -> int:
        return self.audio_pad + 1

    @property
    def audio_eos(self) -> int:
        return self.audio_pad + 2

    @property
    def codebook_size(self) -> int:
        """Real codec codes are 0 .. codebook_size-1; the ids above are pad, BOS and EOS."""
        return self.audio_pad

    @property
    def hidden_size(self) -> int:
        return int(self.language_config["hidden_size"])

    @property
    def text_vocab_size(self) -> int:
        return int(self.language_config["vocab_size"])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RealtimeConfig:
        model_type = raw.get("model_type")
        if model_type not in (None, "moss_tts_realtime"):
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; expected 'moss_tts_realtime' "
                "(is this the MOSS-TTS-Realtime checkpoint?)"
            )
        language = raw.get("language_config")
        if not isinstance(language, dict):
            raise CheckpointError(
                "config.json has no language_config dict; the backbone sizes must come from the checkpoint"
            )
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "intermediate_size",
        ):
            _need(language, key, "language_config")
        for name, act in (
            ("language_config", language.get("hidden_act", "silu")),
            ("local_config", (raw.get("local_config") or {}).get("hidden_act", "silu")),
        ):
            if act != "silu":
                raise CheckpointError(
                    f"{name}.hidden_act {act!r} is not supported; MOSS-TTS-Realtime uses silu"
                )
        local_raw = raw.get("local_config")
        if not isinstance(local_raw, dict):
            raise CheckpointError("config.json has no local_config dict")
        local = LocalConfig.from_dict(local_raw)
        audio_vocab = int(raw.get("audio_vocab_size", DEFAULT_AUDIO_VOCAB))
        audio_pad = int(raw.get("audio_pad_token", DEFAULT_AUDIO_PAD))
        if audio_vocab != audio_pad + 3:
            raise CheckpointError(
                f"audio_vocab_size {audio_vocab} != audio_pad_token {audio_pad} + 3 (pad, BOS, EOS)"
            )
        if local.hidden_size != int(language["hidden_size"]):
            raise CheckpointError(
                f"local_config.hidden_size {local.hidden_size} differs from the backbone's "
                f"{language['hidden_size']}; the model has no projection between them"
            )
        return cls(
            language_config=copy.deepcopy(language),
            local=local,
            rvq=int(raw.get("rvq", DEFAULT_RVQ)),
            audio_pad=audio_pad,
            audio_vocab_size=audio_vocab,
            text_pad_id=int(raw.get("text_pad", DEFAULT_TEXT_PAD_ID)),
            audio_pad_text_id=int(raw.get("reference_audio_pad", DEFAULT_AUDIO_PAD_TEXT_ID)),
            raw=copy.deepcopy(raw),
        )

    def to_dict(self) -> dict[str, Any]:
        """The official config.json layout (what upstream save_pretrained writes)."""
        return {
            "architectures": ["MossTTSRealtime"],
            "model_type": "moss_tts_realtime",
            "audio_pad_token": self.audio_pad,
            "audio_vocab_size": self.audio_vocab_size,
            "rvq": self.rvq,
            "text_pad": self.text_pad_id,
            "reference_audio_pad": self.audio_pad_text_id,
            "initializer_range": 0.02,
            "language_config": copy.deepcopy(self.language_config),
            "local_config": self.local.to_dict(),
        }


def _need(raw: dict[str, Any], key: str, where: str) -> Any:
    if key not in raw or raw[key] is None:
        raise CheckpointError(f"config.json {where} lacks {key!r}; is the checkpoint complete?")
    return raw[key]
