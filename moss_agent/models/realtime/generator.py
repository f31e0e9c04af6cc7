"""Batched streaming generation for MOSS-TTS-Realtime: a fixed number of slots, one forward per tick.

Each slot is one conversation with its own preallocated KV cache rows. A tick (``step``) advances
every slot that is ready by one codec frame (80 ms of audio) in ONE batched backbone forward plus
one batched pass of the local transformer; idle and finished slots ride along masked. Prompt
prefill (``start_turn``) and the 12-token text prefill run per slot.

Usage (the engine owns one generator per device, on one thread)::

    gen = RealtimeGenerator(model, tokenizer, num_slots=8, max_context=4096)
    gen.start_conversation(slot, system_prompt=None, voice_codes=None)      # resets the slot
    gen.start_turn(slot, user_text="Hi", user_codes=None, sampling=SamplingConfig(), seed=1)
    gen.push_text(slot, "Hello there")     # any chunking; ids never change at chunk boundaries
    gen.end_text(slot)
    while gen.has_work():
        out = gen.step()                   # StepOutput, CPU tensors over all slots
        for slot in out.produced.nonzero().flatten().tolist(): ...   # out.frames[slot]: [rvq]
    text = gen.rollback(slot, heard_frames)  # after an interruption: keep what the user heard
    gen.release(slot)

On CUDA the device part of a tick (backbone row, 16 local steps, sampling) is captured once in a
CUDA graph and replayed (``cuda_graph=True``, the default); on the CPU it runs eagerly, or through
torch.compile with ``compile=True`` (about 2x faster after a one-off compile). ``step(hold)`` / ``has_work(hold)`` take an optional [S] bool mask of slots to skip this tick.
``push_tokens`` feeds ids directly; ``restore_context(slot, rows)`` rebuilds a slot from saved
``context_rows``. A slot's frames never depend on the other slots (same seed, same frames).

Timing facts: frame f of a turn sits in the row of text token 12+f (``StepOutput.text_position``
gives how many text tokens the model had read when it made each frame). After the text ends,
``<|text_pad|>`` rows drive the rest of the speech until audio EOS (codebook 0 == 1026).

Deliberate fixes of upstream behaviour (reference/realtime-model.md section 14), each switched back
by ``upstream_compat=True`` (used for the parity goldens):
- text deltas go through ``GrowingTextTokenizer`` (ids as if the whole text were tokenized at once)
  instead of upstream's per-segment tokenization;
- a text that ends before the 12-token prefill with more than 12 tokens (one ``end_text`` push)
  still prefills 12, keeping BOS on the 12th token as in training; upstream prefilled all of it;
- a turn leaves the context as training saw it: its last frame is fed and the EOS row
  ``[<|text_pad|>, 1026, pad...]`` closes it before the next user turn;
Always on: a frame cap per turn (``max_frames``) and a context guard, so a missing EOS cannot run
forever. ``SamplingConfig.mask_special_codes`` (default on) forbids pad/BOS codes that upstream
could sample. Voice and user codes are always [frames, codebooks]; no layout guessing.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from moss_agent.errors import ConfigError, EngineError
from moss_agent.models.realtime.accelerated import CompiledTick, TickGraph
from moss_agent.models.realtime.config import DELAY_TOKENS
from moss_agent.models.realtime.model import MossTTSRealtime
from moss_agent.models.realtime.prompt import PromptBuilder
from moss_agent.models.realtime.text import GrowingTextTokenizer, TextTokenizer, UpstreamSegmentTokenizer
from moss_agent.models.sampling import (
    RepetitionWindow,
    RowSampler,
    SamplingConfig,
    counter_uniforms,
    pick_codes,
)

log = logging.getLogger(__name__)

# Rows a turn must keep free: its unfed last frame and the EOS row that closes it.
_END_ROWS = 2


@dataclass(frozen=True)
class StepOutput:
    """Result of one tick, CPU tensors indexed by slot.

    frames: [S, rvq] codes; meaningful only where ``produced``.
    produced: [S] bool, a frame was made this tick (including an EOS frame).
    eos: [S] bool, this frame is audio EOS (codebook 0 == 1026): the turn ended, do not decode it.
    capped: [S] bool, the turn stopped after this frame at its frame cap or the context limit.
    finished: [S] bool, the turn ended this tick (eos, capped, or text ended with no tokens at all).
    frame_index: [S] long, index of this frame in its turn.
    text_position: [S] long, text tokens of the turn the model had read when it made this frame.
    """

    frames: torch.Tensor
    produced: torch.Tensor
    eos: torch.Tensor
    capped: torch.Tensor
    finished: torch.Tensor
    frame_index: torch.Tensor
    text_position: torch.Tensor


@dataclass
class _Turn:
    tokenizer: TextTokenizer
    sampling: SamplingConfig
    base: int  # cache rows before this turn's assistant text
    prefill_len: int = 0
    closed: bool = False


@dataclass
class _Slot:
    active: bool = False
    pending_rows: list[torch.Tensor] = field(default_factory=list)  # fed with the next turn's prompt
    turn: _Turn | None = None


class RealtimeGenerator:
    """Streaming generator with ``num_slots`` independent slots; see the module docstring."""

    def __init__(
        self,
        model: MossTTSRealtime,
        tokenizer: Any,
        num_slots: int,
        max_context: int = 4096,
        *,
        max_frames_per_turn: int = 1500,
        max_top_k: int = 64,
        max_repetition_window: int = 64,
        upstream_compat: bool = False,
        seed: int | None = None,
        attention_bucket: int | None = 64,
        cuda_graph: bool = True,
        compile: bool | str = False,
    ) -> None:
        if num_slots < 1:
            raise ConfigError(f"num_slots must be >= 1, got {num_slots}")
        if attention_bucket is not None and attention_bucket < 1:
            raise ConfigError(f"attention_bucket must be >= 1 or None, got {attention_bucket}")
        if max_context < 4 * DELAY_TOKENS:
            raise ConfigError(f"max_context {max_context} is too small; use at least {4 * DELAY_TOKENS}")
        config = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.num_slots = num_slots
        self.max_context = max_context
        self.max_frames_per_turn = max_frames_per_turn
        self.upstream_compat = upstream_compat
        # A tick's backbone attention reads the cache rows in use, rounded up to a multiple of
        # ``attention_bucket`` (None: the whole preallocated cache), so a long max_context costs
        # nothing until it is used. Rows past a slot's position are masked; with a multiple of 64
        # the CPU attention kernel gives bit-identical results for any rounded length, so a slot's
        # numbers still never depend on the other slots (tests check it). A CUDA graph needs
        # fixed shapes and always reads the whole cache.
        self.uses_cuda_graph = cuda_graph and model.device.type == "cuda"
        self.attention_bucket = None if self.uses_cuda_graph else attention_bucket
        self.prompts = PromptBuilder(tokenizer, config)
        self.device = model.device
        model.prepare_inference()  # no first-turn latency spike
        self._seed_source = random.Random(seed)
        self._top_k_cap = min(max_top_k, config.audio_vocab_size)
        self._max_window = max_repetition_window
        rvq, vocab, device = config.rvq, config.audio_vocab_size, self.device
        self._slots = [_Slot() for _ in range(num_slots)]
        self._slot_index = torch.arange(num_slots)

        # Model-side state (device), preallocated once.
        self.cache = model.new_backbone_cache(num_slots, max_context)
        self._local_cache = model.local_transformer.new_cache(num_slots)
        self._rows = torch.full(
            (num_slots, max_context + 1, 1 + rvq), config.audio_pad, dtype=torch.long, device=device
        )
        self._prev_frame = torch.full((num_slots, rvq), config.audio_pad, dtype=torch.long, device=device)
        self._pending_hidden = torch.zeros(num_slots, config.hidden_size, dtype=model.dtype, device=device)
        self._repetition = RepetitionWindow(num_slots, rvq, max_repetition_window, device)
        self._banned = torch.zeros(num_slots, rvq, vocab, dtype=torch.bool, device=device)
        self._special = torch.zeros(rvq, vocab, dtype=torch.bool, device=device)
        self._special[:, config.audio_pad : config.audio_bos + 1] = True
        self._special[1:, config.audio_eos] = True
        self._sampler = RowSampler(num_slots, self._top_k_cap, device)
        self._seeds = torch.zeros(num_slots, dtype=torch.long, device=device)

        # Control state (CPU), mirrored exactly on the host so no tick needs to ask the device.
        self._text = torch.zeros(num_slots, max_context, dtype=torch.long)
        self._n_text = torch.zeros(num_slots, dtype=torch.long)
        self._text_ptr = torch.zeros(num_slots, dtype=torch.long)
        self._text_ended = torch.zeros(num_slots, dtype=torch.bool)
        self._running = torch.zeros(num_slots, dtype=torch.bool)
        self._prefilled = torch.zeros(num_slots, dtype=torch.bool)
        self._fresh = torch.zeros(num_slots, dtype=torch.bool)
        self._frames = torch.zeros(num_slots, dtype=torch.long)
        self._max_frames = torch.zeros(num_slots, dtype=torch.long)
        self._length = torch.zeros(num_slots, dtype=torch.long)
        self._ended_eos = torch.zeros(num_slots, dtype=torch.bool)
        self._any_sampling = False
        self._any_greedy = False
        self._any_penalty = False
        self._any_banned = False
        self._slot_index_device = self._slot_index.to(device)
        self.last_hidden: torch.Tensor | None = None

        # The tick's device inputs live in fixed buffers, so the device part of a tick reads and
        # writes the same memory every time and can be replayed from a CUDA graph.
        self._in_token = torch.zeros(num_slots, dtype=torch.long, device=device)
        self._in_positions = torch.zeros(num_slots, dtype=torch.long, device=device)
        self._in_fresh = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self._in_generating = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self._in_frame_index = torch.zeros(num_slots, dtype=torch.long, device=device)
        self._graph: TickGraph | None = None
        self._compiled = (
            CompiledTick(self, "inductor" if compile is True else compile) if compile else None
        )
        # Run every sampling feature each tick, as the graph does, instead of skipping those no
        # row uses; the frames are the same either way (tests check it on the CPU).
        self.full_tick = self.uses_cuda_graph or self._compiled is not None

    # -- conversation and turn control ---------------------------------------------------------

    def _check_slot(self, slot: int) -> _Slot:
        if not 0 <= slot < self.num_slots:
            raise ConfigError(f"slot {slot} does not exist; this generator has slots 0..{self.num_slots - 1}")
        return self._slots[slot]

    def _turn(self, slot: int) -> _Turn:
        turn = self._check_slot(slot).turn
        if turn is None:
            raise EngineError(f"slot {slot} has no turn; call start_turn() first")
        return turn

    def start_conversation(
        self, slot: int, system_prompt: str | None = None, voice_codes: torch.Tensor | None = None
    ) -> None:
        """Reset ``slot`` to an empty context; the system block (upstream text when None) and the
        voice prompt (codes [frames, nq >= rvq]) are fed with the first turn."""
        state = self._check_slot(slot)
        rows = self.prompts.system_rows(system_prompt, voice_codes)
        self._stop(slot)
        state.active = True
        state.turn = None
        state.pending_rows = [rows]
        self._length[slot] = 0

    def start_turn(
        self,
        slot: int,
        user_text: str | None = None,
        user_codes: torch.Tensor | None = None,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
        max_frames: int | None = None,
    ) -> None:
        """Begin an assistant turn after the user's text and audio codes [frames, nq] (either or both
        may be None) and prefill the prompt now. A turn still open is first closed as heard in full."""
        state = self._check_slot(slot)
        if not state.active:
            raise EngineError(f"slot {slot} has no conversation; call start_conversation() first")
        sampling = sampling or SamplingConfig()
        if sampling.repetition_window > self._max_window:
            raise ConfigError(
                f"repetition_window {sampling.repetition_window} exceeds this generator's "
                f"max_repetition_window {self._max_window}"
            )
        if not sampling.is_greedy and (sampling.top_k is None or sampling.top_k > self._top_k_cap):
            raise ConfigError(
                f"top_k {sampling.top_k} exceeds this generator's max_top_k {self._top_k_cap}; "
                "build the generator with a larger max_top_k"
            )
        cap = self.max_frames_per_turn if max_frames is None else max_frames
        if cap < 1:
            raise ConfigError(f"max_frames must be >= 1, got {cap}")
        if state.turn is not None and not state.turn.closed:
            self._close_turn(slot, self._real_frames(slot))
        rows = torch.cat([*state.pending_rows, self.prompts.user_rows(user_text, user_codes)])
        start = int(self._length[slot])
        if start + rows.shape[0] + DELAY_TOKENS + 1 + _END_ROWS > self.max_context:
            raise EngineError(
                f"slot {slot}: the context would exceed max_context={self.max_context} rows "
                f"({start} used, {rows.shape[0]} new); start a new conversation or raise max_context"
            )
        state.pending_rows = []
        self._feed_prompt(slot, rows)
        tokenizer: TextTokenizer = (
            UpstreamSegmentTokenizer(self.tokenizer)
            if self.upstream_compat
            else GrowingTextTokenizer(self.tokenizer)
        )
        state.turn = _Turn(tokenizer=tokenizer, sampling=sampling, base=int(self._length[slot]))
        self._n_text[slot] = 0
        self._text_ptr[slot] = 0
        self._text_ended[slot] = False
        self._prefilled[slot] = False
        self._fresh[slot] = False
        self._frames[slot] = 0
        self._max_frames[slot] = cap
        self._ended_eos[slot] = False
        self._running[slot] = True
        self._set_sampling(slot, sampling, seed)

    def _feed_prompt(self, slot: int, rows: torch.Tensor) -> torch.Tensor:
        start = int(self._length[slot])
        rows = rows.to(self.device)
        with torch.inference_mode():
            hidden = self.model.prefill(self.cache, slot, rows, start)
        self._rows[slot, start : start + rows.shape[0]] = rows
        self._length[slot] = start + rows.shape[0]
        return hidden[-1]

    def restore_context(self, slot: int, rows: torch.Tensor, *, keep_pending: bool = False) -> None:
        """Reset ``slot`` to a conversation whose context is exactly ``rows`` [L, 1 + rvq]
        (e.g. ``context_rows`` of another slot); the next ``start_turn`` continues after them.

        ``keep_pending``: keep the rows that close the last turn (not yet fed), e.g. when the
        context is compacted by dropping old turns but the last one stays.
        """
        state = self._check_slot(slot)
        pending = state.pending_rows if keep_pending else []
        if rows.dim() != 2 or rows.shape[1] != 1 + self.config.rvq:
            raise ConfigError(f"rows must be [length, {1 + self.config.rvq}], got {tuple(rows.shape)}")
        if rows.shape[0] + DELAY_TOKENS + 1 + _END_ROWS > self.max_context:
            raise EngineError(f"{rows.shape[0]} rows do not fit max_context={self.max_context}")
        self._stop(slot)
        state.active = True
        state.turn = None
        state.pending_rows = pending
        self._length[slot] = 0
        if rows.shape[0]:
            self._feed_prompt(slot, rows.to(torch.long))

    def _set_sampling(self, slot: int, sampling: SamplingConfig, seed: int | None) -> None:
        self._sampler.set_row(
            slot,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            greedy=sampling.is_greedy,
        )
        window = sampling.repetition_window if sampling.repetition_penalty != 1.0 else 0
        self._repetition.start(slot, window, sampling.repetition_penalty)
        self._seeds[slot] = self._seed_source.getrandbits(62) if seed is None else seed
        self._banned[slot] = self._special if sampling.mask_special_codes else False
        running = [s.turn.sampling for s in self._slots if s.turn is not None and not s.turn.closed]
        self._any_sampling = any(not s.is_greedy for s in running)
        self._any_greedy = any(s.is_greedy for s in running)
        self._any_penalty = any(s.repetition_penalty != 1.0 and s.repetition_window > 0 for s in running)
        self._any_banned = any(s.mask_special_codes for s in running)

    def push_text(self, slot: int, delta: str) -> None:
        """Add assistant text; ignored once the turn has ended (EOS or cap)."""
        turn = self._turn(slot)
        if self._accepting(slot, turn):
            self._append_ids(slot, turn.tokenizer.push(delta))

    def push_tokens(self, slot: int, ids: list[int]) -> None:
        """Add assistant text as token ids (upstream ``push_text_tokens``)."""
        turn = self._turn(slot)
        if self._accepting(slot, turn):
            self._append_ids(slot, [int(i) for i in ids])

    def end_text(self, slot: int) -> None:
        """No more text this turn: the model speaks the rest, then stops at EOS or the cap."""
        turn = self._turn(slot)
        if self._accepting(slot, turn):
            self._append_ids(slot, turn.tokenizer.finish())
            self._text_ended[slot] = True

    def _accepting(self, slot: int, turn: _Turn) -> bool:
        return not turn.closed and bool(self._running[slot]) and not bool(self._text_ended[slot])

    def _append_ids(self, slot: int, ids: list[int]) -> None:
        if not ids:
            return
        count = int(self._n_text[slot])
        if count + len(ids) > self.max_context:
            raise EngineError(f"slot {slot}: turn text exceeds {self.max_context} tokens")
        self._text[slot, count : count + len(ids)] = torch.tensor(ids, dtype=torch.long)
        self._n_text[slot] = count + len(ids)

    def release(self, slot: int) -> None:
        """Free the slot; its context is dropped."""
        state = self._check_slot(slot)
        self._stop(slot)
        state.active = False
        state.turn = None
        state.pending_rows = []
        self._length[slot] = 0

    def _stop(self, slot: int) -> None:
        self._running[slot] = False
        self._fresh[slot] = False

    def context_length(self, slot: int) -> int:
        """Rows of context the slot holds in its cache."""
        self._check_slot(slot)
        return int(self._length[slot])

    def context_rows(self, slot: int) -> torch.Tensor:
        """The rows in the slot's cache, [context_length, 1 + rvq] on the CPU (for checks and debugging)."""
        return self._rows[slot, : self.context_length(slot)].cpu()

    def state_bytes(self) -> int:
        """Bytes of preallocated per-slot state (KV caches, rows, text, sampling); divide by num_slots."""
        tensors = [
            self.cache.keys,
            self.cache.values,
            self._local_cache.keys,
            self._local_cache.values,
            self._rows,
            self._text,
            self._repetition.ring,
            self._banned,
            self._pending_hidden,
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def turn_running(self, slot: int) -> bool:
        return bool(self._running[slot])

    def frames_generated(self, slot: int) -> int:
        """Real frames of the current turn (an EOS frame is not counted)."""
        return self._real_frames(slot)

    def _real_frames(self, slot: int) -> int:
        return int(self._frames[slot]) - int(self._ended_eos[slot])

    def has_work(self, hold: torch.Tensor | None = None) -> bool:
        """Whether ``step(hold)`` would make a frame or finish a turn now."""
        return bool((self._prefill_ready(hold) | self._continuing(hold)).any())

    def _prefill_ready(self, hold: torch.Tensor | None) -> torch.Tensor:
        waiting = self._running & ~self._prefilled
        ready = waiting & ((self._n_text >= DELAY_TOKENS) | self._text_ended)
        return ready if hold is None else ready & ~hold

    def _continuing(self, hold: torch.Tensor | None = None) -> torch.Tensor:
        has_text = (self._text_ptr < self._n_text) | self._text_ended
        continuing = self._running & self._prefilled & ~self._fresh & has_text
        return continuing if hold is None else continuing & ~hold

    # -- the tick ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile or capture the tick now, with an idle tick, instead of on someone's first frame.

        No slot generates: every slot writes its row at its current length, i.e. into free cache
        rows, and sampling state, previous frames and repetition windows stay as they were.
        """
        if self.uses_cuda_graph:
            self._tick_graph()
            return
        self._in_generating.zero_()
        self._in_fresh.zero_()
        self._in_positions.copy_(self._length.clamp(max=self.max_context))
        self.device_tick(self.max_context + 1)

    def _tick_graph(self) -> TickGraph:
        if self._graph is None:  # captured once, on the first tick or at warm-up
            self._graph = TickGraph(self)
        return self._graph

    @torch.inference_mode()
    def step(self, hold: torch.Tensor | None = None) -> StepOutput:
        """Advance every ready slot by one frame in one batched forward; see ``StepOutput``.

        ``hold`` [S] bool: slots to leave untouched this tick (e.g. their listener is far behind).
        """
        num_slots, rvq = self.num_slots, self.config.rvq
        finished = torch.zeros(num_slots, dtype=torch.bool)
        self._prefill_ready_slots(finished, hold)
        continuing = self._continuing(hold)
        generating = (self._fresh if hold is None else self._fresh & ~hold) | continuing
        if not bool(generating.any()):
            empty = torch.zeros(num_slots, dtype=torch.bool)
            return StepOutput(
                frames=torch.full((num_slots, rvq), self.config.audio_pad, dtype=torch.long),
                produced=empty,
                eos=empty,
                capped=empty,
                finished=finished,
                frame_index=self._frames.clone(),
                text_position=self._text_ptr.clone(),
            )
        has_token = continuing & (self._text_ptr < self._n_text)
        token = self._text[self._slot_index, self._text_ptr.clamp(max=self.max_context - 1)]
        token = torch.where(has_token, token, self.config.text_pad_id)
        positions = self._length.clamp(max=self.max_context)
        self._in_token.copy_(token, non_blocking=True)
        self._in_positions.copy_(positions, non_blocking=True)
        self._in_fresh.copy_(self._fresh, non_blocking=True)
        self._in_generating.copy_(generating, non_blocking=True)
        self._in_frame_index.copy_(self._frames, non_blocking=True)
        if self.uses_cuda_graph:
            hidden, frames = self._tick_graph().replay()
        else:
            attend_length = self.max_context + 1
            if self.attention_bucket:
                used = int(positions.max()) + 1
                attend_length = min(attend_length, -(-used // self.attention_bucket) * self.attention_bucket)
            flags = (self._any_sampling, self._any_greedy, self._any_penalty, self._any_banned)
            hidden, frames = self.device_tick(attend_length, (True,) * 4 if self.full_tick else flags)
        self.last_hidden = hidden  # [S, hidden] backbone states that made this tick's frames (checks)
        frames_cpu = frames.cpu()

        frame_index = self._frames.clone()
        self._length += continuing.long()
        self._text_ptr += has_token.long()
        self._frames += generating.long()
        self._fresh &= ~generating
        eos = generating & (frames_cpu[:, 0] == self.config.audio_eos)
        full = self._length >= self.max_context - _END_ROWS
        capped = generating & ~eos & ((self._frames >= self._max_frames) | full)
        ended = eos | capped
        self._ended_eos |= eos
        self._running &= ~ended
        return StepOutput(
            frames=frames_cpu,
            produced=generating,
            eos=eos,
            capped=capped,
            finished=finished | ended,
            frame_index=frame_index,
            text_position=self._text_ptr.clone(),
        )

    def device_tick(
        self, attend_length: int, flags: tuple[bool, bool, bool, bool] = (True, True, True, True)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The device part of a tick, from the ``_in_*`` buffers -> (hidden [S, hidden], frames [S, rvq]).

        Backbone row for every slot, the local transformer's 16 steps with sampling, and the
        in-place state updates (cache, rows, previous frame, repetition window). No host reads and
        no branch on tensor values, so it can be captured in a CUDA graph. ``flags``
        (any_sampling, any_greedy, any_penalty, any_banned) only skip work that is a no-op for
        every row; all True gives the same frames for any mix of rows (the graph's setting).
        """
        any_sampling, any_greedy, any_penalty, any_banned = flags
        positions, generating = self._in_positions, self._in_generating
        ids = torch.cat([self._in_token[:, None], self._prev_frame], dim=1)
        hidden = self.model.decode(self.cache, ids, positions, attend_length)
        hidden = torch.where(self._in_fresh[:, None], self._pending_hidden, hidden)
        self._rows[self._slot_index_device, positions] = ids
        if self._compiled is not None:
            frames = self._compiled.local_frames(hidden, self._in_frame_index)
        else:
            pick = self._picker(self._in_frame_index, any_sampling, any_greedy, any_penalty, any_banned)
            frames = self.model.local_transformer.generate(hidden, self._local_cache, pick)
        self._prev_frame.copy_(torch.where(generating[:, None], frames, self._prev_frame))
        if any_penalty:
            self._repetition.record(frames, self._in_frame_index, generating)
        return hidden, frames

    def _prefill_ready_slots(self, finished: torch.Tensor, hold: torch.Tensor | None) -> None:
        for slot in self._prefill_ready(hold).nonzero().flatten().tolist():
            count = int(self._n_text[slot])
            take = (
                count if (self.upstream_compat and bool(self._text_ended[slot])) else min(count, DELAY_TOKENS)
            )
            if take == 0:
                self._running[slot] = False
                finished[slot] = True
                continue
            if int(self._length[slot]) + take + 1 + _END_ROWS > self.max_context:
                take = max(1, self.max_context - int(self._length[slot]) - 1 - _END_ROWS)
            rows = self.prompts.text_rows(self._text[slot, :take].tolist())
            rows[take - 1, 1] = self.config.audio_bos
            self._pending_hidden[slot] = self._feed_prompt(slot, rows)
            self._text_ptr[slot] = take
            self._prefilled[slot] = True
            self._fresh[slot] = True
            turn = self._slots[slot].turn
            assert turn is not None
            turn.prefill_len = take

    def _picker(
        self,
        frame_index: torch.Tensor,
        any_sampling: bool,
        any_greedy: bool,
        any_penalty: bool,
        any_banned: bool,
    ) -> Any:
        repetition = self._repetition if any_penalty else None
        penalty = repetition.frame_penalty(frame_index) if repetition is not None else None
        uniforms = counter_uniforms(self._seeds, frame_index, self.config.rvq) if any_sampling else None
        banned = self._banned if any_banned else None
        sampler = self._sampler

        def pick(index: int, logits: torch.Tensor) -> torch.Tensor:
            return pick_codes(
                logits,
                sampler,
                history=None if repetition is None else repetition.history(index),
                penalty=penalty,
                banned=None if banned is None else banned[:, index],
                uniform=None if uniforms is None else uniforms[:, index],
                any_greedy=any_greedy,
            )

        return pick

    # -- ending turns ---------------------------------------------------------------------------

    def rollback(self, slot: int, heard_frames: int) -> str:
        """Cut the slot's context back to the first ``heard_frames`` frames of the current turn.

        Stops the turn if it is still running. Frame f sits in the row of text token
        ``prefill + f`` (12 + f normally), so the kept rows hold the text the model had read up to
        the last heard frame; that text is returned. The next ``start_turn`` continues from here.
        """
        turn = self._turn(slot)
        if turn.closed:
            raise EngineError(
                f"slot {slot}: the turn was already closed by an earlier rollback or start_turn"
            )
        produced = self._real_frames(slot)
        if not 0 <= heard_frames <= produced:
            raise ConfigError(f"slot {slot}: heard_frames must be in 0..{produced}, got {heard_frames}")
        return self._close_turn(slot, heard_frames)

    def _close_turn(self, slot: int, heard: int) -> str:
        state = self._slots[slot]
        turn = state.turn
        assert turn is not None
        self._stop(slot)
        turn.closed = True
        carry: list[torch.Tensor] = []
        if not bool(self._prefilled[slot]) or heard == 0:
            keep = turn.base
        else:
            fed = int(self._length[slot]) - turn.base - turn.prefill_len
            if heard <= fed:
                keep = turn.base + turn.prefill_len + heard
            else:  # the last heard frame was never fed back: add its row
                keep = int(self._length[slot])
                ptr = int(self._text_ptr[slot])
                text_id = (
                    int(self._text[slot, ptr]) if ptr < int(self._n_text[slot]) else self.config.text_pad_id
                )
                carry.append(self.prompts.audio_row(text_id, self._prev_frame[slot].cpu()))
            carry.append(self.prompts.eos_row())
        self._length[slot] = keep
        text_ids = self._rows[slot, turn.base : keep, 0].cpu().tolist() + [int(r[0]) for r in carry]
        if not self.upstream_compat:
            state.pending_rows = [torch.stack(carry)] if carry else []
        spoken = [i for i in text_ids if i != self.config.text_pad_id]
        return str(self.tokenizer.decode(spoken))
