"""Qwen3-style decoder pieces shared by the backbone's cached path and the local transformer.

Parameter names (q_proj, k_norm, mlp.gate_proj, input_layernorm, ...) match transformers'
Qwen3DecoderLayer, so ``PackedLayer`` runs either our own ``DecoderLayer`` or a layer of the
transformers ``Qwen3Model`` with the same math: RMSNorm in fp32, per-head q/k norm before RoPE,
rotate-half RoPE, grouped-query attention, SwiGLU MLP.

For inference the step is written with few, large tensor ops: q/k/v and gate/up are one matmul
each (the module weights become views of one fused tensor, so memory is not duplicated), the
q and k head norms and RoPE run once over both, the attention scale is folded into the q norm,
and the residual adds ride on ``addmm``.
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
        return rms_norm(x, self.weight, self.variance_epsilon)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)


class Attention(nn.Module):
    """Weights only; the math lives in ``PackedLayer`` so callers own their caches."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.head_dim = head_dim
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3 RMSNorm: statistics in fp32, then ``weight * x.to(dtype)`` (same op order as transformers)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class FastNorm:
    """RMSNorm in few dispatches for fp32: x * rsqrt(|x|^2 + n*eps) * (sqrt(n) * weight), with the
    constants prepared once (equal to ``rms_norm`` up to rounding); other dtypes take the exact path."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        size = weight.shape[-1]
        self.weight = weight
        self.eps = eps
        self.scaled = weight.detach() * size**0.5
        self.eps_n = torch.tensor(size * eps, dtype=torch.float32, device=weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return rms_norm(x, self.weight, self.eps)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return (x * torch.addcmul(self.eps_n, norm, norm).rsqrt_()).mul_(self.scaled)


def rope_tables(
    positions: int, head_dim: int, theta: float, factor: float = 1.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [positions, head_dim] in fp32 (linear RoPE: positions divided by ``factor``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    inv_freq = inv_freq / factor
    freqs = torch.arange(positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == roll(x, D/2) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_rotation(cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """[D, D] matrix R with x @ R == x * cos + x.roll(D // 2, -1) * signed_sin for one position
    (cos, signed_sin: [D]); one small matmul instead of four elementwise ops."""
    size = cos.shape[-1]
    columns = torch.arange(size, device=cos.device)
    rotation = torch.diag(cos)
    rotation[(columns + size // 2) % size, columns] += signed_sin
    return rotation


def _fuse(owner: nn.Module, name: str, linears: list[nn.Linear]) -> torch.Tensor:
    """One contiguous [in, sum(out)] matrix (the transposed weights side by side); each linear's
    weight becomes a view of it, so memory is shared and x @ matrix needs no transposition."""
    fused = getattr(owner, name, None)
    if isinstance(fused, torch.Tensor) and fused.data_ptr() == linears[0].weight.data_ptr():
        return fused
    fused = torch.cat([linear.weight.detach().t() for linear in linears], dim=1).contiguous()
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[:, start : start + rows].t()
        start += rows
    object.__setattr__(owner, name, fused)  # a plain attribute: not a parameter, not in state_dict
    return fused


def transposed_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight as a contiguous [in, out] matrix; the module keeps a transposed view of it."""
    return _fuse(linear, "_weight_t", [linear])


class PackedLayer:
    """A decoder layer's weights arranged for the fast step; built once after loading."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim = attn.head_dim
        self.heads = attn.q_proj.weight.shape[0] // self.head_dim
        self.kv_heads = attn.k_proj.weight.shape[0] // self.head_dim
        self.qkv_t = _fuse(attn, "_fused_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_t = _fuse(mlp, "_fused_gate_up", [mlp.gate_proj, mlp.up_proj])
        self.o_t = transposed_weight(attn.o_proj)
        self.down_t = transposed_weight(mlp.down_proj)
        self.qkv, self.gate_up = self.qkv_t.t(), self.gate_up_t.t()
        self.norm_in = layer.input_layernorm.weight
        self.norm_post = layer.post_attention_layernorm.weight
        self.eps_in = layer.input_layernorm.variance_epsilon
        self.eps_post = layer.post_attention_layernorm.variance_epsilon
        self.eps_head = attn.q_norm.variance_epsilon
        scaling = self.head_dim**-0.5
        # q's attention scale folded into its norm weight; one [H + KV, D] weight for both norms
        self.qk_norm = torch.cat(
            [
                (attn.q_norm.weight.detach() * scaling).expand(self.heads, -1),
                attn.k_norm.weight.detach().expand(self.kv_heads, -1),
            ]
        )
        self.source = attn.q_proj.weight
        self.fast_in = FastNorm(self.norm_in, self.eps_in)
        self.fast_post = FastNorm(self.norm_post, self.eps_post)
        self.fast_qk = FastNorm(self.qk_norm, self.eps_head)

    def is_current(self) -> bool:
        return self.qkv_t.data_ptr() == self.source.data_ptr()

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden]; cos/sin [B or 1, T, 1, D] (sin signed) ->
        q [B, T, H, D] (pre-scaled), k [B, T, KV, D], v [B, T, KV, D]."""
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qkv = F.linear(rms_norm(x, self.norm_in, self.eps_in), self.qkv)
        qkv = qkv.view(batch, length, heads + 2 * kv_heads, head_dim)
        qk = rms_norm(qkv[:, :, : heads + kv_heads], self.qk_norm, self.eps_head)
        qk = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
        return qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads :]

    def step_one(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        key_slot: torch.Tensor,
        value_slot: torch.Tensor,
        key_window: torch.Tensor,
        value_window: torch.Tensor,
    ) -> torch.Tensor:
        """One position for every row, 2-D activations: x [B, hidden] -> [B, hidden].

        rotation: [D, D] RoPE of this position as a matrix (see ``rope_rotation``).
        key_slot/value_slot: [B, KV, D] views of the cache row this position writes;
        key_window/value_window: [B, KV, 1, P, D] views of rows 0..P-1 it attends to (itself last).
        The views are prepared once per cache, so the step makes no indexing ops.
        """
        query, key, value = self._project_one(x, rotation)
        key_slot.copy_(key)
        value_slot.copy_(value)
        # At most 16 keys. Broadcast multiply-and-sum instead of bmm/SDPA: those kernels open a
        # thread-pool region for any batch of more than one matrix, and on a small or shared CPU
        # waking the other threads costs far more than this arithmetic (up to a scheduler tick
        # when another process holds the cores); elementwise ops stay on this thread below
        # torch's grain size.
        scores = torch.mul(query, key_window).sum(-1)  # [B, KV, G, P]
        weights = _softmax_inline(scores)
        return self._finish_one(x, torch.mul(weights[..., None], value_window).sum(-2))

    def step_masked(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        write: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """``step_one`` with the position given by tensors instead of Python ints, so one traced
        graph (torch.compile) serves every position: x [B, hidden] -> [B, hidden].

        keys/values: [B, KV, P, D], this layer's whole local cache, updated in place;
        write: [P, 1] bool, the row this position writes; bias: [P] float, 0 on the rows it
        attends to and -inf after it (those get weight exactly 0).
        """
        query, key, value = self._project_one(x, rotation)
        keys.copy_(torch.where(write, key[:, :, None], keys))
        values.copy_(torch.where(write, value[:, :, None], values))
        scores = torch.mul(query, keys[:, :, None]).sum(-1) + bias  # [B, KV, G, P]
        weights = _softmax_inline(scores)
        return self._finish_one(x, torch.mul(weights[..., None], values[:, :, None]).sum(-2))

    def _project_one(
        self, x: torch.Tensor, rotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, hidden] -> query [B, KV, G, 1, D] (pre-scaled), key [B, KV, D], value [B, KV, D]."""
        batch = x.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qkv = torch.mm(self.fast_in(x), self.qkv_t)
        qkv = qkv.view(batch, heads + 2 * kv_heads, head_dim)
        qk = self.fast_qk(qkv[:, : heads + kv_heads])
        qk = torch.mm(qk.view(-1, head_dim), rotation).view(batch, heads + kv_heads, head_dim)
        query = qk[:, :heads].view(batch, kv_heads, heads // kv_heads, 1, head_dim)
        return query, qk[:, heads:], qkv[:, heads + kv_heads :]

    def _finish_one(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual attention output then residual MLP: x [B, hidden], attended [B, KV, G, D]."""
        x = torch.addmm(x, attended.view(x.shape[0], -1), self.o_t)
        gate_up = torch.mm(self.fast_post(x), self.gate_up_t)
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate).mul_(up), self.down_t)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual attention output, then the residual MLP: x [B, T, hidden], attended [B, T, H*D]."""
        shape = x.shape
        flat = torch.addmm(x.reshape(-1, shape[-1]), attended.reshape(-1, attended.shape[-1]), self.o_t)
        gate_up = F.linear(rms_norm(flat, self.norm_post, self.eps_post), self.gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        flat = torch.addmm(flat, F.silu(gate) * up, self.down_t)
        return flat.view(shape)


def _softmax_inline(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim from elementwise ops and reductions, which stay on the calling
    thread for small inputs (torch.softmax splits rows across threads from two rows up)."""
    exp = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    return exp.div_(exp.sum(dim=-1, keepdim=True))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, kind: str = "sdpa"
) -> torch.Tensor:
    """Grouped-query attention -> [B, T, H*D] (q already scaled).

    q: [B, T, H, D]; k, v: [B, KV, L, D]; mask: bool [B or 1, 1, T, L] (True = attend) or None (all).
    A single query row packs the query heads of one KV head as rows, so the cache is never copied.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if length == 1:
        query = q.reshape(batch, kv_heads, groups, head_dim)
    else:
        query = q.transpose(1, 2)
        if groups > 1:
            k = (
                k[:, :, None]
                .expand(batch, kv_heads, groups, *k.shape[2:])
                .reshape(batch, heads, *k.shape[2:])
            )
            v = (
                v[:, :, None]
                .expand(batch, kv_heads, groups, *v.shape[2:])
                .reshape(batch, heads, *v.shape[2:])
            )
    if kind == "eager":
        scores = torch.matmul(query, k.transpose(-1, -2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), v)
    else:
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=1.0)
    if length == 1:  # [B, KV, groups, D] -> [B, 1, H*D]
        return out.reshape(batch, 1, heads * head_dim)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)
