"""Where a realtime tick's time goes: its parts timed one by one (``realtime.py --breakdown``).

``realtime.py`` hands over a warm ``RealtimeGenerator`` whose every slot generates on every tick
(``SamplingConfig()`` defaults: temperature, top-k, top-p, repetition penalty). Each round runs one
real tick (``gen.step()``), then its parts again on their own, with that tick's own inputs:
- backbone row: ``model.decode`` of the rows the tick fed, at the positions it fed them (it writes
  the same values into the same cache rows, so the conversation is unchanged);
- local positions: the local transformer's 16 positions with the codes given (the tick's frame),
  so nothing is chosen;
- sampling: the time the tick's own sampling took inside the tick: the frame's setup (its draws,
  repetition penalties and bans) and the 16 picks (penalty, bans, top-k/top-p draw), summed;
- host: the tick less those three (host control, input buffers, state updates, the frame's copy back);
- codec step: one streaming decode step of one frame for every slot, which the engine runs after
  each tick: ``codec.py``'s SMALL codec on the CPU (the released codec's shapes for ``full``) with the
  model's 16 codebooks, its attention window filled first. Its share is of the tick; the target is
  at most 20% of a 16-slot tick.
Medians over the rounds. Parts timed alone run with warmer or colder caches than inside the tick,
so they do not sum exactly to it; the host row takes up the difference (and can come out negative).
On CUDA the tick runs without its CUDA graph (a replayed graph has no parts to time) and every
part and each pick is synchronised, which slows the tick: there the rows say where the kernels go,
not what the graphed tick costs. With ``--compile`` the local positions and sampling run as one
compiled graph per position and are timed as one row; the backbone row is eager either way, as it
is in the compiled tick.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from codec import SMALL, randomize_, sync  # benchmarks/codec.py: the CPU-sized codec, random weights

from moss_agent.models.codec import CodecConfig, MossAudioTokenizer, build_codec, make_config_dict
from moss_agent.models.codec import published_config_dict as published_codec
from moss_agent.models.realtime import RealtimeGenerator


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def timed(device: torch.device, call: Callable[..., object], *args: Any) -> float:
    began = now(device)
    call(*args)
    return now(device) - began


def make_codec(config: str, device: torch.device, dtype: torch.dtype) -> MossAudioTokenizer:
    """The codec a ``config`` realtime model is measured beside: SMALL on the CPU sizes, the released
    shapes for ``full``; random weights (only speed means anything)."""
    raw = published_codec() if config == "full" else make_config_dict(**SMALL)
    codec = build_codec(CodecConfig.from_dict(raw), device=device, dtype=dtype)
    randomize_(codec, seed=0)
    return codec


class PickTimer:
    """Times the sampling of the generator's ticks: shadows its ``_picker`` (the factory the eager
    tick calls for its 16 picks) with one that adds its own time and its picks' to ``seconds``."""

    def __init__(self, gen: RealtimeGenerator) -> None:
        self.seconds = 0.0
        self._device = gen.device
        self._build = gen._picker
        gen._picker = self._timed_picker  # type: ignore[method-assign]

    def _timed_picker(self, *args: Any) -> Callable[[int, torch.Tensor], torch.Tensor]:
        began = now(self._device)
        pick = self._build(*args)  # the frame's draws, penalties and bans
        self.seconds += now(self._device) - began

        def timed_pick(index: int, logits: torch.Tensor) -> torch.Tensor:
            began = now(self._device)
            code = pick(index, logits)
            self.seconds += now(self._device) - began
            return code

        return timed_pick


@torch.inference_mode()
def breakdown(gen: RealtimeGenerator, codec: MossAudioTokenizer, rounds: int) -> dict[str, float]:
    """-> median ms per part over ``rounds`` rounds (keys: backbone, local, sampling, host, tick, codec)."""
    model, state, device = gen.model, gen.state, gen.device
    slots, rvq = gen.num_slots, gen.config.rvq
    compiled = state.compiled
    picks = PickTimer(gen)
    codec_state = codec.init_decode_state(slots)
    codes = torch.randint(0, codec.codebook_size, (rvq, slots, 1), device=codec.device)
    window = round(codec.config.context_duration * codec.sample_rate / codec.frame_size)
    for _ in range(window):  # a full attention window: the step's steady-state cost
        codec.decode_step(codes, codec_state)
    local = model.local_transformer
    times: dict[str, list[float]] = {part: [] for part in ("backbone", "local", "sampling", "tick", "codec")}
    for _ in range(rounds):
        picks.seconds = 0.0
        times["tick"].append(timed(device, gen.step))
        times["sampling"].append(picks.seconds)
        positions = state.in_positions
        ids = state.rows[state.slot_index, positions]  # what the tick fed, where it fed it
        times["backbone"].append(timed(device, model.decode, state.cache, ids, positions, gen.last_attention))
        if compiled is None:
            given = state.prev_frame.T.contiguous().unbind()  # the tick's frame, code by code
            pick = lambda index, logits: given[index]  # noqa: E731, B023
            times["local"].append(timed(device, local.generate, gen.last_hidden, state.local_cache, pick))
        else:
            times["local"].append(timed(device, compiled.local_frames, gen.last_hidden, state.in_frame_index))
        times["codec"].append(timed(codec.device, codec.decode_step, codes, codec_state))
    ms = {part: 1000 * statistics.median(values) for part, values in times.items()}
    ms["host"] = ms["tick"] - ms["backbone"] - ms["local"] - ms["sampling"]
    return ms


def print_breakdown(title: str, gen: RealtimeGenerator, codec: MossAudioTokenizer, rounds: int) -> None:
    ms = breakdown(gen, codec, rounds)
    slots, rvq = gen.num_slots, gen.config.rvq
    compiled = gen.state.compiled is not None
    local = f"local + sampling ({rvq}, compiled)" if compiled else f"local positions ({rvq})"
    rows = [
        ("backbone row", ms["backbone"]),
        (local, ms["local"]),
        *([] if compiled else [(f"sampling ({rvq} picks)", ms["sampling"])]),
        ("host (tick - parts)", ms["host"]),
        ("tick", ms["tick"]),
        (f"codec step ({slots} slot{'s' if slots > 1 else ''})", ms["codec"]),
    ]
    print(f"{title}: median of {rounds} rounds")
    print(f"  {'part':<34}{'ms':>8}{'of tick':>9}")
    for part, value in rows:
        print(f"  {part:<34}{value:>8.2f}{value / ms['tick']:>9.0%}")
