"""MOSS-TTS-Realtime streaming speed: time to first frame, ms per frame, throughput.

Random checkpoints in the official layout (real 151936-token vocabulary), never reaching EOS:
- tiny:  hidden 64, 2 backbone + 2 local layers (CPU);
- small: hidden 256, 4 backbone + 4 local layers (CPU);
- full:  the released shape, Qwen3-1.7B backbone + 4-layer 2048-wide local transformer, bf16,
  on a GPU when there is one (H100 targets: first audio under 60 ms, 64 slots faster than real time).
For 1, 4 and 16 concurrent slots of one ``RealtimeGenerator`` it reports
- ttff_ms: first text delta pushed -> that slot's first frame (12-token prefill + frame 0),
  median over three turns of every slot (slots start their turns together);
- tick_ms: one batched step, i.e. ms per frame for every slot (a frame is 80 ms of audio), the median;
  best_ms: the fastest tick, what the machine can do when no other process takes the cores;
- frames_s: aggregate frames per second; rtf: compute / audio time per stream (tick_ms / 80);
- state_mib_slot: preallocated state per slot (KV caches, rows, sampling state).
``--stagger ROWS`` makes slot s's context about s * ROWS rows longer (a longer system prompt), so
the slots attend over different lengths, as in a real mix of conversations.
``--breakdown`` times the parts of a tick instead (backbone row, local positions, sampling, host
work, and the codec's streaming decode step beside it); ``tick_breakdown.py`` says how.
Figures beside upstream's realtime loop come only from one side-by-side run, by the method of
``../shared/bench/README.md`` (outside this repository); the README's speed table carries them.

    .venv/bin/python benchmarks/realtime.py                    # 2 threads, both configs, eager
    .venv/bin/python benchmarks/realtime.py --compile          # the tick through torch.compile
    .venv/bin/python benchmarks/realtime.py --threads 1 --configs tiny --slots 1 16
    .venv/bin/python benchmarks/realtime.py --slots 16 --stagger 32    # mixed context lengths
    .venv/bin/python benchmarks/realtime.py --breakdown --slots 1 16   # where a tick's time goes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tick_breakdown import make_codec, print_breakdown  # benchmarks/tick_breakdown.py: --breakdown

from moss_agent.models.realtime import RealtimeGenerator, SamplingConfig, load_realtime, save_tiny_realtime
from moss_agent.models.realtime.model import load_realtime_tokenizer
from moss_agent.models.realtime.tiny import random_realtime_model, tiny_config, write_tokenizer

CONFIGS = {
    "tiny": {"hidden": 64, "backbone_layers": 2, "local_layers": 2, "heads": 4, "kv_heads": 2},
    "small": {"hidden": 256, "backbone_layers": 4, "local_layers": 4, "heads": 8, "kv_heads": 4},
}
# Qwen3-1.7B backbone and the 2048-wide, 4-layer local transformer of the released model.
FULL = {
    "hidden": 2048, "backbone_layers": 28, "local_layers": 4, "heads": 16, "kv_heads": 8,
    "intermediate": 6144, "local_intermediate": 6144,
}
TEXT = (
    "Thanks for calling! Your order shipped this morning and should arrive on Thursday. "
    "Is there anything else I can help you with today? "
)
FRAME_S = 0.08


def ready(
    model, tokenizer, slots: int, warmup: int, max_context: int, compile: bool, stagger: int = 0,
    cuda_graph: bool = True,
) -> tuple[RealtimeGenerator, list[float]]:
    """A warm generator whose every slot generates on every tick from now on, and the first-frame
    times (s) of the three turns it measured on the way."""
    gen = RealtimeGenerator(
        model, tokenizer, num_slots=slots, max_context=max_context, compile=compile, cuda_graph=cuda_graph
    )
    sampling = SamplingConfig()
    for slot in range(slots):  # warm-up turn (allocator, thread pools), not measured
        gen.start_conversation(slot, "Speak." + " word" * (stagger * slot) if stagger else None)
        gen.start_turn(slot, "Hi", None, sampling=sampling, seed=slot, max_frames=3)
        gen.push_text(slot, TEXT)
        gen.end_text(slot)
    while gen.has_work():
        gen.step()
    # Text arrives as small deltas; each push is followed by a tick, as an engine loop would do.
    deltas = [TEXT[i : i + 6] for i in range(0, len(TEXT), 6)]
    ttff: list[float] = []
    for _ in range(3):  # three turns per slot: the median hides one-off stalls
        for slot in range(slots):
            gen.start_turn(slot, "Where is my order?", None, sampling=sampling, seed=slot, max_frames=100_000)
        first_frame: dict[int, float] = {}
        start = time.perf_counter()
        for delta in deltas:
            for slot in range(slots):
                gen.push_text(slot, delta)
            out = gen.step()
            now = time.perf_counter()
            for slot in out.produced.nonzero().flatten().tolist():
                first_frame.setdefault(slot, now - start)
        ttff += first_frame.values()
    for slot in range(slots):
        gen.end_text(slot)  # then <|text_pad|> rows: the model never stops (no EOS), every tick is full
    for _ in range(warmup):
        gen.step()
    return gen, ttff


def run(
    model, tokenizer, slots: int, ticks: int, warmup: int, max_context: int, compile: bool, stagger: int = 0
) -> dict[str, float]:
    gen, ttff = ready(model, tokenizer, slots, warmup, max_context, compile, stagger)
    times = []
    for _ in range(ticks):
        began = time.perf_counter()
        out = gen.step()
        times.append(time.perf_counter() - began)
        assert int(out.produced.sum()) == slots
    tick = statistics.median(times)
    return {
        "ttff_ms": 1000 * statistics.median(ttff),
        "tick_ms": 1000 * tick,
        "best_ms": 1000 * min(times),
        "frames_s": slots / tick,
        "rtf": tick / FRAME_S,
        "state_mib_slot": gen.state_bytes() / slots / 2**20,
    }


def load(name: str, folder: Path, device: str) -> tuple[torch.nn.Module, object]:
    """tiny/small: a checkpoint written to disk and loaded as a user would; full: random weights
    made in place on the device (1.7B parameters, no 7 GB file)."""
    if name != "full":
        checkpoint = save_tiny_realtime(folder, seed=0, eos_gain=0.0, **CONFIGS[name])
        return load_realtime(checkpoint, device=device, dtype="float32" if device == "cpu" else None)
    config = tiny_config(**FULL)
    folder.mkdir(parents=True)
    write_tokenizer(folder)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = random_realtime_model(config, torch.device(device), dtype, eos_gain=0.0)
    return model, load_realtime_tokenizer(folder, config)


def table(
    name: str, device: str, model, tokenizer, slot_counts: list[int], args: argparse.Namespace
) -> None:
    print(
        f"{'config':<7}{'device':>7}{'slots':>6}{'ttff_ms':>9}{'tick_ms':>9}{'best_ms':>9}{'frames/s':>10}"
        f"{'rtf':>7}{'x1slot':>8}{'MiB/slot':>10}"
    )
    single = None
    for slots in slot_counts:
        result = run(
            model, tokenizer, slots, args.ticks, args.warmup, args.max_context, args.compile, args.stagger
        )
        single = single or (result["frames_s"] if slots == 1 else None)
        scale = f"{result['frames_s'] / single:.1f}" if single else "-"
        print(
            f"{name:<7}{device:>7}{slots:>6}{result['ttff_ms']:>9.1f}{result['tick_ms']:>9.2f}"
            f"{result['best_ms']:>9.2f}{result['frames_s']:>10.1f}{result['rtf']:>7.3f}{scale:>8}"
            f"{result['state_mib_slot']:>10.2f}"
        )


def breakdowns(
    name: str, device: str, model, tokenizer, slot_counts: list[int], args: argparse.Namespace
) -> None:
    codec = make_codec(name, model.device, model.dtype)
    for slots in slot_counts:  # eager on CUDA too: a replayed graph has no parts to time
        gen, _ = ready(
            model, tokenizer, slots, args.warmup, args.max_context, args.compile, args.stagger,
            cuda_graph=False,
        )
        title = f"{name}, {device}, {slots} slot{'s' if slots > 1 else ''}"
        print_breakdown(title, gen, codec, args.ticks)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    has_cuda = torch.cuda.is_available()
    default_configs = [*CONFIGS, "full"] if has_cuda else list(CONFIGS)
    parser.add_argument("--configs", nargs="+", default=default_configs, choices=[*CONFIGS, "full"])
    parser.add_argument("--slots", nargs="+", type=int, default=None,
                        help="concurrent slots (default 1 4 16 on the CPU, 1 4 16 64 for full on a GPU)")
    parser.add_argument("--device", default=None, help="default: cpu for tiny/small, cuda for full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ticks", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--stagger", type=int, default=0, help="slot s starts s * STAGGER rows longer")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the tick (first tick of each size compiles)"
    )
    parser.add_argument("--breakdown", action="store_true", help="time a tick's parts (tick_breakdown.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads, max_context {args.max_context}, "
        f"{'compiled' if args.compile else 'eager'}, median of {args.ticks} ticks"
        + (f", slot s {args.stagger} * s rows longer" if args.stagger else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            device = args.device or ("cuda" if name == "full" else "cpu")
            if device.startswith("cuda") and not has_cuda:
                print(f"{name}: skipped, no CUDA device (pass --device cpu to run it on the CPU)")
                continue
            model, tokenizer = load(name, Path(tmp) / name, device)
            slot_counts = args.slots or ([1, 4, 16, 64] if device.startswith("cuda") else [1, 4, 16])
            if args.breakdown:
                breakdowns(name, device, model, tokenizer, slot_counts, args)
            else:
                table(name, device, model, tokenizer, slot_counts, args)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
