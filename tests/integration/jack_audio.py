"""A private JACK dummy server per test, with PortAudio and the JACK tools pointed at it.

The server runs under a unique name (``jackd -n``), so another JACK server on the machine (a
user's own, or a test running at the same time) is never touched: PortAudio, jack_wait and
jack_connect find ours through ``JACK_DEFAULT_SERVER``. Importing this module needs neither
sounddevice nor PortAudio; the fixture skips, naming the package, when one is missing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from system_requirements import JACK, PORTAUDIO, require, stop_process

_JACK_VARIABLES = ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")


def _set_environment_and_rescan(env: dict[str, str | None]) -> None:
    """PortAudio reads the JACK server name when it initialises: set it, then initialise again."""
    import sounddevice as sd

    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sd._terminate()
    sd._initialize()


@contextlib.contextmanager
def jack_environment(server: str) -> Iterator[None]:
    """PortAudio and child processes use JACK server ``server`` (and never start one) inside."""
    saved = {key: os.environ.get(key) for key in _JACK_VARIABLES}
    _set_environment_and_rescan({"JACK_DEFAULT_SERVER": server, "JACK_NO_START_SERVER": "1"})
    try:
        yield
    finally:
        _set_environment_and_rescan(saved)


def jack_env(server: str) -> dict[str, str]:
    """The environment of a child process (jackd's tools, a command under test) using JACK server ``server``."""
    return {**os.environ, "JACK_DEFAULT_SERVER": server, "JACK_NO_START_SERVER": "1"}


@pytest.fixture
def jack_server(tmp_path: Path) -> Iterator[str]:
    """The name of a fresh ``jackd -d dummy`` (48 kHz, 10 ms periods) that PortAudio is pointed at."""
    with jack_dummy(tmp_path) as name:
        yield name


@contextlib.contextmanager
def jack_dummy(tmp_path: Path, *driver_options: str) -> Iterator[str]:
    """Run a ``jackd -d dummy`` (48 kHz, 10 ms periods, then ``driver_options``, e.g. ``-C 0`` for a
    card with no capture ports) with PortAudio pointed at it inside; yields the server's name."""
    require(JACK, PORTAUDIO)
    pytest.importorskip("sounddevice", reason="the [local] extra (sounddevice) is not installed")
    assert JACK.path is not None
    name = f"moss-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / f"jackd-{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [JACK.path, "-n", name, "-d", "dummy", "-r", "48000", "-p", "480", *driver_options],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=jack_env(name),
        )
    try:
        wait = ["jack_wait", "-s", name, "-w", "-t", "10"]
        ready = subprocess.run(wait, env=jack_env(name), capture_output=True, timeout=15)
        if ready.returncode != 0 or proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-500:]
            pytest.skip(f"jackd -n {name} -d dummy did not start on this machine (exit {proc.poll()}): {tail}")
        with jack_environment(name):
            yield name
    finally:
        stop_process(proc)


def jack_connect(server: str, source: str, destination: str) -> None:
    """Connect two ports on JACK server ``server``."""
    subprocess.run(["jack_connect", source, destination], env=jack_env(server), check=True, capture_output=True, timeout=10)
