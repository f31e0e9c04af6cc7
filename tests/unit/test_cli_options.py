"""Global options of ``moss-agent`` work before or after the subcommand."""

from __future__ import annotations

import pytest

from moss_agent.cli import build_parser

REPLY = ["reply", "--tiny", "-i", "in.wav", "-o", "out.wav"]


@pytest.mark.parametrize(
    ("argv", "verbose", "log_level"),
    [
        (REPLY, False, None),
        (["-v", *REPLY], True, None),
        ([*REPLY, "-v"], True, None),
        ([*REPLY, "--verbose"], True, None),
        (["--log-level", "debug", *REPLY], False, "debug"),
        ([*REPLY, "--log-level", "error"], False, "error"),
        (["-v", *REPLY, "--log-level", "warning"], True, "warning"),
    ],
)
def test_global_options_anywhere(argv: list[str], verbose: bool, log_level: str | None) -> None:
    args = build_parser().parse_args(argv)
    assert (args.command, args.verbose, args.log_level) == ("reply", verbose, log_level)


def test_every_subcommand_takes_the_global_options() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in subparsers.choices.items():  # type: ignore[union-attr]
        options = {option for action in subparser._actions for option in action.option_strings}
        assert {"-v", "--verbose", "--log-level"} <= options, name


def test_a_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*REPLY, "--log-level", "loud"])
    assert exit_info.value.code == 2
    assert "--log-level" in capsys.readouterr().err
