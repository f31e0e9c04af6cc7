"""MossTTSLocal v1: a Qwen3 backbone per frame plus a small causal, RoPE-less local transformer
over the channels of that frame (text token first, then codebooks 0..n_vq-1).

Module names follow the upstream ``moss_tts_local`` model (OpenMOSS/MOSS-TTS) so the official
``MOSS-TTS-Local-Transformer`` checkpoint loads unchanged. Upstream's eager attention forgets the
causal mask in the local transformer; here it is always causal (the sdpa behaviour the goldens pin).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from moss_agent.models.delay.config import TTSModelConfig
from moss_agent.models.delay.model import ChannelHeadsInfo, channel_heads


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no bias: the adapters between backbone width and local width."""

    def __init__(self, d_in: int, d_ffn: int, d_out: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_in, d_ffn, bias=False)
        self.up_proj = nn.Linear(d_in, d_ffn, bias=False)
        self.down_proj = nn.Linear(d_ffn, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PlainRMSNorm(nn.Module):
    """RMSNorm computed in the input dtype (no fp32 upcast), as upstream's head norms are."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class LocalTransformer(nn.Module):
    """Qwen3 decoder layers without positional encoding (order comes only from the causal mask)."""

    def __init__(self, qwen_config: object) -> None:
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm

        self.config = qwen_config
        layers = qwen_config.num_hidden_layers  # type: ignore[attr-defined]
        self.layers = nn.ModuleList(Qwen3DecoderLayer(qwen_config, i) for i in range(layers))
        self.norm = Qwen3RMSNorm(qwen_config.hidden_size, eps=qwen_config.rms_norm_eps)  # type: ignore[attr-defined]
        self.head_dim = qwen_config.head_dim  # type: ignore[attr-defined]

    def new_cache(self) -> object:
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, x: torch.Tensor, cache: object | None = None) -> torch.Tensor:
        """x: [B, S, D_local] -> [B, S, D_local]. With ``cache`` each call appends its positions.

        With no mask sdpa is causal for S > 1 and lets a single query see the whole cache.
        """
        # cos = 1, sin = 0 turns the layers' rotary step into the identity.
        cos = x.new_ones(1, 1, self.head_dim)
        sin = x.new_zeros(1, 1, self.head_dim)
        for layer in self.layers:
            x = layer(
                x,
                attention_mask=None,
                position_embeddings=(cos, sin),
                cache=cache,
                use_cache=cache is not None,
            )
        return self.norm(x)


class _Backbone(nn.Module):
    def __init__(self, config: TTSModelConfig) -> None:
        super().__init__()
        from transformers import Qwen3Model

        hidden = config.hidden_size
        self.embedding_list = nn.ModuleList(
            [nn.Embedding(config.vocab_size, hidden)]
            + [nn.Embedding(config.audio_vocab_size + 1, hidden) for _ in range(config.n_vq)]
        )
        self.language_model = Qwen3Model(
            config.qwen3_config()
        )  # its embed_tokens is unused, kept for the keys


class MossTTSLocalModel(ChannelHeadsInfo, nn.Module):
    """input_ids: [B, T, 1 + n_vq]; channel 0 text, channels 1.. codes (no delay pattern)."""

    def __init__(self, config: TTSModelConfig) -> None:
        super().__init__()
        assert config.local_hidden_size is not None and config.additional_mlp_ffn_hidden_size is not None
        self.config = config
        hidden, local = config.hidden_size, config.local_hidden_size
        adapter = config.additional_mlp_ffn_hidden_size
        channels = 1 + config.n_vq
        self.model = _Backbone(config)
        # Heads are inherited from the backbone config; only depth and widths change.
        local_config = config.qwen3_config(
            num_hidden_layers=config.local_num_layers,
            hidden_size=local,
            intermediate_size=config.local_ffn_hidden_size,
            layer_types=["full_attention"] * int(config.local_num_layers or 0),
        )
        self.local_transformer = LocalTransformer(local_config)
        self.speech_embedding_to_local_mlp = SwiGLU(hidden, adapter, local)
        self.local_to_speech_embedding_mlps = nn.ModuleList(
            SwiGLU(local, adapter, hidden) for _ in range(channels)
        )
        self.layer_norm_before_lm_heads = nn.ModuleList(PlainRMSNorm(hidden) for _ in range(channels))
        self.lm_heads = channel_heads(config)

    def prepare_for_inference(self) -> None:
        """Nothing to prepare: every embedding keeps the checkpoint's values, padding rows included.

        Upstream loading (transformers 5.0 ``_init_weights``) zeroes the text pad row and the audio
        pad rows whatever the file holds. Released checkpoints hold zeros there, so this only matters
        for an edited or fine-tuned checkpoint, which then loads as saved, as the realtime model does.
        """

    def new_cache(self) -> object:
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.model.language_model.config)

    def embed(self, input_ids: torch.Tensor, n_vq: int | None = None) -> torch.Tensor:
        """input_ids: [B, T, 1 + n_vq] -> [B, T, H]: sum of the first 1 + n_vq channel embeddings."""
        used = 1 + (self.n_vq if n_vq is None else n_vq)
        tables = self.model.embedding_list
        out = tables[0](input_ids[..., 0])
        for c in range(1, used):
            out = out + tables[c](input_ids[..., c])
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: object | None = None,
        position_ids: torch.Tensor | None = None,
        n_vq: int | None = None,
    ) -> torch.Tensor:
        """Backbone pass -> post-norm hidden states [B, T, H]; ``cache`` is extended in place."""
        out = self.model.language_model(
            inputs_embeds=self.embed(input_ids, n_vq),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def local_input(self, embedding: torch.Tensor) -> torch.Tensor:
        """[..., H] (a backbone state or a channel embedding) -> [..., D_local]."""
        return self.speech_embedding_to_local_mlp(embedding)

    def channel_logits(self, channel: int, local_out: torch.Tensor) -> torch.Tensor:
        """local_out: [..., D_local] at position ``channel`` -> logits [..., vocab or 1025] (no masking)."""
        h = self.layer_norm_before_lm_heads[channel](self.local_to_speech_embedding_mlps[channel](local_out))
        return self.lm_heads[channel](h)

    def teacher_forced(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Training-style pass. labels: [B, T, 1 + n_vq], -100 where ignored; row t holds the row after t.

        Returns (backbone hidden [B, T, H], per-channel logits [B, T, V_c], per-channel mean CE [1 + n_vq]).
        """
        hidden = self(input_ids, attention_mask)
        batch, steps, _ = hidden.shape
        channels = 1 + self.n_vq
        inputs = [hidden]
        for c in range(channels - 1):
            ids = labels[..., c]
            emb = self.model.embedding_list[c](ids.clamp(min=0))
            inputs.append(emb * (ids != -100).unsqueeze(-1))
        local_in = self.local_input(torch.stack(inputs, dim=2))  # [B, T, C, D_local]
        local_out = self.local_transformer(local_in.reshape(batch * steps, channels, -1))
        local_out = local_out.reshape(batch, steps, channels, -1)
        logits = [self.channel_logits(c, local_out[:, :, c]) for c in range(channels)]
        losses = torch.stack(
            [
                F.cross_entropy(
                    lg.float().reshape(-1, lg.shape[-1]), labels[..., c].reshape(-1), ignore_index=-100
                )
                for c, lg in enumerate(logits)
            ]
        )
        return hidden, logits, losses
