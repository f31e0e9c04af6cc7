"""Subcommands of the ``moss-agent`` CLI; each module has ``add_parser(subparsers)``."""
