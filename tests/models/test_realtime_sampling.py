"""Batched sampling: penalty, top-k/top-p candidate sets, counter-based random streams, windows."""

from __future__ import annotations

import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.sampling import (
    RepetitionWindow,
    SamplingConfig,
    apply_repetition_penalty,
    counter_uniforms,
    sample_rows,
)


def _upstream_candidates(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The ids upstream's filters keep (top-k mask, then ascending-cumsum top-p), for one row."""
    scaled = logits / temperature
    kth = torch.topk(scaled, top_k).values[-1]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    sorted_logits, order = torch.sort(scaled)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative <= 1 - top_p
    remove[-1] = False
    kept = order[~remove]
    return {int(i) for i in kept if torch.isfinite(scaled[i])}


def _upstream_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    out = logits.clone()
    if history:
        seen = torch.tensor(history)
        values = out.gather(0, seen)
        out.scatter_(0, seen, torch.where(values < 0, values * penalty, values / penalty))
    return out


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.8, 30, 0.6), (1.0, 5, 1.0), (0.5, 64, 0.95), (1.3, 1, 0.5)]
)
def test_candidates_and_probabilities(temperature: float, top_k: int, top_p: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 300) * 3
    grid = 4000
    uniforms = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    picks = sample_rows(
        logits.expand(grid, -1),
        temperature=torch.full((grid,), temperature),
        top_k=torch.full((grid,), top_k),
        top_p=torch.full((grid,), top_p),
        greedy=torch.zeros(grid, dtype=torch.bool),
        uniform=uniforms,
        k_max=64,
    )
    allowed = _upstream_candidates(logits[0], temperature, top_k, top_p)
    assert set(picks.tolist()) == allowed
    # inverse-CDF over the grid gives each candidate its renormalised probability
    probs = torch.softmax(logits[0] / temperature, -1)
    kept = torch.tensor(sorted(allowed))
    target = probs[kept] / probs[kept].sum()
    counts = torch.stack([(picks == i).sum() for i in kept]).float() / grid
    assert torch.allclose(counts, target, atol=2.0 / grid + 1e-6)


def test_greedy_rows_and_per_row_settings() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 50)
    picks = sample_rows(
        logits,
        temperature=torch.tensor([1.0, 1.0, 0.7]),
        top_k=torch.tensor([10, 1, 10]),
        top_p=torch.tensor([0.9, 0.9, 1e-6]),
        greedy=torch.tensor([True, False, False]),
        uniform=torch.tensor([0.99, 0.99, 0.99]),
        k_max=10,
    )
    assert torch.equal(picks, logits.argmax(-1))  # greedy, top_k=1 and a tiny top_p all reduce to argmax


def test_counter_uniforms_are_per_row_streams() -> None:
    seeds = torch.tensor([1, 2, 3, 2**40 + 5])
    counters = torch.tensor([0, 0, 7, 123456])
    values = counter_uniforms(seeds, counters, 16)
    assert values.shape == (4, 16) and float(values.min()) >= 0.0 and float(values.max()) < 1.0
    alone = counter_uniforms(seeds[2:3], counters[2:3], 16)
    assert torch.equal(alone[0], values[2])
    assert not torch.equal(counter_uniforms(seeds, counters + 1, 16), values)
    many = counter_uniforms(torch.arange(2000), torch.zeros(2000, dtype=torch.long), 16).flatten()
    assert abs(float(many.mean()) - 0.5) < 0.01
    histogram = torch.histc(many, bins=10, min=0.0, max=1.0) / many.numel()
    assert float((histogram - 0.1).abs().max()) < 0.01


def test_repetition_window_matches_upstream_penalty() -> None:
    torch.manual_seed(3)
    batch, codebooks, vocab, frames = 3, 4, 12, 30
    tracker = RepetitionWindow(batch, codebooks, max_window=8, device=torch.device("cpu"))
    settings = [(8, 1.1), (3, 2.0), (0, 1.5)]  # window 0 turns the penalty off
    for row, (window, penalty) in enumerate(settings):
        tracker.start(row, window, penalty)
    history = torch.randint(0, vocab, (frames, batch, codebooks))
    active = torch.rand(frames, batch) > 0.3
    made: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    index = torch.zeros(batch, dtype=torch.long)
    for step in range(frames):
        penalty = tracker.frame_penalty(index)
        for codebook in range(codebooks):
            logits = torch.randn(batch, vocab)
            ours = apply_repetition_penalty(logits.clone(), tracker.history(codebook), penalty)
            for row, (window, factor) in enumerate(settings):
                recent = [int(f[codebook]) for f in made[row][-window:]] if window else []
                assert torch.equal(ours[row], _upstream_penalty(logits[row], recent, factor))
        tracker.record(history[step], index, active[step])
        for row in range(batch):
            if active[step, row]:
                made[row].append(history[step, row])
        index += active[step].long()


def test_config_validation() -> None:
    assert SamplingConfig(temperature=0).is_greedy and SamplingConfig(greedy=True).is_greedy
    assert SamplingConfig(top_k=None, greedy=True).is_greedy  # greedy needs no top-k
    for bad in (
        {"temperature": -1},
        {"top_p": 0.0},
        {"top_k": 0},
        {"repetition_penalty": 0},
        {"repetition_window": -1},
        {"min_frames": -1},
        {"top_k": None},  # the sampler draws from a fixed top-k list: None cannot disable it
    ):
        with pytest.raises(ConfigError):
            SamplingConfig(**bad)  # type: ignore[arg-type]
