"""Shared parts of the batch subcommands (tts, dialogue, voice-design, sfx): options, JSONL input,
engine building and writing the wav files as results complete."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from moss_agent import model_ids
from moss_agent.commands import common
from moss_agent.errors import CheckpointError, ConfigError, MossError

# Published checkpoints per request kind.
DEFAULT_MODELS = {
    "tts": model_ids.TTS_MODEL_ID,
    "dialogue": model_ids.DIALOGUE_MODEL_ID,
    "voice_design": model_ids.VOICE_DESIGN_MODEL_ID,
    "sfx": model_ids.SOUND_EFFECT_MODEL_ID,
}
UNTRAINED_NOTICE = (
    "NOTE: --tiny uses tiny RANDOM, UNTRAINED models: the audio is noise, not speech. "
    "Drop --tiny for the real models."
)
# JSONL keys that are not request fields.
_EXTRA_KEYS = ("kind", "output")
_AUDIO_KEYS = ("reference", "continuation", "references")


def add_batch_options(parser: argparse.ArgumentParser, kind: str) -> None:
    model = DEFAULT_MODELS[kind]
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--jsonl",
        type=Path,
        default=None,
        help="many requests: one JSON object per line with the request fields (an optional "
        '"output" names its wav; audio fields take paths relative to the file)',
    )
    io.add_argument(
        "--output", "-o", type=Path, default=None, help=f"wav for a single request (default {kind}.wav)"
    )
    io.add_argument(
        "--output-dir", type=Path, default=None, help="folder for the wavs of --jsonl (default .)"
    )
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=model, help=f"checkpoint folder or hub id (default {model})")
    group.add_argument(
        "--codec",
        default=None,
        help="MOSS-Audio-Tokenizer folder or hub id (default: the one the model names)",
    )
    group.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random checkpoints made locally (offline trials; not speech)",
    )
    group.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    group.add_argument(
        "--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)"
    )
    group.add_argument("--batch-size", type=int, default=8, help="pieces generated together (default 8)")
    group.add_argument(
        "--max-chars", type=int, default=300, help="longest text piece; longer texts are split (default 300)"
    )
    group.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="cap on each text piece's audio (default: about 320 s)",
    )
    group.add_argument(
        "--greedy", action="store_true", help="greedy decoding instead of the model card's sampling"
    )
    group.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def read_jsonl(path: Path, kind: str) -> list[dict[str, Any]]:
    """Request objects from a JSONL file; errors name the file and line. Audio paths become absolute."""
    from moss_agent.engine.batch import KINDS

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    allowed = {f.name for f in fields(KINDS[kind])} | set(_EXTRA_KEYS)
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: each line must be a JSON object, got {type(item).__name__}")
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(unknown)}; a {kind} request takes {', '.join(sorted(allowed))}"
            )
        if item.get("kind", kind).replace("-", "_") != kind:
            raise ConfigError(f"{where}: kind {item['kind']!r} does not belong in a {kind} file")
        for key in _AUDIO_KEYS:
            if key in item:
                item[key] = _relative_to(item[key], path.parent)
        item["_line"] = where
        items.append(item)
    if not items:
        raise ConfigError(f"{path} holds no requests")
    return items


def _relative_to(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        return str(base / value) if not Path(value).is_absolute() else value
    if isinstance(value, list):
        return [_relative_to(v, base) for v in value]
    return value


def build_batch_engine(args: argparse.Namespace) -> Any:
    from moss_agent.engine.registry import ModelRegistry

    model, codec = args.model, args.codec
    if args.tiny:
        print(UNTRAINED_NOTICE, file=sys.stderr)
        model = common.ensure_tiny_batch_checkpoint()
        codec = common.ensure_tiny_checkpoints()[1]
    options: dict[str, Any] = {"max_chars": args.max_chars}
    if args.max_seconds is not None:
        if args.max_seconds <= 0:
            raise ConfigError(f"--max-seconds must be > 0, got {args.max_seconds}")
        options["max_new_tokens"] = round(args.max_seconds * 12.5) + 40  # + the flush and end rows
    registry = ModelRegistry(device=args.device, dtype=args.dtype)
    registry.tts(model)  # loaded first, so a checkpoint error after it is the codec's
    try:
        return registry.batch_engine(model, codec, **options)
    except CheckpointError as exc:  # the codec named by the model's processor_config.json too
        exc.option = exc.option or "--codec"
        raise


def run_batch(
    args: argparse.Namespace, kind: str, single: Callable[[argparse.Namespace], dict[str, Any]]
) -> int:
    """Build the requests (the text argument, or --jsonl), generate, write one wav per request."""
    from moss_agent.audio import write_wav

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.jsonl is not None:
        if args.output is not None:
            raise ConfigError("--output is for one request; with --jsonl use --output-dir")
        items = read_jsonl(args.jsonl, kind)
    else:
        if args.output_dir is not None:
            raise ConfigError("--output-dir is for --jsonl; for one request use --output")
        items = [single(args)]
    engine = build_batch_engine(args)
    requests, targets = [], []
    out_dir = args.output_dir or Path(".")
    for index, item in enumerate(items):
        where = item.pop("_line", None)
        output = item.pop("output", None)
        item.pop("kind", None)
        try:
            requests.append(engine.request(kind, **item))
        except MossError as exc:
            raise ConfigError(f"{where}: {exc}" if where else str(exc)) from exc
        if where is None:
            targets.append(args.output or Path(f"{kind.replace('_', '-')}.wav"))
        else:
            targets.append(out_dir / (output or f"{index:04d}.wav"))
    if args.jsonl is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    params = None
    if args.greedy:
        params = engine.default_params(kind).greedy()
    unfinished = 0
    for result in engine.stream(
        requests, batch_size=args.batch_size, progress=not args.quiet, params=params, seed=args.seed
    ):
        target = targets[result.index]
        write_wav(target, result.pcm, result.sample_rate)
        unfinished += not result.finished
        note = "" if result.finished else " (cut at the length limit)"
        print(f"wrote {target} ({result.duration_s:.2f} s of audio){note}")
    if unfinished:
        print(f"{unfinished} request(s) hit the length limit before ending", file=sys.stderr)
    return 0


def read_text(value: str) -> str:
    """The text argument; '-' reads standard input."""
    return sys.stdin.read() if value == "-" else value
