"""End-to-end batch engine throughput: seconds of audio out per wall-clock second, generation and
codec decode included (BatchEngine.generate: prompt building, batched generation, batched decode).

Small random checkpoints on the CPU (1 thread by default): the Delay model of benchmarks/batch.py (n_vq 32,
real Qwen3 vocabulary) and a tiny random codec with 32 codebooks. The model's text channel is
scripted (greedy gen slots), so every request runs ``--steps`` rows, as a long utterance would.
The decode share is printed separately; with the tiny codec it is far below the real codec's.

    .venv/bin/python benchmarks/batch_engine.py            # batch 1 / 4 / 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moss_agent.engine.batch import BatchEngine
from moss_agent.models.codec import load_codec
from moss_agent.models.codec.tiny import save_tiny_codec
from moss_agent.models.delay.tiny import save_tiny_delay
from moss_agent.models.tts_loading import load_tts

SMALL = dict(n_vq=32, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, ffn=128)


def measure(engine: BatchEngine, batch: int, steps: int, repeats: int) -> tuple[float, float, float]:
    """Best of ``repeats``: (audio seconds, end-to-end wall seconds, decode-only wall seconds)."""
    requests = [
        {"text": f"Sample number {i} reads a long enough sentence for the benchmark."} for i in range(batch)
    ]
    params = replace(engine.default_params("tts"), text_temperature=0.0)
    best = (0.0, float("inf"), float("inf"))
    for _ in range(repeats):
        start = time.perf_counter()
        results = engine.generate(requests, batch_size=batch, params=params, seed=0, progress=False)
        total = time.perf_counter() - start
        audio_s = sum(r.duration_s for r in results)
        samples = engine.tts.generate(
            [engine.request(**r) for r in requests], params=params, max_new_tokens=steps
        )
        start = time.perf_counter()
        engine.decode(samples)
        decode = time.perf_counter() - start
        if total < best[1]:
            best = (audio_s, total, decode)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="rows per request (12.5 per audio second)")
    parser.add_argument("--threads", type=int, default=1, help="1 gives steadier figures on a shared machine")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_delay(Path(tmp) / "delay", seed=0, scripted_frames=1e6, **SMALL)
        codec_dir = save_tiny_codec(Path(tmp) / "codec", seed=0, num_quantizers=32, codebook_size=1024)
        tts = load_tts(model_dir, device="cpu", dtype="float32")
        codec = load_codec(codec_dir, device="cpu", dtype="float32")
        engine = BatchEngine(tts, codec, max_new_tokens=args.steps)
        print(
            f"CPU small Delay config {SMALL} + tiny codec, {args.threads} threads, {args.steps} rows per request"
        )
        print(f"{'batch':>5} {'audio s':>8} {'wall s':>7} {'audio s/s':>9} {'decode s':>8}")
        for batch in (1, 4, 16):
            audio_s, wall, decode = measure(engine, batch, args.steps, args.repeats)
            print(f"{batch:>5} {audio_s:>8.1f} {wall:>7.2f} {audio_s / wall:>9.1f} {decode:>8.2f}")


if __name__ == "__main__":
    main()
