"""Configuration of the MOSS batch TTS models (MossTTSDelay and MossTTSLocal v1) read from config.json.

Both upstream checkpoints use ``model_type: moss_tts_delay``; Local v1 adds the ``local_*`` fields.
Every size comes from the checkpoint: nothing here assumes the 8B or 1.7B shapes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from moss_agent.errors import CheckpointError

ARCH_DELAY = "delay"
ARCH_LOCAL = "local"

_LOCAL_FIELDS = (
    "local_hidden_size",
    "local_ffn_hidden_size",
    "local_num_layers",
    "additional_mlp_ffn_hidden_size",
)


@dataclass(frozen=True)
class TTSModelConfig:
    """Token ids and sizes shared by the Delay and Local v1 models.

    ``language_config`` is the Qwen3 backbone config as a plain dict (from config.json).
    """

    language_config: dict[str, Any]
    n_vq: int = 32
    audio_vocab_size: int = 1024
    audio_pad_code: int = 1024
    pad_token_id: int = 151643
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    audio_start_token_id: int = 151652
    audio_end_token_id: int = 151653
    audio_user_slot_token_id: int = 151654
    audio_assistant_gen_slot_token_id: int = 151656
    audio_assistant_delay_slot_token_id: int = 151662
    sampling_rate: int = 24000
    # Local v1 only (None for Delay checkpoints).
    local_hidden_size: int | None = None
    local_ffn_hidden_size: int | None = None
    local_num_layers: int | None = None
    additional_mlp_ffn_hidden_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def architecture(self) -> str:
        return ARCH_LOCAL if self.local_hidden_size is not None else ARCH_DELAY

    @property
    def hidden_size(self) -> int:
        return int(self.language_config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.language_config["vocab_size"])

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> TTSModelConfig:
        if "language_config" not in raw or not isinstance(raw["language_config"], dict):
            raise CheckpointError(
                f"{source} has no language_config; is this a MOSS-TTS Delay/Local checkpoint?"
            )
        model_type = raw.get("model_type")
        if model_type not in (None, "moss_tts_delay"):
            raise CheckpointError(
                f"{source} has model_type {model_type!r}; MossTTSDelay and MossTTSLocal v1 checkpoints use "
                "'moss_tts_delay' (Local v1.5 'moss_tts_local' is not supported)"
            )
        names = {f.name for f in fields(cls)} - {"extra"}
        values = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        present_local = [k for k in _LOCAL_FIELDS if k in raw]
        if present_local and len(present_local) != len(_LOCAL_FIELDS):
            missing = sorted(set(_LOCAL_FIELDS) - set(present_local))
            raise CheckpointError(f"{source} is a Local checkpoint but lacks {', '.join(missing)}")
        for key in (
            "hidden_size",
            "vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            if key not in raw["language_config"]:
                raise CheckpointError(f"{source}: language_config lacks {key}")
        extra = {k: v for k, v in raw.items() if k not in names}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if self.local_hidden_size is None:
            for key in _LOCAL_FIELDS:
                out.pop(key)
        return out

    def qwen3_config(self, **overrides: Any) -> Any:
        """A fresh transformers ``Qwen3Config`` (sdpa attention) for the backbone, with ``overrides`` applied."""
        from transformers import Qwen3Config

        raw = copy.deepcopy(self.language_config)
        raw.pop("model_type", None)
        raw.update(overrides)
        config = Qwen3Config(**raw)
        config._attn_implementation = "sdpa"
        return config
