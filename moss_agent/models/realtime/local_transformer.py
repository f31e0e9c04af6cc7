"""The local ("depth") transformer: one backbone hidden state in, 16 codec codes out, one per step.

Position 0 reads the backbone's post-norm hidden state; position i (1..15) reads the embedding of
code i-1 from table ``embed_tokens[i-1]``; head i predicts code i. Inference runs the 16 positions
one at a time against a preallocated 16-position KV cache that is reused every frame.
Module paths match the official checkpoint (``local_transformer.model.*``, ``local_lm_heads.*``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moss_agent.models.realtime.config import RealtimeConfig
from moss_agent.models.realtime.layers import DecoderLayer, RMSNorm, attend, project_qkv, rope_tables


@dataclass
class LocalCache:
    """Preallocated keys/values for the 16 positions of one frame: [layers, batch, kv_heads, rvq, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]


class LocalTransformerBody(nn.Module):
    def __init__(self, config: RealtimeConfig) -> None:
        super().__init__()
        local = config.local
        self.embed_tokens = nn.ModuleList(
            nn.Embedding(config.audio_vocab_size, local.hidden_size, padding_idx=config.audio_pad)
            for _ in range(config.rvq - 1)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(
                local.hidden_size,
                local.intermediate_size,
                local.num_attention_heads,
                local.num_key_value_heads,
                local.head_dim,
                local.rms_norm_eps,
            )
            for _ in range(local.num_hidden_layers)
        )
        self.norm = RMSNorm(local.hidden_size, local.rms_norm_eps)


class LocalTransformer(nn.Module):
    def __init__(self, config: RealtimeConfig) -> None:
        super().__init__()
        self.config = config
        self.rvq = config.rvq
        self.attention_kind = "sdpa"
        self.model = LocalTransformerBody(config)
        self.local_lm_heads = nn.ModuleList(
            nn.Linear(config.local.hidden_size, config.audio_vocab_size, bias=False) for _ in range(config.rvq)
        )
        self.reset_rope()

    def reset_rope(self, device: torch.device | None = None) -> None:
        """(Re)build the RoPE tables; they are not in the checkpoint (meta-device builds need this)."""
        local = self.config.local
        cos, sin = rope_tables(self.rvq, local.head_dim, local.rope_theta, local.rope_factor, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, batch_size: int) -> LocalCache:
        weight = self.local_lm_heads[0].weight
        local = self.config.local
        shape = (local.num_hidden_layers, batch_size, local.num_key_value_heads, self.rvq, local.head_dim)
        return LocalCache(
            keys=torch.zeros(shape, dtype=weight.dtype, device=weight.device),
            values=torch.zeros(shape, dtype=weight.dtype, device=weight.device),
        )

    def step(self, x: torch.Tensor, index: int, cache: LocalCache) -> torch.Tensor:
        """Run position ``index`` for every row: x [B, 1, hidden] -> logits [B, audio_vocab] (model dtype)."""
        cos = self.rope_cos[index : index + 1].to(x.dtype)[None]
        sin = self.rope_sin[index : index + 1].to(x.dtype)[None]
        for layer_index, layer in enumerate(self.model.layers):
            residual = x
            h = layer.input_layernorm(x)
            q, k, v = project_qkv(layer.self_attn, h, cos, sin)
            keys = cache.keys[layer_index]
            values = cache.values[layer_index]
            keys[:, :, index] = k[:, :, 0]
            values[:, :, index] = v[:, :, 0]
            out = attend(
                q,
                keys[:, :, : index + 1],
                values[:, :, : index + 1],
                None,
                layer.self_attn.scaling,
                self.attention_kind,
            )
            x = residual + layer.self_attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.local_lm_heads[index](self.model.norm(x))[:, 0]

    def generate(
        self,
        hidden: torch.Tensor,
        cache: LocalCache,
        pick: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """hidden [B, hidden] -> codes [B, rvq]; ``pick(i, logits[B, V])`` chooses code i for every row."""
        codes = torch.empty(hidden.shape[0], self.rvq, dtype=torch.long, device=hidden.device)
        x = hidden[:, None, :]
        for index in range(self.rvq):
            logits = self.step(x, index, cache)
            code = pick(index, logits)
            codes[:, index] = code
            if index + 1 < self.rvq:
                x = self.model.embed_tokens[index](code)[:, None, :]
        return codes

    def teacher_forced_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Step by step with teacher codes: hidden [B, hidden], codes [B, rvq] -> logits [B, rvq, V]."""
        cache = self.new_cache(hidden.shape[0])
        rows = []
        x = hidden[:, None, :]
        for index in range(self.rvq):
            rows.append(self.step(x, index, cache))
            if index + 1 < self.rvq:
                x = self.model.embed_tokens[index](codes[:, index])[:, None, :]
        return torch.stack(rows, dim=1)

    def full_pass_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Training-style single causal pass over the 16 positions -> logits [B, rvq, V]."""
        parts = [hidden[:, None, :]]
        parts += [self.model.embed_tokens[i](codes[:, i])[:, None, :] for i in range(self.rvq - 1)]
        x = torch.cat(parts, dim=1)
        cos = self.rope_cos.to(x.dtype)[None]
        sin = self.rope_sin.to(x.dtype)[None]
        causal = torch.ones(self.rvq, self.rvq, dtype=torch.bool, device=x.device).tril()[None, None]
        for layer in self.model.layers:
            q, k, v = project_qkv(layer.self_attn, layer.input_layernorm(x), cos, sin)
            out = attend(q, k, v, causal, layer.self_attn.scaling, self.attention_kind)
            x = x + layer.self_attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.model.norm(x)
        return torch.stack([self.local_lm_heads[i](x[:, i]) for i in range(self.rvq)], dim=1)
