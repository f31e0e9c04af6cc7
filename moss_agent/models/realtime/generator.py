"""Batched streaming generation for MOSS-TTS-Realtime: a fixed number of slots, one forward per tick.

Each slot is one conversation with its own preallocated KV cache rows. A tick (``step``) advances
every slot that is ready by one codec frame (80 ms of audio) in ONE batched backbone forward plus
one batched pass of the local transformer; idle and finished slots ride along masked. Prompt
prefill (``start_turn``) and the 12-token text prefill run per slot. All per-slot state lives in
one ``GenerationState`` (``generator.state``), which the eager, compiled and CUDA-graph ticks share.

Usage (the engine owns one generator per device, on one thread)::

    gen = RealtimeGenerator(model, tokenizer, num_slots=8, max_context=4096)
    gen.start_conversation(slot, system_prompt=None, voice_codes=None)      # resets the slot
    # or open with earlier turns: history=[EncodedTurn("user", "Hi"), EncodedTurn("assistant", "Hello!", codes)]
    gen.trim_context(slot, budget_rows=3000)  # between turns: drop the oldest turns, keep the prefix
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
torch.compile with ``compile=True`` (about 2x faster after a one-off compile). ``step(hold)`` /
``has_work(hold)`` take an optional [S] bool mask of slots to skip this tick. ``push_tokens`` feeds
ids directly; ``restore_context(slot, rows)`` rebuilds a slot from saved ``context_rows``.

A conversation depends only on itself:
- A slot's frames and states are bit-identical whatever the other slots do (same seed, same
  inputs). Every op of the tick is row-wise over a fixed batch of ``num_slots`` rows except
  attention, whose kernels may sum a row's keys in an order that depends on how many rows they
  read (a short slot that read up to a long neighbour's length moved by 2-5e-7 on some CPUs). So
  each slot reads a length of its own: on the CPU the rows it uses rounded up to
  ``attention_bucket``, slots grouped into runs of equal length (one attention call per run; one
  run when lengths match); on CUDA the whole cache, whose fixed shapes a graph needs anyway.
- An interrupt leaves the same context however far generation had run ahead of the listener:
  ``rollback(slot, h)`` keeps the rows up to frame h-2 in the cache, and the row of the last
  heard frame h-1 plus the EOS row are always fed with the next prompt, whether or not a tick had
  already fed that frame back.

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
  ``[<|text_pad|>, 1026, pad...]`` closes it before the next user turn (upstream keeps the rows it
  fed, nothing more);
Always on: a frame cap per turn (``max_frames``) and a context guard, so a missing EOS cannot run
forever. ``SamplingConfig.mask_special_codes`` (default on) forbids pad/BOS codes that upstream
could sample; ``SamplingConfig.min_frames`` (default 0, off) forbids audio EOS on a turn's first
frames, per slot. Voice and user codes are always [frames, codebooks]; no layout guessing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moss_agent.errors import ConfigError, EngineError
from moss_agent.models.realtime.accelerated import CompiledTick, TickGraph
from moss_agent.models.realtime.config import DELAY_TOKENS
from moss_agent.models.realtime.model import MossTTSRealtime
from moss_agent.models.realtime.prompt import EncodedTurn, PromptBuilder
from moss_agent.models.realtime.state import (
    ContextLayout,
    GenerationState,
    SlotRecord,
    Spans,
    TurnRecord,
)
from moss_agent.models.realtime.text import GrowingTextTokenizer, TextTokenizer, UpstreamSegmentTokenizer
from moss_agent.models.sampling import SamplingConfig, counter_uniforms, pick_codes

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
        self.uses_cuda_graph = cuda_graph and model.device.type == "cuda"
        # On the CPU a tick's attention reads, per slot, the cache rows it uses rounded up to
        # ``attention_bucket`` (None: the whole cache), so a long max_context costs nothing until it
        # is used. CUDA always reads the whole cache: a graph needs fixed shapes, and GPU kernels
        # pick their split of the keys by batch size, which per-run calls would vary.
        self.attention_bucket = attention_bucket if model.device.type == "cpu" else None
        self.prompts = PromptBuilder(tokenizer, config)
        self.device = model.device
        model.prepare_inference()  # no first-turn latency spike
        self._seed_source = random.Random(seed)
        self._top_k_cap = min(max_top_k, config.audio_vocab_size)
        self._max_window = max_repetition_window
        self.state = GenerationState.allocate(model, num_slots, max_context, self._top_k_cap, max_repetition_window)
        rvq, vocab = config.rvq, config.audio_vocab_size
        self._special = torch.zeros(rvq, vocab, dtype=torch.bool, device=self.device)
        self._special[:, config.audio_pad : config.audio_bos + 1] = True
        self._special[1:, config.audio_eos] = True
        self._eos_row = self.prompts.eos_row().to(self.device)
        self._slot_index = torch.arange(num_slots)
        self._any_sampling = False
        self._any_greedy = False
        self._any_penalty = False
        self._any_banned = False
        self.last_hidden: torch.Tensor | None = None
        self.last_attention: Spans = ()
        if compile:
            self.state.compiled = CompiledTick(model, self.state, "inductor" if compile is True else compile)
        # Run every sampling feature each tick, as the graph does, instead of skipping those no
        # row uses; the frames are the same either way (tests check it on the CPU).
        self.full_tick = self.uses_cuda_graph or self.state.compiled is not None

    # -- conversation and turn control ---------------------------------------------------------

    def _check_slot(self, slot: int) -> SlotRecord:
        if not 0 <= slot < self.num_slots:
            raise ConfigError(f"slot {slot} does not exist; this generator has slots 0..{self.num_slots - 1}")
        return self.state.slots[slot]

    def _turn(self, slot: int) -> TurnRecord:
        turn = self._check_slot(slot).turn
        if turn is None:
            raise EngineError(f"slot {slot} has no turn; call start_turn() first")
        return turn

    def _reset(self, slot: int) -> SlotRecord:
        mask = torch.zeros(self.num_slots, dtype=torch.bool)
        mask[slot] = True
        self.state.reset(mask)
        return self.state.slots[slot]

    def start_conversation(
        self,
        slot: int,
        system_prompt: str | None = None,
        voice_codes: torch.Tensor | None = None,
        history: Sequence[EncodedTurn] = (),
        *,
        budget_rows: int | None = None,
    ) -> None:
        """Reset ``slot`` to a new conversation: the system block (upstream text when None) and the
        voice prompt (codes [frames, nq >= rvq]) are fed with the first turn.

        ``history``: earlier turns (``PromptBuilder.history_rows`` lays them out); then the system
        block and the history are fed now, and the first turn continues after them as after live
        turns (trimming drops history turns like any other). They must fit ``budget_rows`` (default:
        the whole context less room for one turn to start), else ConfigError and the slot is untouched.
        """
        self._check_slot(slot)
        rows = self.prompts.system_rows(system_prompt, voice_codes)
        past, starts = self.prompts.history_rows(history)
        budget = self.max_context - DELAY_TOKENS - 1 - _END_ROWS if budget_rows is None else budget_rows
        total = rows.shape[0] + past.shape[0]
        if past.shape[0] and total > budget:
            raise ConfigError(
                f"the history needs {total} rows of context ({rows.shape[0]} for the system and voice "
                f"prompt, {past.shape[0]} for {len(history)} turns; a row per text token and per 80 ms "
                f"of audio) but a conversation here may open with at most {budget}; "
                "leave out the oldest turns, shorten their audio, or raise max_context"
            )
        record = self._reset(slot)
        record.active = True
        record.prefix_rows = rows.shape[0]
        if not past.shape[0]:
            record.prefix = rows
            return
        self._feed_prompt(slot, torch.cat([rows, past]))
        record.turn_starts = [rows.shape[0] + start for start in starts]

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
        record = self._check_slot(slot)
        if not record.active:
            raise EngineError(f"slot {slot} has no conversation; call start_conversation() first")
        sampling = sampling or SamplingConfig()
        self.check_sampling(sampling)
        cap = self.max_frames_per_turn if max_frames is None else max_frames
        if cap < 1:
            raise ConfigError(f"max_frames must be >= 1, got {cap}")
        self._close_open_turn(slot)
        pending = [rows.to(self.device) for rows in (record.prefix, record.closing) if rows is not None]
        user = self.prompts.user_rows(user_text, user_codes).to(self.device)
        rows = torch.cat([*pending, user])
        state = self.state
        start = int(state.length[slot])
        if start + rows.shape[0] + DELAY_TOKENS + 1 + _END_ROWS > self.max_context:
            raise EngineError(
                f"slot {slot}: the context would exceed max_context={self.max_context} rows "
                f"({start} used, {rows.shape[0]} new); start a new conversation or raise max_context"
            )
        record.prefix = record.closing = None
        record.turn_starts.append(start + rows.shape[0] - user.shape[0])
        self._feed_prompt(slot, rows)
        tokenizer: TextTokenizer = (
            UpstreamSegmentTokenizer(self.tokenizer)
            if self.upstream_compat
            else GrowingTextTokenizer(self.tokenizer)
        )
        record.turn = TurnRecord(tokenizer=tokenizer, sampling=sampling, base=int(state.length[slot]))
        state.n_text[slot] = 0
        state.text_ptr[slot] = 0
        state.text_ended[slot] = False
        state.prefilled[slot] = False
        state.fresh[slot] = False
        state.frames[slot] = 0
        state.max_frames[slot] = cap
        state.ended_eos[slot] = False
        state.running[slot] = True
        self._set_sampling(slot, sampling, seed)

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """ConfigError unless this generator's fixed buffers can hold ``sampling`` (top-k, window)."""
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

    def _close_open_turn(self, slot: int) -> None:
        turn = self.state.slots[slot].turn
        if turn is not None and not turn.closed:
            self._close_turn(slot, self._real_frames(slot))

    def _feed_prompt(self, slot: int, rows: torch.Tensor) -> torch.Tensor:
        """Prefill rows [T, 1 + rvq] after the slot's context -> the last row's hidden state."""
        state = self.state
        start = int(state.length[slot])
        rows = rows.to(self.device)
        with torch.inference_mode():
            hidden = self.model.prefill(state.cache, slot, rows, start)
        state.rows[slot, start : start + rows.shape[0]] = rows
        state.length[slot] = start + rows.shape[0]
        return hidden[-1]

    def restore_context(self, slot: int, rows: torch.Tensor) -> None:
        """Reset ``slot`` to a conversation whose context is exactly ``rows`` [L, 1 + rvq]
        (e.g. ``context_rows`` of another slot); the next ``start_turn`` continues after them.
        The restored rows count as the slot's prefix: ``trim_context`` never drops them."""
        self._check_slot(slot)
        if rows.dim() != 2 or rows.shape[1] != 1 + self.config.rvq:
            raise ConfigError(f"rows must be [length, {1 + self.config.rvq}], got {tuple(rows.shape)}")
        if rows.shape[0] + DELAY_TOKENS + 1 + _END_ROWS > self.max_context:
            raise EngineError(f"{rows.shape[0]} rows do not fit max_context={self.max_context}")
        record = self._reset(slot)
        record.active = True
        record.prefix_rows = rows.shape[0]
        if rows.shape[0]:
            self._feed_prompt(slot, rows.to(torch.long))

    def trim_context(self, slot: int, budget_rows: int) -> int:
        """Between turns: drop the fewest oldest whole turns so the context (cache rows plus the rows
        waiting for the next prompt) fits ``budget_rows``; the system/voice prefix always stays.
        Returns the rows dropped (0: it already fit, or there is no turn to drop).

        A turn still open is first closed as heard in full (as ``start_turn`` would). The prefix keeps
        its cache rows; the kept turns are prefilled again at their new positions from the rows on
        the device. Shifting their cache rows in place instead would be inexact: their keys carry
        RoPE rotations of their old positions, and from the second layer on their keys and values
        were computed attending to the dropped turns.
        """
        record = self._check_slot(slot)
        self._close_open_turn(slot)
        state, starts, prefix = self.state, record.turn_starts, record.prefix_rows
        length = int(state.length[slot])
        pending = record.pending_rows()
        if length + pending <= budget_rows or not starts:
            return 0
        keep_from = next((s for s in starts[1:] if prefix + length - s + pending <= budget_rows), None)
        if keep_from is None:  # even the last turn alone is too long: keep only the prefix
            state.length[slot] = prefix
            record.closing = None
            record.turn_starts = []
        else:
            kept = state.rows[slot, keep_from:length].clone()
            state.length[slot] = prefix
            self._feed_prompt(slot, kept)
            record.turn_starts = [prefix + s - keep_from for s in starts if s >= keep_from]
        dropped = length + pending - int(state.length[slot]) - record.pending_rows()
        log.info(
            "trimmed conversation context",
            extra={"slot": slot, "rows_before": length, "rows_after": int(state.length[slot])},
        )
        return dropped

    def context_layout(self, slot: int) -> ContextLayout:
        """Where the slot's context rows come from (prefix, turn starts, pending rows)."""
        record = self._check_slot(slot)
        return ContextLayout(
            prefix_rows=record.prefix_rows,
            turn_starts=tuple(record.turn_starts),
            length=int(self.state.length[slot]),
            pending_rows=record.pending_rows(),
        )

    def _set_sampling(self, slot: int, sampling: SamplingConfig, seed: int | None) -> None:
        state = self.state
        state.sampler.set_row(
            slot,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            greedy=sampling.is_greedy,
        )
        window = sampling.repetition_window if sampling.repetition_penalty != 1.0 else 0
        state.repetition.start(slot, window, sampling.repetition_penalty)
        state.seeds[slot] = self._seed_source.getrandbits(62) if seed is None else seed
        state.banned[slot] = self._special if sampling.mask_special_codes else False
        state.min_frames[slot] = sampling.min_frames
        running = [r.turn.sampling for r in state.slots if r.turn is not None and not r.turn.closed]
        self._any_sampling = any(not s.is_greedy for s in running)
        self._any_greedy = any(s.is_greedy for s in running)
        self._any_penalty = any(s.repetition_penalty != 1.0 and s.repetition_window > 0 for s in running)
        self._any_banned = any(s.mask_special_codes or s.min_frames > 0 for s in running)

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
            self.state.text_ended[slot] = True

    def _accepting(self, slot: int, turn: TurnRecord) -> bool:
        state = self.state
        return not turn.closed and bool(state.running[slot]) and not bool(state.text_ended[slot])

    def _append_ids(self, slot: int, ids: list[int]) -> None:
        if not ids:
            return
        state = self.state
        count = int(state.n_text[slot])
        if count + len(ids) > self.max_context:
            raise EngineError(f"slot {slot}: turn text exceeds {self.max_context} tokens")
        state.text[slot, count : count + len(ids)] = torch.tensor(ids, dtype=torch.long)
        state.n_text[slot] = count + len(ids)

    def release(self, slot: int) -> None:
        """Free the slot; its context is dropped."""
        self._check_slot(slot)
        self._reset(slot)

    def _stop(self, slot: int) -> None:
        self.state.running[slot] = False
        self.state.fresh[slot] = False

    def context_length(self, slot: int) -> int:
        """Rows of context the slot holds in its cache."""
        self._check_slot(slot)
        return int(self.state.length[slot])

    def context_rows(self, slot: int) -> torch.Tensor:
        """The rows in the slot's cache, [context_length, 1 + rvq] on the CPU (for checks and debugging)."""
        return self.state.rows[slot, : self.context_length(slot)].cpu()

    def state_bytes(self) -> int:
        """Bytes of preallocated per-slot state (KV caches, rows, text, sampling); divide by num_slots."""
        return self.state.nbytes()

    def turn_running(self, slot: int) -> bool:
        return bool(self.state.running[slot])

    def frames_generated(self, slot: int) -> int:
        """Real frames of the current turn (an EOS frame is not counted)."""
        return self._real_frames(slot)

    def _real_frames(self, slot: int) -> int:
        return int(self.state.frames[slot]) - int(self.state.ended_eos[slot])

    def has_work(self, hold: torch.Tensor | None = None) -> bool:
        """Whether ``step(hold)`` would make a frame or finish a turn now."""
        return bool((self._prefill_ready(hold) | self._continuing(hold)).any())

    def _prefill_ready(self, hold: torch.Tensor | None) -> torch.Tensor:
        state = self.state
        waiting = state.running & ~state.prefilled
        ready = waiting & ((state.n_text >= DELAY_TOKENS) | state.text_ended)
        return ready if hold is None else ready & ~hold

    def _continuing(self, hold: torch.Tensor | None = None) -> torch.Tensor:
        state = self.state
        has_text = (state.text_ptr < state.n_text) | state.text_ended
        continuing = state.running & state.prefilled & ~state.fresh & has_text
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
        self.state.set_idle_inputs()
        self.device_tick(self.state.whole_cache)

    def _tick_graph(self) -> TickGraph:
        if self.state.graph is None:  # captured once, on the first tick or at warm-up
            self.state.graph = TickGraph(self.state, self.device_tick)
        return self.state.graph

    @torch.inference_mode()
    def step(self, hold: torch.Tensor | None = None) -> StepOutput:
        """Advance every ready slot by one frame in one batched forward; see ``StepOutput``.

        ``hold`` [S] bool: slots to leave untouched this tick (e.g. their listener is far behind).
        """
        num_slots, rvq, state = self.num_slots, self.config.rvq, self.state
        finished = torch.zeros(num_slots, dtype=torch.bool)
        self._prefill_ready_slots(finished, hold)
        continuing = self._continuing(hold)
        generating = (state.fresh if hold is None else state.fresh & ~hold) | continuing
        if not bool(generating.any()):
            empty = torch.zeros(num_slots, dtype=torch.bool)
            return StepOutput(
                frames=torch.full((num_slots, rvq), self.config.audio_pad, dtype=torch.long),
                produced=empty,
                eos=empty,
                capped=empty,
                finished=finished,
                frame_index=state.frames.clone(),
                text_position=state.text_ptr.clone(),
            )
        has_token = continuing & (state.text_ptr < state.n_text)
        token = state.text[self._slot_index, state.text_ptr.clamp(max=self.max_context - 1)]
        token = torch.where(has_token, token, self.config.text_pad_id)
        positions = state.length.clamp(max=self.max_context)
        state.in_token.copy_(token, non_blocking=True)
        state.in_positions.copy_(positions, non_blocking=True)
        state.in_fresh.copy_(state.fresh, non_blocking=True)
        state.in_generating.copy_(generating, non_blocking=True)
        state.in_frame_index.copy_(state.frames, non_blocking=True)
        if self.uses_cuda_graph:
            hidden, frames = self._tick_graph().replay()
            self.last_attention = state.whole_cache
        else:
            flags = (self._any_sampling, self._any_greedy, self._any_penalty, self._any_banned)
            self.last_attention = self._attention_spans(positions, continuing)
            hidden, frames = self.device_tick(self.last_attention, (True,) * 4 if self.full_tick else flags)
        # For checks: the backbone states [S, hidden] that made this tick's frames, and its attention plan.
        self.last_hidden = hidden
        frames_cpu = frames.cpu()

        frame_index = state.frames.clone()
        state.length += continuing.long()
        state.text_ptr += has_token.long()
        state.frames += generating.long()
        state.fresh &= ~generating
        eos = generating & (frames_cpu[:, 0] == self.config.audio_eos)
        full = state.length >= self.max_context - _END_ROWS
        capped = generating & ~eos & ((state.frames >= state.max_frames) | full)
        ended = eos | capped
        state.ended_eos |= eos
        state.running &= ~ended
        return StepOutput(
            frames=frames_cpu,
            produced=generating,
            eos=eos,
            capped=capped,
            finished=finished | ended,
            frame_index=frame_index,
            text_position=state.text_ptr.clone(),
        )

    def _attention_spans(self, positions: torch.Tensor, continuing: torch.Tensor) -> Spans:
        """This tick's attention plan: each continuing slot reads its own rows in use rounded up to
        the bucket (never a length set by its neighbours); see ``plan_attention``."""
        if self.attention_bucket is None:
            return self.state.whole_cache
        bucket, whole = self.attention_bucket, self.state.whole_cache[0][2]
        lengths = ((positions + bucket) // bucket * bucket).clamp(max=whole)
        return plan_attention(lengths.tolist(), continuing.tolist())

    def device_tick(
        self, spans: Spans, flags: tuple[bool, bool, bool, bool] = (True, True, True, True)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The device part of a tick, from the state's ``in_*`` buffers -> (hidden [S, hidden], frames [S, rvq]).

        Backbone row for every slot (attention planned by ``spans``, see ``MossTTSRealtime.decode``),
        the local transformer's 16 steps with sampling, and the in-place state updates (cache, rows,
        previous frame, repetition window). No host reads and no branch on tensor values, so it can
        be captured in a CUDA graph. ``flags`` (any_sampling, any_greedy, any_penalty, any_banned)
        only skip work that is a no-op for every row; all True gives the same frames for any mix of
        rows (the graph's setting).
        """
        any_sampling, any_greedy, any_penalty, any_banned = flags
        state = self.state
        positions, generating = state.in_positions, state.in_generating
        ids = torch.cat([state.in_token[:, None], state.prev_frame], dim=1)
        hidden = self.model.decode(state.cache, ids, positions, spans)
        hidden = torch.where(state.in_fresh[:, None], state.pending_hidden, hidden)
        state.rows[state.slot_index, positions] = ids
        if state.compiled is not None:
            frames = state.compiled.local_frames(hidden, state.in_frame_index)
        else:
            pick = self._picker(state.in_frame_index, any_sampling, any_greedy, any_penalty, any_banned)
            frames = self.model.local_transformer.generate(hidden, state.local_cache, pick)
        state.prev_frame.copy_(torch.where(generating[:, None], frames, state.prev_frame))
        if any_penalty:
            state.repetition.record(frames, state.in_frame_index, generating)
        return hidden, frames

    def _prefill_ready_slots(self, finished: torch.Tensor, hold: torch.Tensor | None) -> None:
        state = self.state
        for slot in self._prefill_ready(hold).nonzero().flatten().tolist():
            count = int(state.n_text[slot])
            take = (
                count if (self.upstream_compat and bool(state.text_ended[slot])) else min(count, DELAY_TOKENS)
            )
            if take == 0:
                state.running[slot] = False
                finished[slot] = True
                continue
            if int(state.length[slot]) + take + 1 + _END_ROWS > self.max_context:
                take = max(1, self.max_context - int(state.length[slot]) - 1 - _END_ROWS)
            rows = self.prompts.text_rows(state.text[slot, :take].tolist())
            rows[take - 1, 1] = self.config.audio_bos
            state.pending_hidden[slot] = self._feed_prompt(slot, rows)
            state.text_ptr[slot] = take
            state.prefilled[slot] = True
            state.fresh[slot] = True
            turn = state.slots[slot].turn
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
        state = self.state
        repetition = state.repetition if any_penalty else None
        penalty = repetition.frame_penalty(frame_index) if repetition is not None else None
        uniforms = counter_uniforms(state.seeds, frame_index, self.config.rvq) if any_sampling else None
        banned = state.banned if any_banned else None
        first_ban = state.first_codebook_ban() if any_banned else None  # + EOS below min_frames
        sampler = state.sampler

        def pick(index: int, logits: torch.Tensor) -> torch.Tensor:
            ban = first_ban if index == 0 or banned is None else banned[:, index]
            return pick_codes(
                logits,
                sampler,
                history=None if repetition is None else repetition.history(index),
                penalty=penalty,
                banned=ban,
                uniform=None if uniforms is None else uniforms[:, index],
                any_greedy=any_greedy,
            )

        return pick

    # -- ending turns ---------------------------------------------------------------------------

    def rollback(self, slot: int, heard_frames: int) -> str:
        """Cut the slot's context back to the first ``heard_frames`` frames of the current turn.

        Stops the turn if it is still running. Frame f sits in the row of text token
        ``prefill + f`` (12 + f normally), so the kept rows hold the text the model had read up to
        the last heard frame; that text is returned. The next ``start_turn`` continues from here:
        the last heard frame's row and the EOS row are fed with its prompt (the module docstring
        says why), so the result does not depend on how far generation had run ahead.
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
        state = self.state
        record = state.slots[slot]
        turn = record.turn
        assert turn is not None
        self._stop(slot)
        turn.closed = True
        length = int(state.length[slot])
        keep, closing, read = turn.base, None, 0
        if bool(state.prefilled[slot]) and heard > 0:
            last = turn.base + turn.prefill_len + heard - 1  # the row of the last heard frame
            read = min(turn.prefill_len + heard, int(state.n_text[slot]))
            if self.upstream_compat:  # upstream keeps the rows it fed, nothing more
                keep = min(last + 1, length)
            else:
                keep = last
                closing = torch.stack([self._frame_row(slot, turn, heard - 1, last, length), self._eos_row])
        state.length[slot] = keep
        record.closing = closing
        spoken = [i for i in state.text[slot, :read].tolist() if i != self.config.text_pad_id]
        return str(self.tokenizer.decode(spoken))

    def _frame_row(self, slot: int, turn: TurnRecord, frame: int, row: int, length: int) -> torch.Tensor:
        """Row [1 + rvq] (on the device) that feeds frame ``frame`` of the turn, which sits at cache
        row ``row``: the cached row once a tick fed it back, else built as that tick would have."""
        state = self.state
        if row < length:
            return state.rows[slot, row].clone()
        position = turn.prefill_len + frame
        text_id = int(state.text[slot, position]) if position < int(state.n_text[slot]) else self.config.text_pad_id
        built = torch.empty(1 + self.config.rvq, dtype=torch.long, device=self.device)
        built[0] = text_id
        built[1:] = state.prev_frame[slot]
        return built


def plan_attention(lengths: list[int], fixed: list[bool]) -> Spans:
    """Group slots into contiguous runs that share one attention length -> ((first, end, length), ...).

    ``lengths[s]``: the rows slot s needs to read; ``fixed[s]``: its result is used this tick, so it
    must read exactly its own length (a length that depends on nothing but the slot). The other
    slots (idle, held, or on a turn's first frame, whose backbone state is not used) join any run
    at least as long as they need. Slots of equal lengths side by side share one attention call.
    """
    spans: list[tuple[int, int, int]] = []
    first, length, floor = 0, 0, 0  # length 0: the run has no fixed member yet
    for slot, (need, is_fixed) in enumerate(zip(lengths, fixed, strict=True)):
        if is_fixed and (need == length or (length == 0 and floor <= need)):
            length = need
            continue
        if not is_fixed and (length == 0 or need <= length):
            floor = max(floor, need)
            continue
        spans.append((first, slot, length or floor))
        first, length, floor = slot, (need if is_fixed else 0), (0 if is_fixed else need)
    spans.append((first, len(lengths), length or floor))
    return tuple(spans)
