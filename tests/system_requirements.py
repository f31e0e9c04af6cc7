"""The system (Debian) packages some tests need, how to find each, and a skip that says what to install.

``./scripts/install.sh`` installs all of them; a user who skipped that step gets skips, never
collection errors, each naming the package and the command. Tests check a requirement with
``requires(...)`` (a skipif marker) or ``require(...)`` (a skip inside a test, a fixture or a helper).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["CHROMIUM", "ESPEAK_NG", "JACK", "MOSQUITTO", "PORTAUDIO", "find_binary", "require", "requires"]


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in the sbin folders an ordinary user's PATH may lack (mosquitto is there)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


@dataclass(frozen=True)
class SystemRequirement:
    what: str  # what the tests use, in words
    package: str  # the Debian package that provides it
    locate: Callable[[], str | None] = field(repr=False)  # its path, or None when missing

    @functools.cached_property
    def path(self) -> str | None:
        return self.locate()

    @property
    def available(self) -> bool:
        return self.path is not None

    @property
    def reason(self) -> str:
        return (
            f"{self.what}: not found; install the Debian package {self.package} "
            f"(./scripts/install.sh, or apt-get install {self.package})"
        )


def _all_binaries(*names: str) -> Callable[[], str | None]:
    """The first binary's path when every one of ``names`` is found."""

    def locate() -> str | None:
        paths = [find_binary(name) for name in names]
        return paths[0] if all(paths) else None

    return locate


def _portaudio() -> str | None:
    # What sounddevice does on import: find the library, then load it (a stale ld.so.cache entry
    # for a removed file is found but does not load).
    name = ctypes.util.find_library("portaudio")
    if name is None:
        return None
    try:
        ctypes.CDLL(name)
    except OSError:
        return None
    return name


def _chromium() -> str | None:
    real = Path("/usr/lib/chromium/chromium")  # the Debian wrapper script adds flags we do not want
    if real.is_file() and os.access(real, os.X_OK):
        return str(real)
    return find_binary("chromium") or find_binary("chromium-browser")


PORTAUDIO = SystemRequirement("the PortAudio library (sounddevice loads it)", "libportaudio2", _portaudio)
JACK = SystemRequirement(
    "the JACK server and tools (jackd, jack_wait, jack_connect, jack_lsp)",
    "jackd2",
    _all_binaries("jackd", "jack_wait", "jack_connect", "jack_lsp"),
)
MOSQUITTO = SystemRequirement(
    "the mosquitto broker (mosquitto, mosquitto_passwd)", "mosquitto", _all_binaries("mosquitto", "mosquitto_passwd")
)
CHROMIUM = SystemRequirement("headless Chromium", "chromium", _chromium)
ESPEAK_NG = SystemRequirement("the espeak-ng speech synthesizer", "espeak-ng", _all_binaries("espeak-ng"))


def _missing(requirements: tuple[SystemRequirement, ...]) -> str | None:
    reasons = [requirement.reason for requirement in requirements if not requirement.available]
    return "; ".join(reasons) or None


def requires(*requirements: SystemRequirement) -> pytest.MarkDecorator:
    """A marker that skips the test (or, as ``pytestmark``, the module) when a requirement is missing."""
    reason = _missing(requirements)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def require(*requirements: SystemRequirement) -> None:
    """Skip the running test now when a requirement is missing."""
    reason = _missing(requirements)
    if reason is not None:
        pytest.skip(reason)


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Stop a server a test started: SIGTERM, then SIGKILL if it has not exited within 5 s."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
