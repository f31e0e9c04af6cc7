"""Streaming state for many independent codec streams in one batch, and a per-stream sample framer.

Upstream streams one utterance at a time behind a context manager; here each batch row ("slot") is
its own stream with its own frame counter, so streams start, stop and reset independently while
every step stays one batched forward. Ring caches are allocated once and updated in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moss_agent.errors import ConfigError

Slots = int | Sequence[int] | torch.Tensor


@dataclass(slots=True)
class StageCache:
    """Ring KV cache of one transformer stage, in the compute dtype.

    key_rows / value_rows: [L, B*H*capacity + 1, Dh]; row ``(b*H + h)*capacity + slot`` holds one
    head's key. The extra last row absorbs the writes of inactive slots, so a masked step needs no
    read-modify-write of the cache.
    """

    key_rows: torch.Tensor
    value_rows: torch.Tensor
    num_heads: int
    capacity: int
    tokens_per_frame: int

    @classmethod
    def allocate(
        cls, layers: int, batch: int, heads: int, capacity: int, head_dim: int, tokens_per_frame: int,
        dtype: torch.dtype, device: torch.device,
    ) -> StageCache:
        shape = (layers, batch * heads * capacity + 1, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   heads, capacity, tokens_per_frame)

    def _view(self, rows: torch.Tensor) -> torch.Tensor:
        layers, _, head_dim = rows.shape
        return rows[:, :-1].view(layers, -1, self.num_heads, self.capacity, head_dim)

    @property
    def keys(self) -> torch.Tensor:
        """[L, B, H, capacity, Dh] view of the cached (rotated) keys."""
        return self._view(self.key_rows)

    @property
    def values(self) -> torch.Tensor:
        return self._view(self.value_rows)


class CodecStreamState:
    """Per-slot streaming state of the encoder or the decoder.

    ``frames`` [B] counts the whole frames each slot has consumed; every stage's absolute token
    position is ``frames * tokens_per_frame``, so one counter drives the RoPE positions and the ring
    slots of every stage. Build it with ``codec.init_decode_state`` / ``codec.init_encode_state``.
    """

    def __init__(self, kind: str, frames: torch.Tensor, stages: list[StageCache]) -> None:
        self.kind = kind
        self.frames = frames
        self.stages = stages

    @property
    def batch_size(self) -> int:
        return int(self.frames.shape[0])

    @property
    def device(self) -> torch.device:
        return self.frames.device

    def slot_mask(self, slots: Slots) -> torch.Tensor:
        """An int, a list of ints or a bool mask [B] -> bool mask [B] on the state's device."""
        batch = self.batch_size
        if isinstance(slots, torch.Tensor) and slots.dtype == torch.bool:
            if slots.shape != (batch,):
                raise ConfigError(f"slot mask has shape {tuple(slots.shape)}; expected ({batch},)")
            return slots.to(self.device)
        indices = torch.as_tensor([slots] if isinstance(slots, int) else slots, dtype=torch.long).flatten()
        if indices.numel() and (int(indices.min()) < -batch or int(indices.max()) >= batch):
            raise ConfigError(f"slot index out of range for a state of {batch} slots: {indices.tolist()}")
        mask = torch.zeros(batch, dtype=torch.bool)
        mask[indices] = True
        return mask.to(self.device)

    def reset(self, slots: Slots) -> None:
        """Start a new stream in ``slots``; the other slots are not touched."""
        mask = self.slot_mask(slots)
        self.frames.masked_fill_(mask, 0)
        # Unwritten ring slots are masked anyway; zeroing makes a reset slot identical to a fresh one.
        cache_mask = mask[None, :, None, None, None]
        for stage in self.stages:
            stage.keys.masked_fill_(cache_mask, 0)
            stage.values.masked_fill_(cache_mask, 0)

    def nbytes(self) -> int:
        return sum(s.key_rows.nbytes + s.value_rows.nbytes for s in self.stages) + self.frames.nbytes


class SampleFramer:
    """Buffers arbitrary-length sample chunks per stream and hands out whole codec frames.

    Microphone audio arrives in 20 ms pieces; the encoder needs 1920-sample frames and must not see
    zero padding mid-stream (it would enter the causal history). ``flush`` pads a stream's remainder
    to a whole frame only when that stream ends.
    """

    def __init__(self, batch_size: int, frame_size: int = 1920) -> None:
        if batch_size < 1 or frame_size < 1:
            raise ConfigError("SampleFramer needs batch_size >= 1 and frame_size >= 1")
        self.batch_size = batch_size
        self.frame_size = frame_size
        self._pending: list[list[np.ndarray]] = [[] for _ in range(batch_size)]
        self._count = [0] * batch_size

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.batch_size:
            raise ConfigError(f"slot {slot} out of range for {self.batch_size} streams")

    def push(self, slot: int, samples: np.ndarray | torch.Tensor) -> None:
        """Append mono float samples [n] to ``slot``."""
        self._check(slot)
        if isinstance(samples, torch.Tensor):
            samples = samples.detach().float().cpu().numpy()
        array = np.asarray(samples, dtype=np.float32)
        if array.ndim != 1:
            raise ConfigError(f"push expects mono samples of shape [n], got {array.shape}")
        if array.size:
            self._pending[slot].append(array)
            self._count[slot] += array.size

    def flush(self, slot: int) -> None:
        """Zero-pad the slot's partial frame (if any) so it can be popped: call at the end of a stream."""
        self._check(slot)
        remainder = self._count[slot] % self.frame_size
        if remainder:
            self.push(slot, np.zeros(self.frame_size - remainder, dtype=np.float32))

    def reset(self, slot: int) -> None:
        """Drop whatever ``slot`` has buffered."""
        self._check(slot)
        self._pending[slot].clear()
        self._count[slot] = 0

    def frames_ready(self) -> list[int]:
        return [count // self.frame_size for count in self._count]

    def pop(self, frames: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Take ``frames`` whole frames from every slot that has them.

        Returns wav [B, 1, frames*frame_size] (zeros in slots that are not ready) and active [B] bool,
        ready to pass to ``codec.encode_step(wav, state, active)``.
        """
        need = frames * self.frame_size
        wav = np.zeros((self.batch_size, 1, need), dtype=np.float32)
        active = np.zeros(self.batch_size, dtype=bool)
        for slot in range(self.batch_size):
            if self._count[slot] < need:
                continue
            joined = np.concatenate(self._pending[slot])
            wav[slot, 0] = joined[:need]
            rest = joined[need:]
            self._pending[slot] = [rest] if rest.size else []
            self._count[slot] = rest.size
            active[slot] = True
        return torch.from_numpy(wav), torch.from_numpy(active)
