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


def test_graph_frames_equal_eager_frames_greedy(tokenizer) -> None:  # noqa: F811
    model = tiny_model(torch.device("cuda"))
    sampling = [SamplingConfig(greedy=True)] * 3
    results = []
    for graph in (False, True):
        gen = RealtimeGenerator(
            model, tokenizer, num_slots=3, max_context=256, cuda_graph=graph, attention_bucket=None
        )
        assert gen.uses_cuda_graph is graph
        results.append(run_schedule(gen, sampling, ticks=80))
        if graph:
            assert gen._graph is not None  # really replayed, not the eager fallback
    per_tick = [int((frames >= 0).all(-1).sum()) for frames in results[0]]
    assert sum(per_tick) > 30 and max(per_tick) >= 2
    for eager, replayed in zip(*results, strict=True):
        assert torch.equal(eager, replayed)


def test_graph_reads_the_whole_cache_whatever_the_bucket(tokenizer) -> None:  # noqa: F811
    model = tiny_model(torch.device("cuda"))
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256, attention_bucket=64)
    assert gen.uses_cuda_graph and gen.attention_bucket is None


def test_compiled_tick_inside_the_graph_gives_the_eager_frames(tokenizer) -> None:  # noqa: F811
    """compile=True on CUDA: the compiled local-transformer step is captured in the tick's graph."""
    model = tiny_model(torch.device("cuda"))
    sampling = [SamplingConfig(greedy=True)] * 3
    results = []
    for compile in (False, True):
        gen = RealtimeGenerator(
            model, tokenizer, num_slots=3, max_context=256, attention_bucket=None, compile=compile
        )
        assert gen.uses_cuda_graph
        results.append(run_schedule(gen, sampling, ticks=60))
    for eager, compiled in zip(*results, strict=True):
        assert torch.equal(eager, compiled)
