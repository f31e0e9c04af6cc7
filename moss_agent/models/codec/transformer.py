"""Causal sliding-window transformer stages of MOSS-Audio-Tokenizer, offline and batched streaming.

Module and parameter names mirror the official checkpoint keys (``transformer.layers.{j}.self_attn.
in_projs.0`` ...); the math (interleaved RoPE in fp32, pre-norm, LayerScale, window = context tokens,
ring cache written before attending) follows /shared/reference/audio-tokenizer.md sections 2 and 5.
Tensors are time-major here: ``[B, T, C]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moss_agent.models.codec.config import TransformerConfig

# Offline attention switches from one [T, T] mask to query blocks past this many tokens, so a
# ten-minute clip does not build a multi-GB mask.
_FULL_MASK_MAX_TOKENS = 2048


@dataclass(slots=True)
class StepGeometry:
    """What every layer of one stage shares during a streaming step (computed once per stage).

    write_rows: [B*H*T] cache row of each new (batch, head, token), inactive rows sent to the spare
    last row; mask: [B, 1, T, capacity] additive (0 / -inf) in the compute dtype;
    cos/sin: [B, 1, T, head_dim/2] rotary tables in fp32.
    """

    write_rows: torch.Tensor
    mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def rope_tables(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] (any integer/float) -> cos, sin: [B, 1, T, head_dim/2] float32."""
    steps = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(steps * (-math.log(max_period) * 2 / head_dim))
    angles = positions.float()[:, None, :, None] * freqs
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; adjacent pairs (2i, 2i+1) rotate together, computed in fp32, cast back."""
    pairs = x.unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0].float(), pairs[..., 1].float()
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.to(x.dtype).flatten(-2)


class LayerScale(nn.Module):
    def __init__(self, channels: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``in_projs.0`` packs [q | k | v] rows, each head contiguous."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_projs = nn.ModuleList([nn.Linear(d_model, 3 * d_model, bias=False)])
        self.out_projs = nn.ModuleList([nn.Linear(d_model, d_model, bias=False)])

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, length, _ = x.shape
        qkv = self.in_projs[0](x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # One rotation for q and k together: half the small kernels on the streaming hot path.
        q, k = apply_rope(qkv[:2], cos, sin).unbind(0)
        return q, k, qkv[2]

    def _out(self, attended: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = attended.shape
        return self.out_projs[0](attended.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: int) -> torch.Tensor:
        """Offline: x [B, T, d] from position 0; each query sees the last ``context`` keys (itself included)."""
        q, k, v = self._qkv(x, cos, sin)
        return self._out(windowed_attention(q, k, v, context))

    def step(self, x: torch.Tensor, geometry: StepGeometry, key_rows: torch.Tensor, value_rows: torch.Tensor,
             ) -> torch.Tensor:
        """Streaming: x [B, T, d]; cache rows [B*H*capacity + 1, Dh] are written first, then attended."""
        q, k, v = self._qkv(x, geometry.cos, geometry.sin)
        batch, heads, _, head_dim = k.shape
        key_rows.index_copy_(0, geometry.write_rows, k.reshape(-1, head_dim))
        value_rows.index_copy_(0, geometry.write_rows, v.reshape(-1, head_dim))
        keys = key_rows[:-1].view(batch, heads, -1, head_dim)
        values = value_rows[:-1].view(batch, heads, -1, head_dim)
        return self._out(F.scaled_dot_product_attention(q, keys, values, attn_mask=geometry.mask))


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
    """Causal sliding-window attention over [B, H, T, D], positions 0..T-1."""
    length = q.shape[2]
    if length <= max(_FULL_MASK_MAX_TOKENS, context):
        pos = torch.arange(length, device=q.device)
        delta = pos[:, None] - pos[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(delta >= 0) & (delta < context))
    # Query blocks of `context` tokens need keys from `context - 1` tokens before the block only.
    outputs = []
    for start in range(0, length, context):
        end = min(start + context, length)
        key_start = max(0, start - context + 1)
        delta = torch.arange(start, end, device=q.device)[:, None] - torch.arange(key_start, end, device=q.device)
        mask = (delta >= 0) & (delta < context)
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, key_start:end], v[:, :, key_start:end], attn_mask=mask
        ))
    return torch.cat(outputs, dim=2)


class TransformerLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d_model = config.d_model
        self.self_attn = SelfAttention(d_model, config.num_heads)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.linear1 = nn.Linear(d_model, config.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(config.dim_feedforward, d_model, bias=False)
        scale = config.layer_scale
        self.layer_scale_1: nn.Module = nn.Identity() if scale is None else LayerScale(d_model, scale)
        self.layer_scale_2: nn.Module = nn.Identity() if scale is None else LayerScale(d_model, scale)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: int) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), cos, sin, context))
        return self._feed_forward(x)

    def step(self, x: torch.Tensor, geometry: StepGeometry, key_rows: torch.Tensor, value_rows: torch.Tensor,
             ) -> torch.Tensor:
        attended = self.self_attn.step(self.norm1(x), geometry, key_rows, value_rows)
        return self._feed_forward(x + self.layer_scale_1(attended))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(config) for _ in range(config.num_layers)])


class ProjectedTransformer(nn.Module):
    """One "Transformer" entry of the config: optional input projection, layers, optional output projection."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.input_proj: nn.Module = (
            nn.Identity() if config.input_dim == d_model else nn.Linear(config.input_dim, d_model, bias=False)
        )
        self.transformer = Transformer(config)
        self.output_proj: nn.Module = (
            nn.Identity() if config.output_dim == d_model else nn.Linear(d_model, config.output_dim, bias=False)
        )

    @property
    def capacity(self) -> int:
        """Ring cache length: exactly the window, as upstream (the parity goldens depend on it)."""
        return self.config.context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, input_dim] from position 0 -> [B, T, output_dim]."""
        positions = torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.max_period)
        h = self.input_proj(x)
        for layer in self.transformer.layers:
            h = layer(h, cos, sin, self.config.context)
        return self.output_proj(h)

    def geometry(self, start: torch.Tensor, length: int, active: torch.Tensor | None, dtype: torch.dtype,
                 ) -> StepGeometry:
        """start: [B] absolute position of each row's first new token; length: new tokens this step."""
        capacity, heads = self.capacity, self.config.num_heads
        device = start.device
        positions = start[:, None] + torch.arange(length, device=device)  # [B, T]
        last = positions[:, -1:]
        slots = torch.arange(capacity, device=device)
        # After the write, slot i holds the newest position congruent to i that is <= last;
        # a negative value means the slot was never written in this stream.
        slot_positions = (last - torch.remainder(last - slots, capacity))[:, None, :]  # [B, 1, capacity]
        # The window bound (query - key < context) holds by construction since capacity == context.
        hidden = (slot_positions < 0) | (slot_positions > positions[:, :, None])
        mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
        batch = start.shape[0]
        heads_base = (torch.arange(batch * heads, device=device) * capacity).view(batch, heads, 1)
        rows = heads_base + torch.remainder(positions, capacity)[:, None, :]  # [B, H, T]
        if active is not None:
            rows = torch.where(active[:, None, None], rows, batch * heads * capacity)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.max_period)
        return StepGeometry(rows.reshape(-1), mask[:, None], cos, sin)

    def step(
        self,
        x: torch.Tensor,
        start: torch.Tensor,
        key_rows: torch.Tensor,
        value_rows: torch.Tensor,
        active: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: [B, T, input_dim]; cache rows [L, B*H*capacity + 1, Dh] updated in place -> [B, T, output_dim]."""
        h = self.input_proj(x)
        geometry = self.geometry(start, x.shape[1], active, h.dtype)
        for index, layer in enumerate(self.transformer.layers):
            h = layer.step(h, geometry, key_rows[index], value_rows[index])
        return self.output_proj(h)


def patch(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, T, C] -> [B, T/size, C*size]; new channel c*size + j holds time t*size + j (channel-major)."""
    batch, length, channels = x.shape
    return x.reshape(batch, length // size, size, channels).transpose(2, 3).reshape(batch, length // size, -1)


def unpatch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Exact inverse of :func:`patch`: [B, L, C*size] -> [B, L*size, C]."""
    batch, length, channels = x.shape
    return x.reshape(batch, length, channels // size, size).transpose(2, 3).reshape(batch, length * size, -1)
