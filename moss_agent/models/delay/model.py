"""MossTTSDelay: a Qwen3 backbone over summed text + n_vq audio embeddings, one head per channel.

Layout follows the upstream ``MossTTSDelayModel`` (OpenMOSS/MOSS-TTS, moss_tts_delay) so the official
checkpoints load unchanged: ``language_model.*`` (transformers Qwen3Model), ``emb_ext.{k}`` [1025, H] and
``lm_heads.{0..n_vq}``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moss_agent.models.delay.config import TTSModelConfig

log = logging.getLogger(__name__)


def channel_heads(config: TTSModelConfig) -> nn.ModuleList:
    """``lm_heads``: the text head [vocab, H] then one [audio_vocab + 1, H] head per codebook (the pad
    code is a learned row). Shared by the Delay and Local models, whose checkpoints name them alike."""
    hidden, audio_rows = config.hidden_size, config.audio_vocab_size + 1
    return nn.ModuleList(
        [nn.Linear(hidden, config.vocab_size, bias=False)]
        + [nn.Linear(hidden, audio_rows, bias=False) for _ in range(config.n_vq)]
    )


class ChannelHeadsInfo:
    """``n_vq``, ``device`` and ``dtype`` of a model built on ``channel_heads``."""

    config: TTSModelConfig
    lm_heads: nn.ModuleList

    @property
    def n_vq(self) -> int:
        return self.config.n_vq

    @property
    def device(self) -> torch.device:
        return self.lm_heads[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_heads[0].weight.dtype


class MossTTSDelayModel(ChannelHeadsInfo, nn.Module):
    """Delay-pattern TTS model. ``input_ids``: [B, T, 1 + n_vq] (channel 0 text, 1.. audio codes)."""

    def __init__(self, config: TTSModelConfig) -> None:
        super().__init__()
        from transformers import Qwen3Model

        self.config = config
        hidden = config.hidden_size
        n_vq = config.n_vq
        audio_rows = config.audio_vocab_size + 1  # the pad code is a learned row, not a padding_idx
        self.language_model = Qwen3Model(config.qwen3_config())
        self.emb_ext = nn.ModuleList(nn.Embedding(audio_rows, hidden) for _ in range(n_vq))
        self.lm_heads = channel_heads(config)
        self._fused: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare_for_inference(self) -> None:
        """Share one [n_vq, 1025, H] tensor between the per-codebook embeddings (and heads).

        The per-codebook parameters become views of it, so state_dict keys are unchanged while
        the embedding sum is one gather and the audio heads one batched matmul.
        """
        with torch.no_grad():
            emb = torch.stack([e.weight for e in self.emb_ext]).contiguous()
            heads = torch.stack([h.weight for h in self.lm_heads[1:]]).contiguous()
        for k, module in enumerate(self.emb_ext):
            module.weight = nn.Parameter(emb[k], requires_grad=False)
        for k, module in enumerate(self.lm_heads[1:]):
            module.weight = nn.Parameter(heads[k], requires_grad=False)
        self._fused = (emb, heads)

    def _audio_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fused is None or self._fused[0].device != self.device or self._fused[0].dtype != self.dtype:
            self.prepare_for_inference()
        assert self._fused is not None
        return self._fused

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T, 1 + n_vq] -> [B, T, H]; the audio pad code 1024 is embedded like any code."""
        emb, _ = self._audio_tables()
        n_vq, rows, hidden = emb.shape
        text = self.language_model.embed_tokens(input_ids[..., 0])
        offsets = torch.arange(n_vq, device=input_ids.device) * rows
        audio = emb.view(n_vq * rows, hidden)[input_ids[..., 1:] + offsets]  # [B, T, n_vq, H]
        return text + audio.sum(dim=-2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: object | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: [B, T, 1+n_vq]; attention_mask: [B, past+T] bool (False on left padding).

        Returns the post-norm hidden states [B, T, H]; ``cache`` (from ``new_cache()``) is extended in place.
        """
        out = self.language_model(
            inputs_embeds=self.embed(input_ids),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def new_cache(self, max_len: int | None = None) -> object:
        """A KV cache for ``forward``: growing, or preallocated for ``max_len`` positions."""
        from transformers.cache_utils import DynamicCache, StaticCache

        if max_len is None:
            return DynamicCache(config=self.language_model.config)
        return StaticCache(config=self.language_model.config, max_cache_len=max_len)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> [..., vocab]."""
        return self.lm_heads[0](hidden)

    def audio_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> [..., n_vq, 1025] with the pad code's logit at -inf (it is never predicted)."""
        _, heads = self._audio_tables()
        n_vq, rows, width = heads.shape
        logits = (hidden @ heads.view(n_vq * rows, width).T).unflatten(-1, (n_vq, rows))
        logits[..., self.config.audio_pad_code] = float("-inf")
        return logits
