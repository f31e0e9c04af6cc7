"""Qwen3-style decoder pieces shared by the backbone's cached step and the local transformer.

The parameter names (q_proj, k_norm, mlp.gate_proj, input_layernorm, ...) match transformers'
Qwen3DecoderLayer, so the helpers below run either our own ``DecoderLayer`` or a layer of the
transformers ``Qwen3Model`` with the same math: RMSNorm in fp32, per-head q/k norm before RoPE,
rotate-half RoPE, grouped-query attention, SwiGLU MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("sdpa", "eager", "flash_attention_2")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Weights only; the math lives in ``project_qkv`` and ``attend`` so callers own their caches."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_key_value_groups = heads // kv_heads
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)


class DecoderLayer(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, eps: float
    ) -> None:
        super().__init__()
        self.self_attn = Attention(hidden, heads, kv_heads, head_dim, eps)
        self.mlp = MLP(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)


def rope_tables(
    positions: int, head_dim: int, theta: float, factor: float = 1.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [positions, head_dim] in fp32 (linear RoPE: positions divided by ``factor``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    inv_freq = inv_freq / factor
    freqs = torch.arange(positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_qkv(
    attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, T, hidden]; cos/sin: [B or 1, T, D] -> q [B, H, T, D], k and v [B, KV, T, D] (RoPE applied)."""
    batch, length, _ = x.shape
    head_dim = attn.head_dim
    q = attn.q_norm(attn.q_proj(x).view(batch, length, -1, head_dim)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(batch, length, -1, head_dim)).transpose(1, 2)
    v = attn.v_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    kind: str = "sdpa",
) -> torch.Tensor:
    """Grouped-query attention -> [B, T, H*D].

    q: [B, H, T, D]; k, v: [B, KV, L, D]; mask: bool [B or 1, 1, T, L] (True = attend) or None (all).
    A single query row packs the query heads of one KV head as rows, so the cache is never copied.
    """
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if length == 1 and groups > 1:
        q = q.reshape(batch, kv_heads, groups, head_dim)
    elif groups > 1:
        k = k[:, :, None].expand(batch, kv_heads, groups, *k.shape[2:]).reshape(batch, heads, *k.shape[2:])
        v = v[:, :, None].expand(batch, kv_heads, groups, *v.shape[2:]).reshape(batch, heads, *v.shape[2:])
    if kind == "eager":
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    # [B, KV, groups, D] (packed) or [B, H, T, D] -> [B, T, H*D]
    return out.reshape(batch, heads, length, head_dim).transpose(1, 2).reshape(batch, length, heads * head_dim)
