"""Sampling for the batch TTS models: temperature, repetition penalty, top-k, top-p, then a draw.

The order and filters follow upstream ``moss_tts_delay/inference_utils.py: sample_token``
(OpenMOSS/MOSS-TTS). Temperature and the penalty commute (the penalty keeps signs), so the same
function also serves Local v1, whose HF processors run penalty first. Presets hold the decoding
settings the model cards recommend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moss_agent.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; a temperature <= 0 means greedy for that stream.

    ``repetition_scope`` picks which earlier codes a codebook is penalised for:
    ``"batch"`` reproduces upstream Delay (union over the whole batch, and over codebooks 1..n-1
    jointly, prompt included), so results depend on what else is in the batch; ``"sample"`` uses
    each sample's own history per codebook, so batching never changes a result.
    ``min_frames`` is a minimum length per piece: the end of the audio (Delay's first delay slot,
    Local's ``<|audio_end|>``, and ``<|im_end|>`` before it) is forbidden until a sample has
    generated that many frames in this call; 0, the upstream behaviour, never forbids it.
    """

    text_temperature: float = 1.5
    text_top_p: float = 1.0
    text_top_k: int = 50
    audio_temperature: float = 1.7
    audio_top_p: float = 0.8
    audio_top_k: int = 25
    audio_repetition_penalty: float = 1.0
    repetition_scope: str = "batch"
    min_frames: int = 0

    def __post_init__(self) -> None:
        for name in ("text_top_p", "audio_top_p"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        for name in ("text_top_k", "audio_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 turns top-k off), got {getattr(self, name)}")
        if self.audio_repetition_penalty <= 0:
            raise ConfigError(f"audio_repetition_penalty must be > 0, got {self.audio_repetition_penalty}")
        if self.repetition_scope not in ("batch", "sample"):
            raise ConfigError(f"repetition_scope must be 'batch' or 'sample', got {self.repetition_scope!r}")
        if self.min_frames < 0:
            raise ConfigError(f"min_frames must be >= 0 (0: no minimum), got {self.min_frames}")

    def greedy(self) -> SamplingParams:
        return replace(self, text_temperature=0.0, audio_temperature=0.0)


# Recommended decoding per checkpoint (model cards); text-stream settings are the generate defaults.
PRESETS: dict[str, SamplingParams] = {
    "moss-tts": SamplingParams(
        audio_temperature=1.7, audio_top_p=0.8, audio_top_k=25, audio_repetition_penalty=1.0
    ),
    "moss-ttsd": SamplingParams(
        audio_temperature=1.1, audio_top_p=0.9, audio_top_k=50, audio_repetition_penalty=1.1
    ),
    "voice-generator": SamplingParams(
        audio_temperature=1.5, audio_top_p=0.6, audio_top_k=50, audio_repetition_penalty=1.1
    ),
    "sound-effect": SamplingParams(
        audio_temperature=1.5, audio_top_p=0.6, audio_top_k=50, audio_repetition_penalty=1.2
    ),
    "moss-tts-local": SamplingParams(
        audio_temperature=1.0,
        audio_top_p=0.95,
        audio_top_k=50,
        audio_repetition_penalty=1.1,
        repetition_scope="sample",
    ),
}


def preset(name: str) -> SamplingParams:
    if name not in PRESETS:
        raise ConfigError(f"unknown sampling preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: [N, V]; seen: [N, V] or [V] bool. Seen tokens: positive logits / penalty, others * penalty."""
    if penalty == 1.0:
        return logits
    seen = seen.expand_as(logits)
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (torch.topk order on ties), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest prefix (by probability) whose mass exceeds p; the top token always stays."""
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    cumulative = sorted_probs.cumsum(dim=-1)
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] > p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    penalty: float = 1.0,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: [N, V] -> token ids [N]. Greedy (argmax after the penalty) when temperature <= 0.

    With top-k the draw happens inside the k kept tokens: the same distribution as filtering the
    whole vocabulary (top-p then acts on those k), at a fraction of the cost for large vocabularies.
    """
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    if temperature > 0:
        logits = logits / temperature
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if 0 < top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, top_k, dim=-1)
        choice = _draw(top_p_filter(values, top_p), generator)
        return indices.gather(-1, choice[:, None]).squeeze(-1)
    return _draw(top_p_filter(logits, top_p), generator)


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
