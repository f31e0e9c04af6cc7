"""LocalAudio on a real PortAudio device: the JACK dummy backend, a real-time clock with no sound card.

The test starts its own ``jackd -d dummy`` under a unique server name and wires our speaker port to
our microphone port, so what the output plays comes back through the input.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from jack_audio import jack_connect, jack_dummy, jack_env, jack_environment
from system_requirements import PORTAUDIO, requires
from transport_signals import RATE, tone_chunks, windows_dominated_by

from moss_agent.errors import TransportError
from moss_agent.transports.local import LocalAudio, list_devices

# find_spec, not importorskip: importing sounddevice without PortAudio raises OSError.
if importlib.util.find_spec("sounddevice") is None:
    pytest.skip("the [local] extra (sounddevice) is not installed", allow_module_level=True)
pytestmark = requires(PORTAUDIO)

HEARD_WINDOWS = 8  # 0.1 s windows of the tone heard before the test stops listening


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
            if windows_dominated_by(np.concatenate(heard), RATE, 600.0) >= HEARD_WINDOWS:
                break
        audio.output.clear()
        await player  # the rest of turn 4 is stale now and dropped without waiting
        played = audio.output.played_s(4)
    # Everything heard was played first. The heard windows may include a partly filled one at each
    # end of the tone, so at least HEARD_WINDOWS - 2 full windows of it came back; clear() dropped the rest.
    assert (HEARD_WINDOWS - 2) * 0.1 <= played < 3.0
    assert progress and progress[-1][0] == 4


async def test_device_selection_errors_are_clear(jack_server: str) -> None:
    with pytest.raises(TransportError, match="no input device named like 'no-such-mic'"):
        LocalAudio(input_device="no-such-mic", use_output=False)
    with pytest.raises(TransportError, match="no output device with index 42"):
        LocalAudio(output_device=42, use_input=False)
    with pytest.raises(TransportError, match="no output device with index 42"):
        LocalAudio(output_device="42", use_input=False)  # digits, as typed on a command line


async def test_no_device_at_all_is_a_transport_error() -> None:
    with jack_environment(f"moss-absent-{uuid.uuid4().hex[:6]}"):
        if list_devices():
            pytest.skip("this machine has real audio devices")
        with pytest.raises(TransportError, match="no input audio device found"):
            LocalAudio()


def test_say_play_needs_only_a_speaker(tmp_path: Path, tiny_realtime_dir: Path, tiny_codec_dir: Path) -> None:
    """`say --play` on a sound card without any capture port: it opens the speaker alone and plays
    the whole reply (a microphone opened too would fail: there is none)."""
    tiny = tmp_path / "cache" / "tiny"
    tiny.mkdir(parents=True)
    (tiny / "realtime").symlink_to(tiny_realtime_dir)
    (tiny / "codec").symlink_to(tiny_codec_dir)
    with jack_dummy(tmp_path, "-C", "0") as server:
        devices = list_devices()
        assert devices and not any(d["max_input_channels"] for d in devices)  # output only
        proc = subprocess.run(
            [sys.executable, "-m", "moss_agent.cli", "say", "Hello there.", "--play", "--tiny", "--max-seconds", "1.2"],
            env={**jack_env(server), "MOSS_AGENT_CACHE": str(tmp_path / "cache")},
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    played = re.search(r"played ([\d.]+) s", proc.stdout)
    assert played and float(played.group(1)) >= 0.95, proc.stdout  # at least the --tiny 1 s (12 frames)
    assert "input" not in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr
