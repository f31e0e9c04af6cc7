"""The ``moss-agent`` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from moss_agent.errors import MossError

# Subcommand modules under moss_agent.commands, imported lazily so `--help` stays fast.
COMMANDS = ("bench", "reply", "say", "tts", "dialogue", "voice_design", "sfx", "chat", "serve", "mqtt_worker", "make_tiny")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moss-agent", description="Realtime voice agents and speech generation on the MOSS-TTS model family."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail and per-turn latency")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moss_agent.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except MossError as exc:
        print(f"moss-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
