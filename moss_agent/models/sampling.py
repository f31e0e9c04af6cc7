"""Batched token sampling with per-row settings: repetition penalty, temperature, top-k, top-p, greedy.

Order as in MOSS-TTS-Realtime: penalty -> temperature -> top-k -> top-p -> draw. Every row has its own
settings and its own random stream. Random numbers come from a counter-based hash of (seed, counter,
index) instead of a shared ``torch.Generator``, so a row's draws depend only on its own seed and
position: adding or removing other rows in the batch never changes them, and no per-row Python loop
or generator object is needed. The draw itself is an inverse-CDF pick over the kept candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moss_agent.errors import ConfigError

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingConfig:
    """Per-turn sampling settings. Defaults are the MOSS-TTS-Realtime recommendations.

    ``greedy`` (or ``temperature == 0``) takes the argmax after the repetition penalty.
    ``top_p`` of None disables that filter. ``top_k`` bounds the candidates every draw picks from
    (the sampler keeps a fixed-size candidate list), so sampling needs one; None is only for greedy. ``repetition_window`` counts frames of the
    current turn; the penalty applies per codebook to every distinct code in the window.
    ``mask_special_codes`` forbids ids the model must not emit (pad and BOS in codebook 0, pad, BOS
    and EOS in codebooks 1..15); upstream does not mask them (set False to reproduce it).
    ``min_frames`` is a minimum length: the audio-EOS code is forbidden on a turn's first
    ``min_frames`` frames, so a turn that starts speaking says at least that much (a frame cap or
    the context limit still ends it sooner). 0, the default, leaves the model free to stop at once.
    """

    temperature: float = 0.8
    top_p: float | None = 0.6
    top_k: int | None = 30
    repetition_penalty: float = 1.1
    repetition_window: int = 50
    greedy: bool = False
    mask_special_codes: bool = True
    min_frames: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_k is None and not self.is_greedy:
            raise ConfigError(
                "top_k=None cannot disable the filter: the sampler draws from a fixed top-k candidate "
                "list; give a top_k (30 is the model's default, at most the engine's max_top_k of 64) "
                "or set greedy=True"
            )
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}"
            )
        if self.repetition_window < 0:
            raise ConfigError(f"repetition_window must be >= 0, got {self.repetition_window}")
        if self.min_frames < 0:
            raise ConfigError(f"min_frames must be >= 0 (0: no minimum), got {self.min_frames}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """HF-style penalty, in place: every id in ``history`` [B, W] (repeats allowed) has its logit
    multiplied (if negative) or divided (if positive) by ``penalty`` [B, 1]; 1 leaves it unchanged.
    logits: [B, V] float."""
    values = logits.gather(1, history)
    values = torch.where(values.signbit(), values * penalty, values / penalty)
    return logits.scatter_(1, history, values)


class RowSampler:
    """Per-row sampling settings held as tensors, updated in place when a row's turn starts.

    ``k_max`` is fixed for the sampler's life, so a row's result never depends on the other rows'
    settings: top-k keeps ranks below each row's own k, within a top-``k_max`` candidate list.
    """

    def __init__(self, batch: int, k_max: int, device: torch.device) -> None:
        self.k_max = k_max
        self.inv_temperature = torch.ones(batch, 1, device=device)
        self.rank_bias = torch.zeros(batch, k_max, device=device)
        self.top_p = torch.ones(batch, 1, device=device)
        self.greedy = torch.zeros(batch, dtype=torch.bool, device=device)
        self._ranks = torch.arange(k_max, device=device)

    def set_row(
        self, row: int, *, temperature: float, top_k: int | None, top_p: float | None, greedy: bool
    ) -> None:
        self.inv_temperature[row] = 1.0 if greedy or temperature == 0 else 1.0 / temperature
        k = self.k_max if top_k is None else min(top_k, self.k_max)
        self.rank_bias[row] = torch.where(self._ranks < k, 0.0, float("-inf"))
        self.top_p[row] = 2.0 if top_p is None else top_p  # >= 1: keep every candidate
        self.greedy[row] = greedy or temperature == 0

    def __call__(self, logits: torch.Tensor, uniform: torch.Tensor, any_greedy: bool = True) -> torch.Tensor:
        """logits [B, V] float (penalty applied), uniform [B] in [0, 1) -> ids [B] long."""
        values, indices = torch.topk(logits, self.k_max, dim=-1, sorted=True)
        probs = torch.softmax(torch.addcmul(self.rank_bias, values, self.inv_temperature), dim=-1)
        cumulative = probs.cumsum(dim=-1)
        # Upstream drops the ascending-order tail whose cumulative mass is <= 1 - top_p; in descending
        # order that keeps exactly the ids whose preceding mass is < top_p, a prefix that always holds
        # the best id. Inside that prefix the global cumulative sum is already the prefix's CDF.
        keep = (cumulative - probs) < self.top_p
        kept = keep.sum(dim=-1, keepdim=True)
        total = cumulative.gather(1, kept - 1)
        choice = torch.searchsorted(cumulative, uniform[:, None] * total, right=True)
        sampled = indices.gather(1, torch.minimum(choice, kept - 1))[:, 0]
        if not any_greedy:
            return sampled
        return torch.where(self.greedy, logits.argmax(dim=-1), sampled)


def pick_codes(
    logits: torch.Tensor,
    sampler: RowSampler,
    *,
    history: torch.Tensor | None,
    penalty: torch.Tensor | None,
    banned: torch.Tensor | None,
    uniform: torch.Tensor | None,
    any_greedy: bool = True,
) -> torch.Tensor:
    """One codebook's choice for every row: logits [B, V] -> ids [B] long.

    history [B, W] with penalty [B, 1] (repetition penalty), banned [B, V] bool (ids never
    chosen), uniform [B] (the draw); None skips that feature (no uniform: greedy for every row).
    """
    scores = logits.float()
    if history is not None and penalty is not None:
        scores = apply_repetition_penalty(scores, history, penalty)
    if banned is not None:
        scores = scores.masked_fill(banned, float("-inf"))
    if uniform is None:
        return scores.argmax(dim=-1)
    return sampler(scores, uniform, any_greedy)


def sample_rows(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    greedy: torch.Tensor,
    uniform: torch.Tensor,
    k_max: int,
) -> torch.Tensor:
    """One-off form of ``RowSampler``: logits [B, V], per-row settings [B] -> ids [B] long.

    temperature [B] (ignored where greedy), top_k [B] (>= k_max disables), top_p [B] (>= 1
    disables), greedy [B] bool, uniform [B] in [0, 1); k_max <= V candidates are considered.
    """
    sampler = RowSampler(logits.shape[0], k_max, logits.device)
    for row in range(logits.shape[0]):
        sampler.set_row(
            row,
            temperature=float(temperature[row]),
            top_k=int(top_k[row]),
            top_p=float(top_p[row]),
            greedy=bool(greedy[row]),
        )
    return sampler(logits, uniform)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32) without int64 overflow (16-bit halves)."""
    low = (x & 0xFFFF) * constant
    high = ((x >> 16) * constant) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 (Chris Wellons' integer hash), a well-mixed 32-bit permutation.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor, count: int) -> torch.Tensor:
    """Uniform floats in [0, 1): seeds [B] int64, counters [B] int64 -> [B, count] float32.

    Value (b, j) depends only on (seeds[b], counters[b], j).
    """
    lane = torch.arange(count, device=seeds.device, dtype=torch.int64)[None, :]
    key = _hash32((seeds & _MASK32) ^ _hash32((seeds >> 32) & _MASK32))[:, None]
    x = _hash32(key ^ _hash32(((counters[:, None] * count + lane) & _MASK32) ^ 0x9E3779B9))
    x = _hash32(x ^ ((counters[:, None] >> 28) & _MASK32))
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


class RepetitionWindow:
    """Each row's codes of its last ``window`` frames, per codebook, for ``apply_repetition_penalty``.

    ring: [B, C, R] (R = max_window). Row b writes frame n at n % window and also into every
    position not in use yet (all of them at frame 0, and those >= window), so every position
    always holds a code from the window: repeats are harmless to the penalty, and no per-row
    lengths or masks are needed.
    """

    def __init__(self, batch: int, codebooks: int, max_window: int, device: torch.device) -> None:
        self.max_window = max(max_window, 1)
        self.ring = torch.zeros(batch, codebooks, self.max_window, dtype=torch.long, device=device)
        self.window = torch.ones(batch, 1, dtype=torch.long, device=device)
        self.penalty = torch.ones(batch, 1, device=device)
        self._positions = torch.arange(self.max_window, device=device)[None, :]

    def start(self, row: int, window: int, penalty: float) -> None:
        """New turn for ``row``: window 0 or penalty 1 turns the penalty off."""
        self.window[row] = max(window, 1)
        self.penalty[row] = penalty if window > 0 else 1.0

    def frame_penalty(self, frame_index: torch.Tensor) -> torch.Tensor:
        """[B, 1] penalty for frame ``frame_index`` [B]: none on a turn's first frame (empty history)."""
        return torch.where(frame_index[:, None] > 0, self.penalty, 1.0)

    def history(self, codebook: int) -> torch.Tensor:
        return self.ring[:, codebook]

    def record(self, codes: torch.Tensor, frame_index: torch.Tensor, active: torch.Tensor) -> None:
        """Store frame ``frame_index[b]`` (codes [B, C]) for the active rows."""
        slot = (frame_index % self.window[:, 0])[:, None]
        write = (self._positions == slot) | (self._positions >= self.window) | (frame_index[:, None] == 0)
        write &= active[:, None]
        self.ring.copy_(torch.where(write[:, None, :], codes[:, :, None], self.ring))
