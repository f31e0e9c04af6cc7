"""Every command docs/mqtt.md, docs/mosquitto/ and the device example show is accepted by the real parsers.

The commands are read from the pages as a person would copy them (environment assignments, line
continuations and redirections included) and parsed in process by the argparse parser of the
program they run, so a renamed or removed flag fails here instead of in a user's terminal.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from moss_agent.cli import build_parser as cli_parser
from moss_agent.transports import mqtt_acl, mqtt_process

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mqtt_device.py"
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _example_parser() -> Callable[[list[str]], argparse.Namespace]:
    spec = importlib.util.spec_from_file_location("example_mqtt_device_docs", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse: Callable[[list[str]], argparse.Namespace] = module.parse_args
    return parse


# How each documented program is invoked -> the parser it really uses.
PROGRAMS: dict[tuple[str, ...], Callable[[list[str]], object]] = {
    ("moss-agent",): lambda argv: cli_parser().parse_args(argv),
    ("python", "-m", "moss_agent.transports.mqtt"): lambda argv: mqtt_process.build_parser().parse_args(argv),
    ("python", "-m", "moss_agent.transports.mqtt_acl"): lambda argv: mqtt_acl.build_parser().parse_args(argv),
    ("python", "examples/mqtt_device.py"): lambda argv: _example_parser()(argv),
}


def shell_commands(text: str) -> list[list[str]]:
    """Commands of the programs above in ``text``: continuations joined, leading ``VAR=...`` and
    trailing redirections dropped. Lines that start no known program are ignored."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        line = line.strip().lstrip("#").strip().strip("`")
        if not line:
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        while words and _ENV.match(words[0]):
            words = words[1:]
        for cut, word in enumerate(words):
            if word in ("<", ">", "|"):
                words = words[:cut]
                break
        if any(tuple(words[: len(program)]) == program for program in PROGRAMS):
            commands.append(words)
    return commands


def documented_commands() -> list[tuple[str, list[str]]]:
    sources = {
        "docs/mqtt.md": (REPO / "docs" / "mqtt.md").read_text(),
        "docs/mosquitto/mosquitto.conf": (REPO / "docs" / "mosquitto" / "mosquitto.conf").read_text(),
        "examples/mqtt_device.py": ast.get_docstring(ast.parse(EXAMPLE.read_text())) or "",
        "moss_agent/transports/mqtt_acl.py": mqtt_acl.__doc__ or "",
    }
    return [(source, words) for source, text in sources.items() for words in shell_commands(text)]


def test_the_pages_show_each_program() -> None:
    shown = {program for program in PROGRAMS for _, words in documented_commands() if tuple(words[: len(program)]) == program}
    assert shown == set(PROGRAMS), f"not documented: {set(PROGRAMS) - shown}"
    assert any(words[:2] == ["moss-agent", "mqtt-worker"] for _, words in documented_commands())


@pytest.mark.parametrize(("source", "words"), documented_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_a_documented_command_is_accepted_by_its_parser(
    source: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    program = next(p for p in PROGRAMS if tuple(words[: len(p)]) == p)
    try:
        PROGRAMS[program](words[len(program) :])
    except SystemExit:
        pytest.fail(f"{source}: {' '.join(words)!r} is refused: {capsys.readouterr().err.strip()}")


def test_the_checker_catches_a_flag_the_cli_does_not_have() -> None:
    [words] = shell_commands("MOSS_MQTT_PASSWORD=x moss-agent mqtt-worker --host h \\\n    --port 1")
    assert words == ["moss-agent", "mqtt-worker", "--host", "h", "--port", "1"]
    with pytest.raises(SystemExit):
        PROGRAMS[("moss-agent",)](words[1:])


def test_the_limit_flags_default_to_mqtt_limits_and_reach_the_worker(capsys: pytest.CaptureFixture[str]) -> None:
    from moss_agent.cli import main
    from moss_agent.transports.mqtt import MqttLimits

    args = cli_parser().parse_args(["mqtt-worker"])
    assert mqtt_process.limits_from_args(args) == MqttLimits()
    args = mqtt_process.build_parser().parse_args(["--handler", "m:f", "--idle-timeout", "2.5", "--max-queued-audio", "7"])
    assert mqtt_process.limits_from_args(args) == MqttLimits(session_idle_s=2.5, max_queued_audio=7)
    # A bad limit is refused before any model loads (this would take seconds otherwise).
    assert main(["mqtt-worker", "--tiny", "--idle-timeout", "0"]) == 2
    assert "--idle-timeout must be positive, got 0.0" in capsys.readouterr().err
