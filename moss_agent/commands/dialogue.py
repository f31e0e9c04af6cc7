"""``moss-agent dialogue``: a multi-speaker dialogue with MOSS-TTSD, to wav files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moss_agent.commands import batch_common
from moss_agent.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "dialogue",
        help="a multi-speaker dialogue with MOSS-TTSD",
        description="Synthesize SCRIPT, a dialogue whose turns start with [S1] .. [S5], with MOSS-TTSD. "
        "With --reference clips (one per speaker, in order) the script must begin with what the clips "
        "say, as in '[S1] transcript one [S2] transcript two [S1] new text ...', and only the turns "
        "after them are spoken; with --clone-only the clips give the voices and every turn is spoken.",
    )
    parser.add_argument(
        "script", nargs="?", default=None, help="the tagged script ('-' reads standard input)"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        action="append",
        default=None,
        help="a speaker's voice, repeat for S1, S2, ... (clones the voices)",
    )
    parser.add_argument(
        "--clone-only",
        action="store_true",
        help="use the references as voices only: the script does not start with their transcripts, "
        "and all of it is spoken",
    )
    parser.add_argument("--normalize", action="store_true", help="apply the TTSD script clean-up first")
    batch_common.add_batch_options(parser, "dialogue")
    parser.set_defaults(handler=run)


def _single(args: argparse.Namespace) -> dict[str, Any]:
    if args.script is None:
        raise ConfigError("give the SCRIPT, or --jsonl FILE")
    return {
        "script": batch_common.read_text(args.script),
        "references": [str(p) for p in args.reference or []],
        "continue_from_references": not args.clone_only,
        "normalize": args.normalize,
    }


def run(args: argparse.Namespace) -> int:
    return batch_common.run_batch(args, "dialogue", _single)
