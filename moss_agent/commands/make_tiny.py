"""``moss-agent make-tiny``: write tiny random checkpoints in the official layouts, for offline trials."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

KINDS = ("realtime", "codec", "delay", "local")


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "make-tiny", help="write tiny random (untrained) checkpoints for offline trials and tests",
        description="Write small random checkpoints in the official Hugging Face layouts. They load "
        "through the same code as the real models but produce noise, not speech.",
    )
    parser.add_argument("folder", type=Path, help="output folder (one subfolder per model)")
    parser.add_argument("--kind", choices=(*KINDS, "all"), default="all", help="which model (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    kinds = KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        folder = args.folder / kind
        _WRITERS[kind](folder, args.seed)
        print(f"{kind}: {folder}")
    print("these random, untrained models make noise, not speech, and may end a turn at once: "
          "pass --min-seconds 1 (as --tiny does) to always get audio", file=sys.stderr)
    return 0


def _realtime(folder: Path, seed: int) -> None:
    from moss_agent.models.realtime.tiny import save_tiny_realtime

    save_tiny_realtime(folder, seed=seed)


def _codec(folder: Path, seed: int) -> None:
    from moss_agent.models.codec.tiny import save_tiny_codec

    save_tiny_codec(folder, seed=seed, num_quantizers=16, codebook_size=1024)


def _delay(folder: Path, seed: int) -> None:
    from moss_agent.models.delay import save_tiny_delay

    save_tiny_delay(folder, seed=seed)


def _local(folder: Path, seed: int) -> None:
    from moss_agent.models.local import save_tiny_local

    save_tiny_local(folder, seed=seed)


_WRITERS = {"realtime": _realtime, "codec": _codec, "delay": _delay, "local": _local}
