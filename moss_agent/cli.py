"""The ``moss-agent`` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from moss_agent.errors import CheckpointError, MossError

# Subcommand modules under moss_agent.commands, imported lazily so `--help` stays fast.
COMMANDS = ("bench", "reply", "say", "tts", "dialogue", "voice_design", "sfx", "chat", "serve", "speech_server", "mqtt_worker", "make_tiny")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options that work before or after the subcommand (`moss-agent -v reply ...` = `moss-agent reply ... -v`).

    On subcommands the defaults are suppressed, so an option given before the subcommand is not
    overwritten by the subcommand parser's default.
    """
    group = parser.add_argument_group("global options")
    default: dict[str, object] = {"default": argparse.SUPPRESS} if suppress else {}
    group.add_argument("-v", "--verbose", action="store_true", help="log more detail and per-turn latency", **default)
    group.add_argument(
        "--log-level", choices=LOG_LEVELS, help="logging level (default: info with -v, else warning)", **default
    )


def build_parser() -> argparse.ArgumentParser:
    from moss_agent import __version__

    parser = argparse.ArgumentParser(
        prog="moss-agent", description="Realtime voice agents and speech generation on the MOSS-TTS model family."
    )
    parser.add_argument("--version", action="version", version=f"moss-agent {__version__}")
    _add_global_options(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moss_agent.commands.{name}").add_parser(subparsers)
    for subparser in subparsers.choices.values():
        _add_global_options(subparser, suppress=True)
    return parser


def _log_level(args: argparse.Namespace) -> int:
    if args.log_level is not None:
        return int(getattr(logging, args.log_level.upper()))
    return logging.INFO if args.verbose else logging.WARNING


def _checkpoint_option(args: argparse.Namespace, source: str | None) -> str | None:
    """The option that named the checkpoint ``source`` (the same id or folder), so an error can say
    what to pass it. Commands whose options are not --model and --codec set_defaults(checkpoint_options=...)."""
    if source is None:
        return None
    matches = []
    for option in getattr(args, "checkpoint_options", ("--model", "--codec")):
        given = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if isinstance(given, str | Path) and (
            str(given) == source or Path(given).expanduser().resolve() == Path(source).expanduser().resolve()
        ):
            matches.append(option)
    return matches[0] if len(matches) == 1 else None  # the same folder for both: the message names the model


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=_log_level(args), format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        from moss_agent.commands.common import check_args

        check_args(args)  # the shared options, before the command loads anything
        return int(args.handler(args) or 0)
    except MossError as exc:
        # One line, no traceback: the message says what was wrong and what to do.
        logging.getLogger(__name__).debug("command failed", exc_info=True)
        message = exc.worded(exc.option or _checkpoint_option(args, exc.source)) if isinstance(exc, CheckpointError) else str(exc)
        print(f"moss-agent {args.command}: error: {' '.join(message.splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
