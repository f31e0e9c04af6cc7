"""``moss-agent sfx``: a sound effect or ambience from a description, with MOSS-SoundEffect."""

from __future__ import annotations

import argparse
from typing import Any

from moss_agent.commands import batch_common
from moss_agent.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "sfx",
        help="a sound effect from a description (MOSS-SoundEffect)",
        description="Generate the sound DESCRIPTION describes with MOSS-SoundEffect.",
    )
    parser.add_argument(
        "description", nargs="?", default=None, help='e.g. "rain on a tin roof, distant thunder"'
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="target length in seconds (a hint, at most 600)"
    )
    batch_common.add_batch_options(parser, "sfx")
    parser.set_defaults(handler=run)


def _single(args: argparse.Namespace) -> dict[str, Any]:
    if args.description is None:
        raise ConfigError("give the DESCRIPTION of the sound, or --jsonl FILE")
    return {"description": args.description, "duration_s": args.duration}


def run(args: argparse.Namespace) -> int:
    return batch_common.run_batch(args, "sfx", _single)
