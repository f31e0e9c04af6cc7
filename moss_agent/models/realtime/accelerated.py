"""Faster forms of the realtime tick's device part: a CUDA graph, or torch.compile graphs.

Both replace ``RealtimeGenerator.device_tick``'s eager ops without changing what a tick does:
they read and write the generator's fixed buffers, run every sampling feature for every row
(which gives the same frames as the eager shortcuts) and attend over the whole backbone cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from moss_agent.models.sampling import counter_uniforms, pick_codes

if TYPE_CHECKING:
    from moss_agent.models.realtime.generator import RealtimeGenerator

log = logging.getLogger(__name__)


# Guards that compare values (tensor metadata, numbers, types, lengths) are kept: a graph is
# reused only for inputs of the same shapes and settings. Identity guards on the many objects the
# step reads through (modules, closures, dicts) cost about 0.2 ms per call, 16 calls a tick.
_KEPT_GUARDS = frozenset({"TENSOR_MATCH", "CONSTANT_MATCH", "EQUALS_MATCH", "TYPE_MATCH", "SEQUENCE_LENGTH"})


def _value_guards(entries: list[Any]) -> list[bool]:
    return [entry.guard_type in _KEPT_GUARDS for entry in entries]


class CompiledTick:
    """The tick through torch.compile: one graph for the backbone row, one for a local position.

    The local transformer's 16 positions differ only in which tensors they read (RoPE rotation,
    the cache row they write, the rows they attend to, the head, the next embedding table), so
    with those passed as arguments (``LocalTransformer.masked_logits``) a single graph of
    position + sampling + next input serves them all: one small compile instead of 16 or of a
    16-fold unrolled graph. Fused kernels and a C++ wrapper remove most of the per-op dispatch
    that dominates a CPU tick at small batch. ``backend="eager"`` traces without compiling
    (a quick check that the step stays graph-capturable).
    """

    def __init__(self, generator: RealtimeGenerator, backend: str = "inductor") -> None:
        self._generator = generator
        model = generator.model
        self._local = model.local_transformer
        self._positions = [self._local.position_tensors(i) for i in range(generator.config.rvq)]
        options: dict[str, Any] | None = (
            {"cpp_wrapper": True, "guard_filter_fn": _value_guards} if backend == "inductor" else None
        )
        compile_kw: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": backend}
        if options is not None:
            compile_kw["options"] = options
        self.decode = model.decode
        self._position = torch.compile(self._position_eager, **compile_kw)

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
        generator = self._generator
        logits = self._local.masked_logits(x, generator._local_cache, rotation, write, bias, head)
        codes = pick_codes(
            logits, generator._sampler, history=history, penalty=penalty, banned=banned, uniform=uniform
        )
        return codes, F.embedding(codes, table)

    def local_frames(self, hidden: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden], frame_index [S] -> frames [S, rvq] (every sampling feature on)."""
        generator = self._generator
        repetition = generator._repetition
        penalty = repetition.frame_penalty(frame_index)
        uniforms = counter_uniforms(generator._seeds, frame_index, generator.config.rvq)
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
                generator._banned[:, index],
                uniforms[:, index],
            )
            codes.append(code)
        return torch.stack(codes, dim=1)


class TickGraph:
    """``RealtimeGenerator.device_tick`` captured once in a CUDA graph and replayed every tick.

    Captured for the generator's fixed slot count with every sampling feature on (which gives the
    same frames as the eager path's shortcuts) and attention over the whole cache. Everything it
    touches is a fixed buffer updated in place; prefill, turn control and sampling settings write
    into the same buffers between replays. Weights must not be moved or replaced afterwards.
    NOTE: written without access to a GPU; checked by tests/gpu/test_realtime_cuda_graph.py.
    """

    def __init__(self, generator: RealtimeGenerator) -> None:
        self._generator = generator
        attend_length = generator.max_context + 1
        # Warm-up and capture run a tick with no slot generating and every slot writing at its
        # current length, i.e. into free cache rows: no conversation state changes.
        generator._in_generating.zero_()
        generator._in_fresh.zero_()
        generator._in_positions.copy_(generator._length.clamp(max=generator.max_context))
        stream = torch.cuda.Stream(generator.device)
        stream.wait_stream(torch.cuda.current_stream(generator.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # lazy inits, allocator and library workspaces outside the capture
                generator.device_tick(attend_length)
        torch.cuda.current_stream(generator.device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._hidden, self._frames = generator.device_tick(attend_length)
        log.info("captured the realtime tick in a CUDA graph", extra={"slots": generator.num_slots})

    def replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden [S, hidden], frames [S, rvq]); buffers overwritten by the next replay."""
        self._graph.replay()
        return self._hidden, self._frames
