"""Batch TTS generation throughput: seconds of audio generated per wall-clock second.

Each decode step emits one row per sample, i.e. one 12.5 Hz codec frame in steady state
(80 ms of audio), so audio seconds = batch * steps / 12.5. The CPU run uses a small random
Delay checkpoint (n_vq 32, real Qwen3 vocabulary) with 2 threads; with CUDA the full-size
MOSS-TTS 8B shapes (Qwen3-8B backbone, 32 codebooks, random weights, bf16) run as well.

    .venv/bin/python benchmarks/batch.py                # CPU small config, batch 1 / 4 / 16
    .venv/bin/python benchmarks/batch.py --full-size    # plus the 8B shapes on the GPU
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

from moss_agent.models.batch_sampling import preset
from moss_agent.models.delay.config import TTSModelConfig
from moss_agent.models.delay.generation import generate_delay
from moss_agent.models.delay.model import MossTTSDelayModel
from moss_agent.models.delay.processor import TTSProcessor
from moss_agent.models.delay.requests import TTSRequest, prepare_batch
from moss_agent.models.delay.tiny import delay_config_dict, save_tiny_delay
from moss_agent.models.tts_loading import build_model, load_tts

FRAMES_PER_SECOND = 12.5
SMALL = dict(n_vq=32, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, ffn=128)
FULL_8B = dict(n_vq=32, hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=12288)


def prompts(
    processor: TTSProcessor, batch: int, n_vq: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuation prompts (audio mode from the first step) with varied lengths: realistic left padding."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(batch):
        codes = torch.randint(0, 1024, (6 + i % 5, n_vq), generator=gen)
        requests.append(TTSRequest(f"Sample number {i} says hello to the benchmark.", continuation=codes))
    prompt = prepare_batch(processor, requests)
    return prompt.input_ids, prompt.attention_mask


def measure(
    model: MossTTSDelayModel, processor: TTSProcessor, batch: int, steps: int, repeats: int
) -> tuple[float, int]:
    """Best wall time of ``repeats`` runs (prefill included) and the decode steps each ran."""
    ids, mask = prompts(processor, batch, model.config.n_vq)
    # Audio codes are sampled with the MOSS-TTS preset; the text stream is greedy over tied slot
    # rows (see hold_in_audio), so every step stays inside the utterance, as with a trained model.
    params = replace(preset("moss-tts"), text_temperature=0.0)
    on_gpu = model.device.type == "cuda"
    generate_delay(model, ids, mask, params=params, max_new_tokens=3, static_cache=on_gpu)
    best = float("inf")
    done = 0
    for repeat in range(repeats):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = generate_delay(
            model,
            ids,
            mask,
            params=params,
            max_new_tokens=steps,
            generator=torch.Generator(model.device).manual_seed(repeat),
            static_cache=on_gpu,
        )
        if on_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        # Continuation rows hold the audio_start row and the prompt frames, then one row per step.
        done = results[0].rows.shape[0] - results[0].prompt_frames - 1
    return best, done


def hold_in_audio(model: MossTTSDelayModel) -> None:
    """Random weights would leave audio mode at random; tie the gen/delay slot rows of the text head
    (argmax then keeps gen_slot) so each decode step produces one codec frame."""
    cfg = model.config
    with torch.no_grad():
        head = model.lm_heads[0].weight
        head[cfg.audio_assistant_gen_slot_token_id] = 0
        head[cfg.audio_assistant_delay_slot_token_id] = 0


def run(
    name: str, model: MossTTSDelayModel, processor: TTSProcessor, batches: list[int], steps: int, repeats: int
) -> None:
    hold_in_audio(model)
    print(f"{name}: {steps} decode steps, audio sampled with preset moss-tts, best of {repeats}")
    base = None
    for batch in batches:
        elapsed, done = measure(model, processor, batch, steps, repeats)
        audio_s = batch * done / FRAMES_PER_SECOND
        throughput = audio_s / elapsed
        base = base or throughput
        print(
            f"  batch {batch:>3}: {elapsed:7.2f} s for {done} steps, {1000 * elapsed / done:7.1f} ms/step, "
            f"{throughput:8.2f} s audio / s  ({throughput / base:4.1f}x batch {batches[0]})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100, help="decode steps on the CPU small config")
    parser.add_argument(
        "--gpu-steps", type=int, default=100, help="decode steps for the full-size GPU shapes"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size; the fastest counts")
    parser.add_argument("--full-size", action="store_true", help="also run MOSS-TTS 8B shapes on CUDA")
    parser.add_argument(
        "--tokenizer-from", type=Path, default=None, help="checkpoint folder to copy tokenizer from"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_delay(Path(tmp) / "small", seed=0, tokenizer_source=args.tokenizer_from, **SMALL)
        small = load_tts(folder, device="cpu", dtype="float32")
        run(
            f"CPU small Delay config {SMALL} ({args.threads} threads)",
            small.model,
            small.processor,
            [1, 4, 16],
            args.steps,
            args.repeats,
        )
        if args.full_size:
            if not torch.cuda.is_available():
                print("full size: skipped, no CUDA device")
                return
            config = TTSModelConfig.from_dict(delay_config_dict(**FULL_8B))
            device = torch.device("cuda")
            model = build_model(config, None, device=device, dtype=torch.bfloat16, source="random 8B")
            assert isinstance(model, MossTTSDelayModel)
            processor = TTSProcessor(small.processor.tokenizer, config)
            name = f"{torch.cuda.get_device_name()} MOSS-TTS 8B shapes (random bf16 weights)"
            run(name, model, processor, [1, 4, 16], args.gpu_steps, args.repeats)


if __name__ == "__main__":
    main()
