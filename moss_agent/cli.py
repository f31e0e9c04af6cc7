"""The ``moss-agent`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moss-agent", description="Realtime voice agents on the MOSS-TTS model family."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 0
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.error(f"unknown command {args.command}")
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
