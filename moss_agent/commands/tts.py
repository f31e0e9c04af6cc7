"""``moss-agent tts``: speech from text with MOSS-TTS (optionally in a cloned voice), to wav files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moss_agent.commands import batch_common
from moss_agent.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "tts",
        help="speech from text with MOSS-TTS (batch, any length)",
        description="Synthesize TEXT (or every line of --jsonl) with MOSS-TTS. Long texts are split at "
        "sentence ends, generated in batches and joined.",
    )
    parser.add_argument("text", nargs="?", default=None, help="what to say ('-' reads standard input)")
    parser.add_argument("--reference", type=Path, default=None, help="speech whose voice is cloned")
    parser.add_argument("--language", default=None, help='the text\'s language, e.g. "English", "Chinese"')
    parser.add_argument(
        "--tokens", type=int, default=None, help="target length in 12.5 Hz frames, 1 to 7500 (a hint)"
    )
    batch_common.add_batch_options(parser, "tts")
    parser.set_defaults(handler=run)


def _single(args: argparse.Namespace) -> dict[str, Any]:
    if args.text is None:
        raise ConfigError("give the TEXT to say, or --jsonl FILE")
    item: dict[str, Any] = {
        "text": batch_common.read_text(args.text),
        "language": args.language,
        "tokens": args.tokens,
    }
    if args.reference is not None:
        item["reference"] = str(args.reference)
    return item


def run(args: argparse.Namespace) -> int:
    return batch_common.run_batch(args, "tts", _single)
