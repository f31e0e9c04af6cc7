"""Codec throughput: batched streaming decode/encode (1 vs 16 slots), offline encode/decode, peak memory.

    .venv/bin/python benchmarks/codec.py            # tiny + small (+ full size on a GPU)
    .venv/bin/python benchmarks/codec.py --quick    # fewer steps, shorter audio

Random weights, so only speed and memory mean anything. Frames are 80 ms: a stream needs 12.5
frames/s to keep up with real time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from moss_agent.models.codec import (
    CodecConfig,
    MossAudioTokenizer,
    build_codec,
    make_config_dict,
    published_config_dict,
)

# A codec that is meaningful on a CPU: the real patch chain, 2 layers per stage, d_model 128 (256 for
# the 12.5 Hz stage), 32 codebooks of 1024 codes, 4 s attention windows. On a CPU the streaming
# attention over the ring caches is memory-bound and grows with slots x window, so the 10 s window of
# the released model is measured as a separate row.
_ROW_TAG = "CODEC-BENCH-ROW "

SMALL = {
    "d_model": 128, "num_heads": 2, "num_layers": 2, "dim_feedforward": 512,
    "big_d_model": 256, "big_num_heads": 4, "big_num_layers": 2, "big_dim_feedforward": 1024,
    "stage_outputs": (64, 64, 128), "latent_dim": 128, "num_quantizers": 32, "codebook_size": 1024,
    "codebook_dim": 8, "rvq_dim": 128, "context_duration": 4.0,
}


@dataclass
class Row:
    name: str
    params: float
    dtype: str
    decode_fps: dict[int, float]
    encode_fps: dict[int, float]
    encode_rt: float
    decode_rt: float
    peak_mb: float


def randomize_(model: MossAudioTokenizer, seed: int) -> None:
    """Plausible random weights in place on the model's device (no CPU copy of a big model)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".scale"):
                param.fill_(0.1)
            elif ".norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("original0"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                std = 1.0 if name.endswith(("codebook.weight", "original1")) else 1 / math.sqrt(param.shape[-1])
                param.normal_(0.0, std, generator=generator)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(run: Callable[[], object], device: torch.device, repeats: int, rounds: int) -> float:
    """Best mean time of ``repeats`` calls over ``rounds`` rounds (robust to a busy shared machine)."""
    best = math.inf
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def streaming_fps(model: MossAudioTokenizer, slots: int, encode: bool, repeats: int, rounds: int) -> float:
    """Frames per second over all slots, one frame per slot per step, one batched forward per step."""
    device = model.device
    if encode:
        state = model.init_encode_state(slots)
        wav = 0.1 * torch.randn(slots, 1, model.frame_size, device=device)
        step: Callable[[], object] = lambda: model.encode_step(wav, state)  # noqa: E731
    else:
        state = model.init_decode_state(slots)
        codes = torch.randint(0, model.codebook_size, (model.num_quantizers, slots, 1), device=device)
        step = lambda: model.decode_step(codes, state)  # noqa: E731
    for _ in range(3):
        step()
    return slots / best_seconds(step, device, repeats, rounds)


class MemoryProbe:
    """Peak memory of one config: CUDA max_memory_allocated, or on the CPU the peak resident set of
    this (fresh, one-config) process above what it held before building the model."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        self.start = self._rss()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        return max(peak - self.start, 0) / 2**20


def measure(name: str, raw: dict, device: torch.device, dtype: torch.dtype, quick: bool) -> Row:
    probe = MemoryProbe(device)
    model = build_codec(CodecConfig.from_dict(raw), device=device, dtype=dtype)
    randomize_(model, seed=0)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    repeats, rounds = (3, 4) if quick else (8, 6)
    decode_fps: dict[int, float] = {}
    encode_fps: dict[int, float] = {}
    for _ in range(rounds):  # interleave 1 and 16 slots so load spikes hit both alike
        for slots in (1, 16):
            decode_fps[slots] = max(decode_fps.get(slots, 0.0), streaming_fps(model, slots, False, repeats, 1))
            encode_fps[slots] = max(encode_fps.get(slots, 0.0), streaming_fps(model, slots, True, repeats, 1))
    seconds = 4.0 if quick else 20.0
    wav = 0.1 * torch.randn(1, 1, int(seconds * model.sample_rate), device=device)
    codes, _ = model.encode(wav)
    encode_rt = seconds / best_seconds(lambda: model.encode(wav), device, 1, 3)
    decode_rt = seconds / best_seconds(lambda: model.decode(codes), device, 1, 3)
    row = Row(name, params, str(dtype).removeprefix("torch."), decode_fps, encode_fps, encode_rt, decode_rt,
              probe.peak_mb())
    return row


def print_table(rows: list[Row]) -> None:
    header = ("config", "params", "dtype", "dec 1 slot", "dec 16 slots", "16/1", "enc 1 slot", "enc 16 slots",
              "16/1", "offline enc", "offline dec", "peak MB")
    lines = [header]
    for r in rows:
        lines.append((
            r.name, f"{r.params:.2f}M", r.dtype,
            f"{r.decode_fps[1]:.0f} fr/s", f"{r.decode_fps[16]:.0f} fr/s", f"{r.decode_fps[16] / r.decode_fps[1]:.1f}x",
            f"{r.encode_fps[1]:.0f} fr/s", f"{r.encode_fps[16]:.0f} fr/s", f"{r.encode_fps[16] / r.encode_fps[1]:.1f}x",
            f"{r.encode_rt:.1f}x RT", f"{r.decode_rt:.1f}x RT", f"{r.peak_mb:.0f}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def configs(device: torch.device, full: bool) -> dict[str, dict]:
    found = {
        "tiny": make_config_dict(),
        "small": make_config_dict(**SMALL),
        "small, 10 s window": make_config_dict(**{**SMALL, "context_duration": 10.0}),
    }
    if device.type == "cuda" and full:
        found["full 1.77B"] = published_config_dict()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and 4 s of audio")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (default 2)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-size model on a GPU")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: measure one config, print JSON
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    known = configs(device, not args.no_full)
    if args.config:
        row = measure(args.config, known[args.config], device, dtype, args.quick)
        print(_ROW_TAG + json.dumps(asdict(row)))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"torch {torch.__version__}, device {device} ({name}{threads})")
    rows = []
    flags = ["--device", str(device), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    for config_name in known:
        # One process per config: clean peak-memory figures and no allocator state carried over.
        done = subprocess.run([sys.executable, __file__, "--config", config_name, *flags],
                              capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(_ROW_TAG)]
        if done.returncode or not lines:
            print(f"{config_name}: failed\n{done.stderr[-2000:]}")
            continue
        raw = json.loads(lines[-1].removeprefix(_ROW_TAG))
        for key in ("decode_fps", "encode_fps"):
            raw[key] = {int(slots): value for slots, value in raw[key].items()}
        rows.append(Row(**raw))
    print("streaming: one frame (80 ms) per slot per step, all slots in one batched forward; "
          "real time needs 12.5 fr/s per stream; peak MB on the CPU = peak RSS growth")
    print_table(rows)
    if device.type == "cpu":
        print("full-size model skipped on the CPU (1.77B parameters; run on a GPU)")


if __name__ == "__main__":
    main()
