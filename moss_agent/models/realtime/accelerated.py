"""Faster forms of the realtime tick's device part: a CUDA graph, or torch.compile graphs.

Both replace eager ops of ``RealtimeGenerator.device_tick`` without changing what a tick does:
they read and write the fixed buffers of the generator's ``GenerationState`` (its public fields,
nothing else of the generator), run every sampling feature for every row (which gives the same
frames as the eager shortcuts) and the graph attends over the whole backbone cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moss_agent.models.compiling import compile_step
from moss_agent.models.sampling import counter_uniforms, pick_codes

if TYPE_CHECKING:
    from moss_agent.models.realtime.model import MossTTSRealtime
    from moss_agent.models.realtime.state import GenerationState, Spans

log = logging.getLogger(__name__)


class CompiledTick:
    """The local transformer's part of the tick through torch.compile: one graph per position.

    The local transformer's 16 positions differ only in which tensors they read (RoPE rotation,
    the cache row they write, the rows they attend to, the head, the next embedding table), so
    with those passed as arguments (``LocalTransformer.masked_logits``) a single graph of
    position + sampling + next input serves them all: one small compile instead of 16 or of a
    16-fold unrolled graph. Fused kernels and a C++ wrapper remove most of the per-op dispatch
    that dominates a CPU tick at small batch. ``backend="eager"`` traces without compiling
    (a quick check that the step stays graph-capturable). The backbone row stays eager: it is one
    call per tick, and compiled it wrote its rows into the large KV cache through a copy (about
    20x slower at 16 slots).
    """

    def __init__(self, model: MossTTSRealtime, state: GenerationState, backend: str = "inductor") -> None:
        self._state = state
        self._rvq = model.config.rvq
        self._local = model.local_transformer
        self._positions = [self._local.position_tensors(i) for i in range(self._rvq)]
        self._position = compile_step(self._position_eager, backend)

    def _position_eager(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        write: torch.Tensor,
        bias: torch.Tensor,
        head: torch.Tensor,
        table: torch.Tensor,
        history: torch.Tensor,
        penalty: torch.Tensor,
        banned: torch.Tensor,
        uniform: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [S, hidden] -> (codes [S], their embeddings [S, hidden] as the next position's input)."""
        state = self._state
        logits = self._local.masked_logits(x, state.local_cache, rotation, write, bias, head)
        codes = pick_codes(
            logits, state.sampler, history=history, penalty=penalty, banned=banned, uniform=uniform
        )
        return codes, F.embedding(codes, table)

    def local_frames(self, hidden: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden], frame_index [S] -> frames [S, rvq] (every sampling feature on)."""
        state = self._state
        repetition = state.repetition
        penalty = repetition.frame_penalty(frame_index)
        uniforms = counter_uniforms(state.seeds, frame_index, self._rvq)
        first_ban = state.first_codebook_ban()  # codebook 0 also bans EOS below min_frames
        x, codes = hidden, []
        for index, (rotation, write, bias, head, table) in enumerate(self._positions):
            code, x = self._position(
                x,
                rotation,
                write,
                bias,
                head,
                table,
                repetition.history(index),
                penalty,
                first_ban if index == 0 else state.banned[:, index],
                uniforms[:, index],
            )
            codes.append(code)
        return torch.stack(codes, dim=1)


class TickGraph:
    """A tick function captured once in a CUDA graph and replayed every tick.

    ``tick(spans)`` is the device part of a tick (``RealtimeGenerator.device_tick``), captured for
    the state's fixed slot count with every sampling feature on (which gives the same frames as the
    eager path's shortcuts) and attention over the whole cache (``state.whole_cache``), so a slot's
    numbers never depend on the other slots. Everything it touches is a fixed buffer of ``state``
    updated in place; prefill, turn control and sampling settings write into the same buffers
    between replays. Weights must not be moved or replaced afterwards.
    NOTE: written without access to a GPU; checked by tests/gpu/test_realtime_cuda_graph.py.
    """

    def __init__(
        self, state: GenerationState, tick: Callable[[Spans], tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        spans = state.whole_cache
        device = state.in_positions.device
        # Warm-up and capture run a tick in which no slot generates: no conversation state changes.
        state.set_idle_inputs()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # lazy inits, allocator and library workspaces outside the capture
                tick(spans)
        torch.cuda.current_stream(device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._hidden, self._frames = tick(spans)
        log.info("captured the realtime tick in a CUDA graph", extra={"slots": state.num_slots})

    def replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden [S, hidden], frames [S, rvq]); buffers overwritten by the next replay."""
        self._graph.replay()
        return self._hidden, self._frames
