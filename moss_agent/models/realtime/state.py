"""The realtime generator's per-slot state, in one object that the eager, compiled and graphed ticks share.

``GenerationState`` holds everything a slot's generation reads or writes: the backbone and local KV
caches, the rows fed so far, the tick's fixed input buffers, sampling state, the host-side control
mirror (lengths, text, turn flags) and the per-slot records (turn, context layout). The tick, the
``CompiledTick`` and the ``TickGraph`` read its public fields; ``reset(mask)`` returns slots to
empty. The idea (caches, offsets, input buffers and graphed callables in one state object, reset by
mask) is moshi's ``_LMGenState`` (kyutai-labs/moshi, moshi/models/lm.py).

Row layout of a slot's context (``SlotRecord``): the system/voice prefix (``prefix_rows``, fed with
the first turn and never trimmed), then one block per kept turn, starting at ``turn_starts[i]`` with
the turn's user rows and ending with the rows that close it (its last heard frame and the EOS row).
The closing rows of the latest turn wait in ``closing`` until the next prompt feeds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moss_agent.models.realtime.local_transformer import LocalCache
from moss_agent.models.realtime.model import BackboneCache, MossTTSRealtime
from moss_agent.models.realtime.text import TextTokenizer
from moss_agent.models.sampling import RepetitionWindow, RowSampler, SamplingConfig

if TYPE_CHECKING:
    from moss_agent.models.realtime.accelerated import CompiledTick, TickGraph

# Attention lengths are multiples of this many rows (and so is the whole cache): vectorised
# kernels then run without scalar tails.
ROW_BLOCK = 64

# An attention plan: (first slot, end slot, key rows) runs covering every slot in order.
Spans = tuple[tuple[int, int, int], ...]


@dataclass
class TurnRecord:
    """The assistant turn a slot is in; ``closed`` once rolled back or ended by the next turn."""

    tokenizer: TextTokenizer
    sampling: SamplingConfig
    base: int  # cache rows before this turn's assistant text
    prefill_len: int = 0
    closed: bool = False


@dataclass
class SlotRecord:
    """One slot's conversation: its turn and the layout of its context rows (see the module docstring)."""

    active: bool = False
    prefix: torch.Tensor | None = None  # system/voice rows not fed yet (the first turn feeds them)
    prefix_rows: int = 0
    turn_starts: list[int] = field(default_factory=list)
    closing: torch.Tensor | None = None  # [n, 1 + rvq] on the device: close the last turn, fed next
    turn: TurnRecord | None = None

    def pending_rows(self) -> int:
        """Rows waiting to be fed with the next prompt (prefix or closing rows)."""
        return sum(0 if rows is None else rows.shape[0] for rows in (self.prefix, self.closing))


@dataclass(frozen=True)
class ContextLayout:
    """Where a slot's context rows come from: ``prefix_rows`` of system/voice prompt, then the
    kept turns starting at ``turn_starts``; ``length`` rows are in the cache and ``pending_rows``
    more (prefix or the last turn's closing rows) are fed with the next prompt."""

    prefix_rows: int
    turn_starts: tuple[int, ...]
    length: int
    pending_rows: int


@dataclass(eq=False)
class GenerationState:
    """Per-slot generation state for ``num_slots`` slots of ``max_context`` rows; see the module docstring.

    Device tensors (S = slots):
    cache / local_cache: backbone KV cache (rows a multiple of ROW_BLOCK) and the local transformer's;
    rows: [S, max_context + 1, 1 + rvq] ids fed at each cache row; prev_frame: [S, rvq] last frame;
    pending_hidden: [S, hidden] backbone state of a prefill's last row (makes a turn's frame 0);
    repetition, sampler, banned [S, rvq, vocab], seeds [S]: sampling state;
    min_frames [S] with eos_code [vocab] (the audio-EOS id of codebook 0): EOS is banned while a
    slot's frame index is below its min_frames (``first_codebook_ban``);
    in_token, in_positions, in_fresh, in_generating, in_frame_index: [S] the tick's inputs, fixed
    buffers so a captured graph replays on the same memory.
    Host mirror (CPU, so no tick asks the device): text [S, max_context] and n_text / text_ptr,
    text_ended, running, prefilled, fresh, frames, max_frames, length, ended_eos: [S].
    compiled / graph: the tick's accelerated callables, when built.
    """

    cache: BackboneCache
    local_cache: LocalCache
    rows: torch.Tensor
    prev_frame: torch.Tensor
    pending_hidden: torch.Tensor
    repetition: RepetitionWindow
    sampler: RowSampler
    banned: torch.Tensor
    min_frames: torch.Tensor
    eos_code: torch.Tensor
    seeds: torch.Tensor
    slot_index: torch.Tensor
    in_token: torch.Tensor
    in_positions: torch.Tensor
    in_fresh: torch.Tensor
    in_generating: torch.Tensor
    in_frame_index: torch.Tensor
    text: torch.Tensor
    n_text: torch.Tensor
    text_ptr: torch.Tensor
    text_ended: torch.Tensor
    running: torch.Tensor
    prefilled: torch.Tensor
    fresh: torch.Tensor
    frames: torch.Tensor
    max_frames: torch.Tensor
    length: torch.Tensor
    ended_eos: torch.Tensor
    slots: list[SlotRecord]
    pad: int
    compiled: CompiledTick | None = None
    graph: TickGraph | None = None

    @classmethod
    def allocate(
        cls, model: MossTTSRealtime, num_slots: int, max_context: int, top_k_cap: int, max_window: int
    ) -> GenerationState:
        config, device = model.config, model.device
        rvq, vocab, pad = config.rvq, config.audio_vocab_size, config.audio_pad
        cache_rows = -(-(max_context + 1) // ROW_BLOCK) * ROW_BLOCK

        def host(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(num_slots, dtype=dtype)

        def inputs(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(num_slots, dtype=dtype, device=device)

        eos_code = torch.zeros(vocab, dtype=torch.bool, device=device)
        eos_code[config.audio_eos] = True

        return cls(
            cache=model.new_backbone_cache(num_slots, cache_rows - 1),
            local_cache=model.local_transformer.new_cache(num_slots),
            rows=torch.full((num_slots, max_context + 1, 1 + rvq), pad, dtype=torch.long, device=device),
            prev_frame=torch.full((num_slots, rvq), pad, dtype=torch.long, device=device),
            pending_hidden=torch.zeros(num_slots, config.hidden_size, dtype=model.dtype, device=device),
            repetition=RepetitionWindow(num_slots, rvq, max_window, device),
            sampler=RowSampler(num_slots, top_k_cap, device),
            banned=torch.zeros(num_slots, rvq, vocab, dtype=torch.bool, device=device),
            min_frames=inputs(torch.long),
            eos_code=eos_code,
            seeds=inputs(torch.long),
            slot_index=torch.arange(num_slots, device=device),
            in_token=inputs(torch.long),
            in_positions=inputs(torch.long),
            in_fresh=inputs(torch.bool),
            in_generating=inputs(torch.bool),
            in_frame_index=inputs(torch.long),
            text=torch.zeros(num_slots, max_context, dtype=torch.long),
            n_text=host(torch.long),
            text_ptr=host(torch.long),
            text_ended=host(torch.bool),
            running=host(torch.bool),
            prefilled=host(torch.bool),
            fresh=host(torch.bool),
            frames=host(torch.long),
            max_frames=host(torch.long),
            length=host(torch.long),
            ended_eos=host(torch.bool),
            slots=[SlotRecord() for _ in range(num_slots)],
            pad=pad,
        )

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def max_context(self) -> int:
        return self.text.shape[1]

    @property
    def whole_cache(self) -> Spans:
        """The attention plan that reads every cache row for every slot (fixed shapes: graphs)."""
        return ((0, self.num_slots, self.cache.keys.shape[3]),)

    def reset(self, mask: torch.Tensor) -> None:
        """Return the slots in ``mask`` [S] bool (CPU) to empty: no conversation, no turn, no rows."""
        for tensor in (self.n_text, self.text_ptr, self.frames, self.max_frames, self.length):
            tensor.masked_fill_(mask, 0)
        for flags in (self.text_ended, self.running, self.prefilled, self.fresh, self.ended_eos):
            flags.masked_fill_(mask, False)
        self.prev_frame.masked_fill_(mask.to(self.prev_frame.device)[:, None], self.pad)
        self.min_frames.masked_fill_(mask.to(self.min_frames.device), 0)
        for slot in mask.nonzero().flatten().tolist():
            self.slots[slot] = SlotRecord()

    def first_codebook_ban(self) -> torch.Tensor:
        """[S, vocab] bool: the ids codebook 0 may not take this tick, i.e. the slot's banned ids plus
        audio EOS while the frame being made (``in_frame_index``) is below the slot's min_frames.
        Tensor ops on fixed buffers only, so the eager, compiled and graphed ticks share it."""
        early = self.in_frame_index < self.min_frames
        return self.banned[:, 0] | (early[:, None] & self.eos_code)

    def set_idle_inputs(self) -> None:
        """Inputs of a tick in which no slot generates: every slot writes its row at its current
        length, i.e. into free cache rows, and no conversation state changes (warm-up, capture)."""
        self.in_generating.zero_()
        self.in_fresh.zero_()
        self.in_positions.copy_(self.length.clamp(max=self.max_context))

    def nbytes(self) -> int:
        """Bytes of preallocated per-slot state (KV caches, rows, text, sampling)."""
        tensors = [
            self.cache.keys,
            self.cache.values,
            self.local_cache.keys,
            self.local_cache.values,
            self.rows,
            self.text,
            self.repetition.ring,
            self.banned,
            self.pending_hidden,
        ]
        return sum(t.numel() * t.element_size() for t in tensors)
