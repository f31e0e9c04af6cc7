"""Residual LFQ / VQ quantizer of MOSS-Audio-Tokenizer (inference only), always computed in float32.

Parameter names mirror the official checkpoint (weight-normed 1x1 convs stored as
``parametrizations.weight.original0`` = g and ``original1`` = v); the math follows
/shared/reference/audio-tokenizer.md section 2.5. Tensors are time-major: ``[B, T, C]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moss_agent.models.codec.config import QuantizerConfig


class _WeightNormParameters(nn.Module):
    def __init__(self, out_channels: int, in_channels: int) -> None:
        super().__init__()
        self.original0 = nn.Parameter(torch.ones(out_channels, 1, 1))
        self.original1 = nn.Parameter(torch.ones(out_channels, in_channels, 1))


class WeightNormConv1x1(nn.Module):
    """A weight-normed ``Conv1d(kernel_size=1)`` with bias, applied as a linear map on the last dim."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.parametrizations = nn.ModuleDict({"weight": _WeightNormParameters(out_channels, in_channels)})
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def weight(self) -> torch.Tensor:
        """W = g * v / ||v|| with the norm over (in, k) per output channel -> [out, in] float32."""
        params = self.parametrizations["weight"]
        return torch._weight_norm(params.original1.float(), params.original0.float(), 0)[..., 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight(), self.bias.float())


def _projection(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Identity() if in_channels == out_channels else WeightNormConv1x1(in_channels, out_channels)


class _Codebook(nn.Module):
    """One quantizer: project down, pick the nearest code, project the raw code vector back up."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_proj = _projection(dim, codebook_dim)
        self.out_proj = _projection(codebook_dim, dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)


class ResidualQuantizer(nn.Module):
    """``quantizer.*`` of the checkpoint; parameters stay float32 whatever dtype the codec runs in."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        self.input_proj = _projection(config.input_dim, config.rvq_dim)
        self.output_proj = _projection(config.rvq_dim, config.output_dim)
        self.quantizers = nn.ModuleList(
            [_Codebook(config.rvq_dim, config.codebook_size, config.codebook_dim)
             for _ in range(config.num_quantizers)]
        )
        self._tables: tuple[tuple[int, ...], dict[int, tuple[torch.Tensor, ...]]] | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ResidualQuantizer:
        # `.to(dtype)` / `.half()` on the codec must not round the quantizer: keep fp32, follow the device.
        def keep_float32(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            if tensor.is_floating_point() and moved.dtype != tensor.dtype:
                return tensor.to(device=moved.device)
            return moved

        self._tables = None
        super()._apply(keep_float32, recurse)
        return self

    @torch.no_grad()
    def encode(
        self, latents: torch.Tensor, lengths: torch.Tensor | None, num_quantizers: int
    ) -> torch.Tensor:
        """latents: [B, T, input_dim]; lengths: [B] valid frames or None (all valid) -> codes [nq, B, T].

        Frames past a row's length see a zero residual (they still get an index), as upstream.
        """
        residual = self.input_proj(latents.float()).float()
        mask = None
        if lengths is not None:
            frames = torch.arange(residual.shape[1], device=residual.device)
            mask = (frames[None, :] < lengths[:, None]).unsqueeze(-1).float()
        codes = []
        for quantizer in self.quantizers[:num_quantizers]:
            masked = residual if mask is None else residual * mask
            projected = quantizer.in_proj(masked).float()
            indices = self._nearest(projected, quantizer.codebook.weight.float())
            chosen = F.embedding(indices, quantizer.codebook.weight).float()
            # Straight-through form kept literally: it rounds differently from `chosen` alone.
            update = quantizer.out_proj(projected + (chosen - projected)).float()
            residual = residual - (update if mask is None else update * mask)
            codes.append(indices)
        return torch.stack(codes)

    def _nearest(self, vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """vectors: [B, T, D] -> indices [B, T] of the nearest code (cosine for LFQ)."""
        flat = vectors.reshape(-1, vectors.shape[-1])
        if self.config.normalize:
            flat = F.normalize(flat)
            codebook = F.normalize(codebook)
        distance = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
        return (-distance).max(1)[1].reshape(vectors.shape[:-1])

    def _decode_tables(self, num_quantizers: int) -> tuple[torch.Tensor, ...]:
        """Stacked codebooks [nq, K, Dc], merged out weights [nq, Dc, D] and biases [nq, 1, D], cached.

        In eager mode the cache key holds every parameter's storage and version, so loading or
        editing weights rebuilds the tables; a compiled step reuses what eager calls built.
        """
        if self._tables is None or not torch.compiler.is_compiling():
            key = tuple(p._version for p in self.parameters()) + tuple(p.data_ptr() for p in self.parameters())
            if self._tables is None or self._tables[0] != key:
                self._tables = (key, {})
        tables = self._tables[1]
        if num_quantizers not in tables:
            used = self.quantizers[:num_quantizers]
            codebooks = torch.stack([q.codebook.weight.float() for q in used])
            if isinstance(used[0].out_proj, WeightNormConv1x1):
                weights = torch.stack([q.out_proj.weight().t() for q in used])
                biases = torch.stack([q.out_proj.bias.float() for q in used])[:, None]
            else:
                dim = codebooks.shape[-1]
                weights = torch.eye(dim, device=codebooks.device).expand(num_quantizers, dim, dim)
                biases = torch.zeros(num_quantizers, 1, dim, device=codebooks.device)
            tables[num_quantizers] = (codebooks, weights.contiguous(), biases)
        return tables[num_quantizers]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [nq, B, T] (any prefix nq) -> latents [B, T, output_dim] float32."""
        num_quantizers, batch, length = codes.shape
        codebooks, weights, biases = self._decode_tables(num_quantizers)
        index = codes.reshape(num_quantizers, batch * length, 1).expand(-1, -1, codebooks.shape[-1])
        vectors = codebooks.gather(1, index)  # [nq, B*T, Dc]
        summed = torch.baddbmm(biases, vectors, weights).sum(0)  # [B*T, D]
        return self.output_proj(summed.view(batch, length, -1)).float()
