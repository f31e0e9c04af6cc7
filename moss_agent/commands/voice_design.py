"""``moss-agent voice-design``: speech in a voice described in words, with MOSS-VoiceGenerator."""

from __future__ import annotations

import argparse
from typing import Any

from moss_agent.commands import batch_common
from moss_agent.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "voice-design",
        help="speech in a voice described in words (MOSS-VoiceGenerator)",
        description="Synthesize TEXT in the voice that --instruction describes, with MOSS-VoiceGenerator.",
    )
    parser.add_argument("text", nargs="?", default=None, help="what to say ('-' reads standard input)")
    parser.add_argument(
        "--instruction",
        "-i",
        default=None,
        help='the voice, e.g. "a warm, slow elderly male voice with a slight rasp"',
    )
    batch_common.add_batch_options(parser, "voice_design")
    parser.set_defaults(handler=run)


def _single(args: argparse.Namespace) -> dict[str, Any]:
    if args.text is None or not args.instruction:
        raise ConfigError("give the TEXT and --instruction describing the voice, or --jsonl FILE")
    return {"text": batch_common.read_text(args.text), "instruction": args.instruction}


def run(args: argparse.Namespace) -> int:
    return batch_common.run_batch(args, "voice_design", _single)
