"""LocalAudio on a real PortAudio device: the JACK dummy backend, a real-time clock with no sound card.

The test starts its own ``jackd -d dummy`` under a unique server name and wires our speaker port to
our microphone port, so what the output plays comes back through the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("sounddevice")

import sounddevice as sd
from transport_signals import RATE, tone_chunks, windows_dominated_by

from moss_agent.errors import TransportError
from moss_agent.transports.local import LocalAudio, list_devices

JACKD = shutil.which("jackd")
JACK_TOOLS = all(shutil.which(tool) for tool in ("jack_wait", "jack_connect"))
pytestmark = pytest.mark.skipif(
    JACKD is None or not JACK_TOOLS, reason="jackd, jack_wait or jack_connect missing (Debian: apt-get install jackd2)"
)


def _rescan(env: dict[str, str | None]) -> None:
    """Point PortAudio at another JACK server: it reads the environment when it initialises."""
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sd._terminate()
    sd._initialize()


@contextlib.contextmanager
def jack_environment(server: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in ("JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER")}
    _rescan({"JACK_DEFAULT_SERVER": server, "JACK_NO_START_SERVER": "1"})
    try:
        yield
    finally:
        _rescan(saved)


@pytest.fixture
def jack_server() -> Iterator[str]:
    assert JACKD is not None
    name = f"moss-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "JACK_NO_START_SERVER": "1"}
    proc = subprocess.Popen(
        [JACKD, "-n", name, "-d", "dummy", "-r", "48000", "-p", "480"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        ready = subprocess.run(["jack_wait", "-s", name, "-w", "-t", "10"], env=env, capture_output=True, timeout=15)
        if ready.returncode != 0 or proc.poll() is not None:
            pytest.skip(f"jackd -d dummy did not start here (exit {proc.poll()})")
        with jack_environment(name):
            yield name
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def jack_connect(server: str, source: str, destination: str) -> None:
    env = {**os.environ, "JACK_DEFAULT_SERVER": server, "JACK_NO_START_SERVER": "1"}
    subprocess.run(["jack_connect", source, destination], env=env, check=True, capture_output=True, timeout=10)


async def test_speaker_output_comes_back_through_the_microphone(jack_server: str) -> None:
    progress: list[tuple[int, float]] = []
    async with asyncio.timeout(20), LocalAudio(input_device="system", output_device=0, sample_rate=RATE) as audio:
        assert audio.output.play_rate == 48_000  # the device's native rate ...
        assert audio.output.sample_rate == RATE  # ... while we write at ours
        audio.output.on_progress(lambda turn, seconds: progress.append((turn, seconds)))
        await asyncio.to_thread(jack_connect, jack_server, "PortAudio:out_0", "PortAudio:in_0")

        async def play() -> None:
            for chunk in tone_chunks(600.0, 3.0, RATE, turn_id=4):
                await audio.output.write(chunk)

        player = asyncio.create_task(play())
        heard: list[np.ndarray] = []
        async for chunk in audio.input:
            assert chunk.sample_rate == RATE
            heard.append(chunk.pcm)
            if windows_dominated_by(np.concatenate(heard), RATE, 600.0) >= 8:
                break
        audio.output.clear()
        await player  # the rest of turn 4 is stale now and dropped without waiting
        played = audio.output.played_s(4)
    assert 0.8 <= played < 3.0
    assert progress and progress[-1][0] == 4


async def test_device_selection_errors_are_clear(jack_server: str) -> None:
    with pytest.raises(TransportError, match="no input device named like 'no-such-mic'"):
        LocalAudio(input_device="no-such-mic", use_output=False)
    with pytest.raises(TransportError, match="no output device with index 42"):
        LocalAudio(output_device=42, use_input=False)


async def test_no_device_at_all_is_a_transport_error() -> None:
    with jack_environment(f"moss-absent-{uuid.uuid4().hex[:6]}"):
        if list_devices():
            pytest.skip("this machine has real audio devices")
        with pytest.raises(TransportError, match="no input audio device found"):
            LocalAudio()
