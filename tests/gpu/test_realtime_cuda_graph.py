"""The realtime tick replayed from a CUDA graph makes the same frames as the eager tick."""

from __future__ import annotations

import pytest
import torch

from moss_agent.models.realtime import RealtimeGenerator, SamplingConfig
from tests.models.shared_fixtures import tokenizer  # noqa: F401 (fixture)
from tests.models.test_realtime_tick import run_schedule, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def greedy_frames(
    tokenizer, sampling: list[SamplingConfig] | None = None, **options  # noqa: F811
) -> tuple[RealtimeGenerator, list[torch.Tensor]]:
    """Three slots (greedy unless ``sampling`` says) on the GPU through ``run_schedule``
    -> (generator, frames per tick)."""
    model = tiny_model(torch.device("cuda"))
    gen = RealtimeGenerator(model, tokenizer, num_slots=3, max_context=256, attention_bucket=None, **options)
    return gen, run_schedule(gen, sampling or [SamplingConfig(greedy=True)] * 3, ticks=80)


def test_graph_frames_equal_eager_frames_greedy(tokenizer) -> None:  # noqa: F811
    eager_gen, eager = greedy_frames(tokenizer, cuda_graph=False)
    graph_gen, replayed = greedy_frames(tokenizer, cuda_graph=True)
    assert not eager_gen.uses_cuda_graph and graph_gen.uses_cuda_graph
    assert graph_gen.state.graph is not None  # really replayed, not the eager fallback
    per_tick = [int((frames >= 0).all(-1).sum()) for frames in eager]
    assert sum(per_tick) > 30 and max(per_tick) >= 2
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed, strict=True))


def test_graph_reads_the_whole_cache_whatever_the_bucket(tokenizer) -> None:  # noqa: F811
    model = tiny_model(torch.device("cuda"))
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256, attention_bucket=64)
    assert gen.uses_cuda_graph and gen.attention_bucket is None


def test_compiled_tick_inside_the_graph_gives_the_eager_frames(tokenizer) -> None:  # noqa: F811
    """compile=True on CUDA: the compiled local-transformer step is captured in the tick's graph."""
    _, plain = greedy_frames(tokenizer)
    compiled_gen, compiled = greedy_frames(tokenizer, compile=True)
    assert compiled_gen.uses_cuda_graph and compiled_gen.state.graph is not None
    assert all(torch.equal(a, b) for a, b in zip(plain, compiled, strict=True))


def test_graph_bans_eos_below_min_frames_per_slot(tokenizer) -> None:  # noqa: F811
    """min_frames lives in the graph's fixed buffers: a replayed tick holds EOS back in the slot
    that asks, exactly as the eager tick does, and the other slots are unchanged."""
    plain = [SamplingConfig(greedy=True)] * 3
    minimum = [plain[0], SamplingConfig(greedy=True, min_frames=20), plain[2]]
    _, eager = greedy_frames(tokenizer, minimum, cuda_graph=False)
    _, replayed = greedy_frames(tokenizer, minimum, cuda_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed, strict=True))
    _, without = greedy_frames(tokenizer, plain, cuda_graph=True)
    for slot in (0, 2):
        assert all(torch.equal(a[slot], b[slot]) for a, b in zip(without, replayed, strict=True))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(without, replayed, strict=True))  # it spoke longer
