"""The local ("depth") transformer: one backbone hidden state in, 16 codec codes out, one per step.

Position 0 reads the backbone's post-norm hidden state; position i (1..15) reads the embedding of
code i-1 from table ``embed_tokens[i-1]``; head i predicts code i. Inference runs the 16 positions
one at a time against a preallocated 16-position KV cache that is reused every frame.
Module paths match the official checkpoint (``local_transformer.model.*``, ``local_lm_heads.*``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moss_agent.models.realtime.config import RealtimeConfig
from moss_agent.models.realtime.layers import (
    DecoderLayer,
    FastNorm,
    PackedLayer,
    RMSNorm,
    attend,
    rms_norm,
    rope_rotation,
    rope_tables,
    signed_sin,
    transposed_weight,
)


@dataclass
class LocalCache:
    """Preallocated keys/values for the 16 positions of one frame: [layers, batch, kv_heads, rvq, head_dim].

    ``slots[layer][i]`` are the (key, value) views [B, KV, D] that position i writes and
    ``windows[layer][i]`` the (key, value) views [B, KV, 1, i + 1, D] it reads.
    """

    keys: torch.Tensor
    values: torch.Tensor
    slots: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(init=False)
    windows: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(init=False)

    def __post_init__(self) -> None:
        layers, positions = self.keys.shape[0], self.keys.shape[3]
        keys, values = self.keys[:, :, :, None], self.values[:, :, :, None]
        self.slots = [
            [(self.keys[n, :, :, i], self.values[n, :, :, i]) for i in range(positions)]
            for n in range(layers)
        ]
        self.windows = [
            [(keys[n, :, :, :, : i + 1], values[n, :, :, :, : i + 1]) for i in range(positions)]
            for n in range(layers)
        ]

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
            nn.Linear(config.local.hidden_size, config.audio_vocab_size, bias=False)
            for _ in range(config.rvq)
        )
        self._packed: list[PackedLayer] = []
        self.reset_rope()

    def reset_rope(self, device: torch.device | None = None) -> None:
        """(Re)build the RoPE tables; they are not in the checkpoint (meta-device builds need this)."""
        local = self.config.local
        cos, sin = rope_tables(self.rvq, local.head_dim, local.rope_theta, local.rope_factor, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", signed_sin(sin), persistent=False)
        self._packed = []

    def packed(self) -> list[PackedLayer]:
        """The layers arranged for the fast step (rebuilt if the weights were moved or replaced)."""
        # The staleness check reads data pointers, which a traced step cannot; it was done eagerly.
        if not self._packed or (not torch.compiler.is_compiling() and not self._packed[0].is_current()):
            self._packed = [PackedLayer(layer) for layer in self.model.layers]
            dtype = self.local_lm_heads[0].weight.dtype
            shape = (1, 1, 1, -1)
            self._cos = [self.rope_cos[i].to(dtype).view(shape) for i in range(self.rvq)]
            self._sin = [self.rope_sin[i].to(dtype).view(shape) for i in range(self.rvq)]
            self._rotations = [
                rope_rotation(c.view(-1), s.view(-1)) for c, s in zip(self._cos, self._sin, strict=True)
            ]
            self._heads = [head.weight for head in self.local_lm_heads]
            self._heads_t = [transposed_weight(head) for head in self.local_lm_heads]
            self._final_norm = FastNorm(self.model.norm.weight, self.model.norm.variance_epsilon)
            self._tables = [table.weight for table in self.model.embed_tokens]
            rows = torch.arange(self.rvq, device=self.rope_cos.device)
            self._writes = [(rows == i).view(-1, 1) for i in range(self.rvq)]
            self._biases = [
                torch.zeros(self.rvq, dtype=dtype, device=rows.device).masked_fill_(rows > i, float("-inf"))
                for i in range(self.rvq)
            ]
        return self._packed

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
        layers = self.packed()
        cos, sin = self._cos[index], self._sin[index]
        for layer_index, layer in enumerate(layers):
            q, k, v = layer.project(x, cos, sin)
            keys = cache.keys[layer_index]
            values = cache.values[layer_index]
            keys[:, :, index] = k[:, 0]
            values[:, :, index] = v[:, 0]
            out = attend(q, keys[:, :, : index + 1], values[:, :, : index + 1], None, self.attention_kind)
            x = layer.finish(x, out)
        norm = self.model.norm
        return F.linear(rms_norm(x[:, 0], norm.weight, norm.variance_epsilon), self._heads[index])

    def generate(
        self,
        hidden: torch.Tensor,
        cache: LocalCache,
        pick: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """hidden [B, hidden] -> codes [B, rvq]; ``pick(i, logits[B, V])`` chooses code i for every row."""
        layers = self.packed()
        norm = self._final_norm
        codes = []
        x = hidden
        for index in range(self.rvq):
            rotation = self._rotations[index]
            for layer, slots, windows in zip(layers, cache.slots, cache.windows, strict=True):
                x = layer.step_one(x, rotation, *slots[index], *windows[index])
            logits = torch.mm(norm(x), self._heads_t[index])
            code = pick(index, logits)
            codes.append(code)
            if index + 1 < self.rvq:
                x = F.embedding(code, self._tables[index])
        return torch.stack(codes, dim=1)

    def position_tensors(
        self, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``masked_logits`` takes for position ``index``: (rotation [D, D], write [rvq, 1],
        bias [rvq], head [hidden, V], next_table [V, hidden], the table for code ``index``'s
        embedding; the last position gets table 0, whose lookup is never used)."""
        self.packed()
        table = self._tables[index] if index + 1 < self.rvq else self._tables[0]
        return self._rotations[index], self._writes[index], self._biases[index], self._heads_t[index], table

    def masked_logits(
        self,
        x: torch.Tensor,
        cache: LocalCache,
        rotation: torch.Tensor,
        write: torch.Tensor,
        bias: torch.Tensor,
        head: torch.Tensor,
    ) -> torch.Tensor:
        """One position with the position given by tensors (see ``position_tensors``), so a
        compiled graph of it serves all 16: x [B, hidden] -> logits [B, V] (model dtype)."""
        for layer_index, layer in enumerate(self.packed()):
            keys, values = cache.keys[layer_index], cache.values[layer_index]
            x = layer.step_masked(x, rotation, keys, values, write, bias)
        return torch.mm(self._final_norm(x), head)

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
        cos = self.rope_cos.to(x.dtype)[None, :, None]
        sin = self.rope_sin.to(x.dtype)[None, :, None]
        causal = torch.ones(self.rvq, self.rvq, dtype=torch.bool, device=x.device).tril()[None, None]
        for layer in self.packed():
            q, k, v = layer.project(x, cos, sin)
            out = attend(q, k.transpose(1, 2), v.transpose(1, 2), causal, self.attention_kind)
            x = layer.finish(x, out)
        x = self.model.norm(x)
        return torch.stack([self.local_lm_heads[i](x[:, i]) for i in range(self.rvq)], dim=1)
