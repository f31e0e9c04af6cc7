"""The capturable device tick: the all-features path equals the shortcut path, and it traces whole."""

from __future__ import annotations

import time

import pytest
import torch

from moss_agent.models.realtime import RealtimeGenerator, SamplingConfig
from moss_agent.models.realtime.model import MossTTSRealtime, model_from_state_dict
from moss_agent.models.realtime.tiny import random_state_dict, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Hello there, this is a streaming test of the realtime voice. It keeps going for a while."
GREEDY = SamplingConfig(greedy=True)
SAMPLED = SamplingConfig(temperature=0.9, top_k=20, top_p=0.8, repetition_penalty=1.2, repetition_window=8)
# Greedy, no special-code mask or penalty, but EOS banned on a turn's first 6 frames.
PLAIN_WITH_MINIMUM = SamplingConfig(greedy=True, repetition_penalty=1.0, mask_special_codes=False, min_frames=6)


def tiny_model(device: torch.device) -> MossTTSRealtime:
    config = tiny_config(hidden=32)
    state = random_state_dict(config, 0, 2.0)  # some turns reach EOS, so slots free up mid-run
    return model_from_state_dict(config, state, device=device, dtype=torch.float32)


def run_schedule(gen: RealtimeGenerator, sampling: list[SamplingConfig], ticks: int = 60) -> list[torch.Tensor]:
    """Slots join at different ticks, one leaves and comes back, text arrives in pieces.
    -> every tick's frames [S, rvq] where produced (others set to -1)."""
    joins = {0: [0], 3: [1], 9: [2]}
    outputs = []
    for tick in range(ticks):
        for slot in joins.get(tick, []):
            gen.start_conversation(slot)
            gen.start_turn(slot, "How are you?", None, sampling=sampling[slot], seed=slot + 1, max_frames=25)
        if tick == 20:
            gen.release(1)
        if tick == 26:
            gen.start_conversation(1)
            gen.start_turn(1, "Again?", None, sampling=sampling[1], seed=7, max_frames=25)
        for slot in range(gen.num_slots):
            turn = gen.state.slots[slot].turn
            if turn is not None and not turn.closed and gen.turn_running(slot):
                piece = TEXT[(tick % 10) * 9 : (tick % 10) * 9 + 9]
                gen.push_text(slot, piece)
                if tick % 10 == 9:
                    gen.end_text(slot)
        out = gen.step()
        outputs.append(torch.where(out.produced[:, None], out.frames, -1))
    return outputs


def test_full_tick_equals_the_shortcut_tick(tokenizer) -> None:
    model = tiny_model(torch.device("cpu"))
    # Slot 0 greedy with penalty, slot 1 sampled with penalty, slot 2 greedy without mask/penalty
    # but with a minimum length (EOS banned on its first frames).
    sampling = [GREEDY, SAMPLED, PLAIN_WITH_MINIMUM]
    results = []
    for full in (False, True):
        gen = RealtimeGenerator(model, tokenizer, num_slots=3, max_context=256)
        assert not gen.uses_cuda_graph  # CPU: always eager
        gen.full_tick = full
        results.append(run_schedule(gen, sampling))
    per_tick = [int((frames >= 0).all(-1).sum()) for frames in results[0]]
    assert sum(per_tick) > 30 and max(per_tick) >= 2  # real frames, several slots in one tick
    for shortcut, full in zip(*results, strict=True):
        assert torch.equal(shortcut, full)


def test_device_tick_traces_without_graph_breaks(tokenizer) -> None:
    model = tiny_model(torch.device("cpu"))
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=64)
    gen.start_conversation(0)
    gen.state.set_idle_inputs()  # an idle tick: writes land in free cache rows
    began = time.perf_counter()
    compiled = torch.compile(gen.device_tick, fullgraph=True, backend="eager")
    with torch.inference_mode():
        hidden, frames = compiled(gen.state.whole_cache)
    if time.perf_counter() - began > 60:
        pytest.skip("tracing took over a minute on this machine")
    assert hidden.shape == (2, model.config.hidden_size)
    assert frames.shape == (2, model.config.rvq)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_tick_gives_the_eager_frames(tokenizer, backend: str) -> None:
    """The compiled tick (one graph per local position, the position given by tensors) makes the
    same frames as the eager tick for a mix of greedy and sampled slots joining and leaving.
    ``eager`` only traces (checks the graph form); ``inductor`` runs the generated C++ kernels."""
    model = tiny_model(torch.device("cpu"))
    sampling = [GREEDY, SAMPLED, PLAIN_WITH_MINIMUM]
    results = []
    for compile in (False, backend):
        gen = RealtimeGenerator(model, tokenizer, num_slots=3, max_context=256, compile=compile)
        results.append(run_schedule(gen, sampling, ticks=40))
    assert sum(int((frames >= 0).all(-1).sum()) for frames in results[0]) > 30
    for eager, compiled in zip(*results, strict=True):
        assert torch.equal(eager, compiled)
