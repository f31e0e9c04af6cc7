"""Command-line options and builders for programs built on moss_agent.

The ``moss-agent`` command and the examples use them; so can your own scripts::

    parser = argparse.ArgumentParser()
    options.add_engine_options(parser)      # --model, --codec, --tiny, --device, --slots, --engine-url, ...
    options.add_llm_options(parser)         # --llm-url, --llm-model, --api-key, --system-prompt
    args = parser.parse_args()
    engine = options.build_engine(args)     # loads weights: call it off the event loop
    llm = options.build_llm(args)
    config = options.session_config(args)   # the system prompt and any other SessionConfig fields

This module and the CLI are the only places that read the environment (``OPENAI_API_KEY``,
``MOSS_ENGINE_TOKEN``, ``MOSS_AGENT_CACHE``, ``XDG_CACHE_HOME``); the library below takes everything as arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from moss_agent.config import LLMConfig, SessionConfig
from moss_agent.errors import ConfigError
from moss_agent.model_ids import CODEC_MODEL_ID, REALTIME_MODEL_ID

UNTRAINED_NOTICE = (
    "NOTE: --tiny uses a tiny RANDOM, UNTRAINED model: the audio is loud noise, not speech; "
    "lower the volume before you play it. "
    "Drop --tiny for the real models."
)
# Shared ranges of the engine options (the batch commands use the same seed range).
MAX_SLOTS = 256
MAX_REPLY_SECONDS = 600.0
MAX_SEED = 2**62
MAX_WAITING = 4096  # conversations queued for a slot (--max-waiting, where a command offers it)
# The longest voice prompt: it stays in every turn's context (4096 rows of 80 ms), so a long one
# leaves no room for the conversation; 5 to 20 s of clean speech is what the model needs.
MAX_VOICE_SECONDS = 60.0
DTYPES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
LLM_URL_EXAMPLE = "http://127.0.0.1:8000/v1"


def untrained_notice(args: argparse.Namespace) -> str:
    """The --tiny note, naming --llm-url only for commands that take it and did not get it."""
    if hasattr(args, "llm_url") and not args.llm_url:
        return UNTRAINED_NOTICE.replace("Drop --tiny", "Drop --tiny (and pass --llm-url)")
    return UNTRAINED_NOTICE


def cache_dir() -> Path:
    base = os.environ.get("MOSS_AGENT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "moss_agent"
    )
    return Path(base)


def add_engine_options(parser: argparse.ArgumentParser, *, slots: int = 4) -> None:
    group = parser.add_argument_group("speech model")
    group.add_argument("--model", default=REALTIME_MODEL_ID, help=f"MOSS-TTS-Realtime folder or hub id (default {REALTIME_MODEL_ID})")
    group.add_argument("--codec", default=CODEC_MODEL_ID, help=f"MOSS-Audio-Tokenizer folder or hub id (default {CODEC_MODEL_ID})")
    group.add_argument(
        "--tiny", action="store_true",
        help="use tiny random checkpoints made locally (offline trials, no GPU; the audio is not speech)",
    )
    add_device_options(group)
    group.add_argument("--slots", type=int, default=slots,
                       help=f"conversations served at once, 1 to {MAX_SLOTS} (default {slots})")
    group.add_argument("--voice", type=Path, default=None, help="reference speech whose voice the agent uses")
    group.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    group.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")
    group.add_argument("--max-seconds", type=float, default=None,
                       help=f"hard cap on one reply's audio, at most {MAX_REPLY_SECONDS:g} "
                            f"(default {DEFAULT_MAX_SECONDS:g}; {TINY_MAX_SECONDS:g} with --tiny)")
    group.add_argument("--min-seconds", type=float, default=None,
                       help="shortest reply audio: the model may not end a turn sooner "
                            f"(default 0; {TINY_MIN_SECONDS:g} with --tiny)")
    group.add_argument(
        "--compile", action="store_true",
        help="torch.compile the model step: about 2x faster on CPU after a one-off compile (20-60 s, cached on disk)",
    )
    _add_remote_engine_options(group)


def add_device_options(group: Any) -> None:
    """--device and --dtype (the realtime and the batch commands share them)."""
    group.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    group.add_argument("--dtype", default=None, choices=DTYPES,
                       help="bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)")


def check_device(device: str | None) -> None:
    """ConfigError unless ``device`` (``--device``) names a device this machine has; imports torch."""
    if device is None:
        return
    import torch

    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if target.type == "cpu":
        return
    if target.type != "cuda":
        raise ConfigError(f"--device {device!r}: moss-agent runs on cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"--device {device}: {why}; use --device cpu, or leave --device out")
    count = torch.cuda.device_count()
    if target.index is not None and target.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def check_url(url: str | None, option: str, schemes: tuple[str, ...] = ("http", "https"), example: str = LLM_URL_EXAMPLE) -> None:
    """ConfigError unless ``url`` is an absolute URL with one of ``schemes`` and a host."""
    if url is None:
        return
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        valid = parts.scheme in schemes and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number, or out of range
        valid = False
    if valid:
        return
    wanted = " or ".join(f"{scheme}://" for scheme in schemes)
    hint = ""
    if "://" not in url and url.strip():
        hint = f" (did you mean {schemes[0]}://{url.strip()}?)"
    raise ConfigError(f"{option} must be a URL starting with {wanted}, such as {example}; got {url!r}{hint}")


def check_engine_options(args: argparse.Namespace) -> None:
    """The engine options in their ranges and the device present, before anything loads."""
    if getattr(args, "engine_url", None):
        check_url(args.engine_url, "--engine-url", ("ws", "wss", "http", "https"), "ws://127.0.0.1:8000")
    else:
        check_device(args.device)
    if args.max_seconds is None:  # the tiny random model's replies are noise: keep them short
        args.max_seconds = TINY_MAX_SECONDS if getattr(args, "tiny", False) else DEFAULT_MAX_SECONDS
    if not 1 <= args.slots <= MAX_SLOTS:
        raise ConfigError(f"--slots must be from 1 to {MAX_SLOTS}, got {args.slots}")
    if not 0 < args.max_seconds <= MAX_REPLY_SECONDS:  # False for NaN too
        raise ConfigError(f"--max-seconds must be seconds in (0, {MAX_REPLY_SECONDS:g}], got {args.max_seconds}")
    min_frames(args)  # --min-seconds in [0, --max-seconds]
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}")
    waiting = getattr(args, "max_waiting", None)
    if waiting is not None and not 0 <= waiting <= MAX_WAITING:
        raise ConfigError(f"--max-waiting must be from 0 to {MAX_WAITING}, got {waiting}")
    if args.voice is not None:
        check_voice(args.voice)


def check_voice(path: Path) -> None:
    """--voice: a readable audio file of at most MAX_VOICE_SECONDS (read from its header)."""
    from moss_agent.audio import AudioTooLong, load_audio

    if not path.is_file():
        raise ConfigError(f"--voice {path} is not a file; give a recording of the voice (a wav of 5 to 20 s)")
    try:
        load_audio(path, 24000, max_seconds=MAX_VOICE_SECONDS)
    except AudioTooLong as exc:
        raise ConfigError(
            f"--voice {path} is {exc.seconds:.1f} s long; a voice prompt stays in every turn's context, so it "
            f"may be at most {MAX_VOICE_SECONDS:g} s (5 to 20 s of clean speech is best): cut it"
        ) from None


def check_llm_options(args: argparse.Namespace) -> None:
    """--llm-url and --stt-url are URLs, before anything connects."""
    check_url(getattr(args, "llm_url", None), "--llm-url")
    check_url(getattr(args, "stt_url", None), "--stt-url")


def _add_remote_engine_options(group: Any) -> None:
    """--engine-url: the engine of a speech server instead of models loaded here (moss_agent.client)."""
    group.add_argument(
        "--engine-url", default=None, metavar="URL",
        help="use the engine of a moss-agent speech server (ws://host:port) instead of loading models here; "
             "the model options above are then the server's business",
    )
    group.add_argument("--engine-token", default=None, help="the speech server's token (default: $MOSS_ENGINE_TOKEN)")
    group.add_argument("--engine-voice", default=None, metavar="NAME",
                       help="a voice registered on the speech server (with --engine-url; --voice uploads a file)")


def build_remote_engine(args: argparse.Namespace) -> Any:
    """A RemoteSpeechBackend for ``--engine-url`` (connects on ``start()`` / ``async with``)."""
    from moss_agent.client import RemoteSpeechBackend

    token = args.engine_token or os.environ.get("MOSS_ENGINE_TOKEN")
    return RemoteSpeechBackend(args.engine_url, token=token, voice=args.engine_voice)


def add_llm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("language model (any OpenAI-compatible endpoint)")
    group.add_argument("--llm-url", default=None,
                       help="chat-completions base URL, e.g. http://127.0.0.1:8000/v1; without it an offline "
                            "echo responder (not a language model) repeats what it heard")
    group.add_argument("--llm-model", default=None,
                       help="model name the server expects (default: the one model the server lists at "
                            "URL/models; a server that lists several needs it)")
    group.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY, else none)")
    group.add_argument("--system-prompt", default=None, help="system prompt of the LLM (default: a brief assistant)")


def add_stt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speech recognition")
    group.add_argument("--stt-url", default=None,
                       help="OpenAI-compatible transcription base URL (e.g. a Whisper server); "
                            "default: offline pocketsphinx (English, rough on free speech)")
    group.add_argument("--stt-model", default="whisper-1", help="transcription model name")


# The untrained tiny models may end a turn on its first frame; --tiny speaks at least this long
# (--min-seconds overrides it), so the demo always gives audio.
TINY_MIN_SECONDS = 1.0
DEFAULT_MAX_SECONDS = 60.0
TINY_MAX_SECONDS = 8.0
FRAME_SECONDS = 0.08  # one codec frame (12.5 Hz)


def min_frames(args: argparse.Namespace) -> int:
    """Codec frames of ``--min-seconds`` (default: TINY_MIN_SECONDS with ``--tiny``, else 0);
    ConfigError for a value that is negative, not a number, or above ``--max-seconds``."""
    from moss_agent.errors import ConfigError

    seconds = getattr(args, "min_seconds", None)
    if seconds is None:
        return round(TINY_MIN_SECONDS / FRAME_SECONDS) if getattr(args, "tiny", False) else 0
    longest = getattr(args, "max_seconds", None)
    if not 0 <= seconds < float("inf"):  # False for NaN too
        raise ConfigError(f"--min-seconds must be seconds >= 0, got {seconds}")
    if longest is not None and seconds > longest:
        raise ConfigError(f"--min-seconds {seconds:g} is longer than --max-seconds {longest:g}")
    return round(seconds / FRAME_SECONDS)


def ensure_tiny_checkpoints(folder: Path | None = None) -> tuple[Path, Path]:
    """Make (once) and return the tiny random realtime model and codec folders."""
    from moss_agent.models.codec.tiny import save_tiny_codec
    from moss_agent.models.realtime.tiny import save_tiny_realtime

    root = folder or cache_dir() / "tiny"
    model_dir, codec_dir = root / "realtime", root / "codec"
    if not (model_dir / "config.json").is_file():
        save_tiny_realtime(model_dir, seed=0)
    if not (codec_dir / "config.json").is_file():
        save_tiny_codec(codec_dir, seed=0, num_quantizers=16, codebook_size=1024)
    return model_dir, codec_dir


def ensure_tiny_batch_checkpoint(folder: Path | None = None) -> Path:
    """Make (once) and return a tiny random Delay model matching the tiny codec (16 codebooks of
    1024 codes) whose text channel follows the real script, so it produces (noise) audio."""
    import shutil
    import tempfile

    from moss_agent.models.delay.tiny import save_tiny_delay

    model_dir = (folder or cache_dir() / "tiny") / "delay16"
    if not (model_dir / "config.json").is_file():
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: an interrupted write never looks like a checkpoint.
        staging = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=".delay16-"))
        save_tiny_delay(staging, n_vq=16, seed=0, scripted_frames=25)
        try:
            staging.rename(model_dir)
        except OSError:  # made meanwhile by another process
            shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def build_engine(args: argparse.Namespace) -> Any:
    """A RealtimeEngine from the engine options (loads weights: call off the event loop), or with
    ``--engine-url`` a RemoteSpeechBackend on a speech server's engine. ``args.max_waiting``
    (``--max-waiting``, where a command has it): the engine's queue of conversations waiting for a
    slot (default: the engine's)."""
    if getattr(args, "engine_url", None):
        return build_remote_engine(args)
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.realtime import SamplingConfig

    model, codec = args.model, args.codec
    check_engine_options(args)
    shortest = min_frames(args)
    if args.tiny:
        print(untrained_notice(args), file=sys.stderr)
        model, codec = ensure_tiny_checkpoints()
    if args.compile:
        print("compiling the model step as the engine starts: about a minute the first time, "
              "seconds once torch has cached it", file=sys.stderr)
    config = RealtimeEngineConfig(
        num_slots=args.slots,
        max_frames_per_turn=max(1, round(args.max_seconds / 0.08)),
        sampling=SamplingConfig(greedy=args.greedy, min_frames=shortest),
        seed=args.seed,
        compile=args.compile,
    )
    if getattr(args, "max_waiting", None) is not None:
        config = dataclasses.replace(config, max_waiting=args.max_waiting)
    return RealtimeEngine.load(model, codec, device=args.device, dtype=args.dtype, config=config)


def build_llm(args: argparse.Namespace) -> Any:
    from moss_agent.streaming.llm import EchoResponder, OpenAIChatLLM

    if not args.llm_url:
        return EchoResponder()
    check_llm_options(args)
    # Without --llm-model the server's only model is used (asked for once, at check() or the first turn).
    return OpenAIChatLLM(llm_config(args), model_from_server=not args.llm_model)


def llm_config(args: argparse.Namespace) -> LLMConfig:
    fields: dict[str, Any] = {
        "base_url": args.llm_url or LLMConfig.base_url,
        "model": args.llm_model or LLMConfig.model,
        "api_key": args.api_key or os.environ.get("OPENAI_API_KEY") or "not-needed",
    }
    return LLMConfig(**fields)


def session_config(args: argparse.Namespace, **fields: Any) -> SessionConfig:
    """A SessionConfig with the LLM's system prompt from ``--system-prompt``; ``fields`` set the rest."""
    if getattr(args, "system_prompt", None):
        fields.setdefault("system_prompt", args.system_prompt)
    return SessionConfig(**fields)


def build_stt(args: argparse.Namespace) -> Any:
    from moss_agent.speech.stt import OpenAITranscriber, PocketSphinxRecognizer

    if args.stt_url:
        check_url(args.stt_url, "--stt-url")
        api_key = getattr(args, "api_key", None) or os.environ.get("OPENAI_API_KEY") or "not-needed"
        return OpenAITranscriber(args.stt_url, api_key, model=args.stt_model)
    return PocketSphinxRecognizer()
