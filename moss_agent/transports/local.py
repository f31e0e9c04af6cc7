"""Local microphone and speaker through PortAudio (sounddevice, the ``[local]`` extra).

Both devices open at their native sample rate (hard-coded rates are the commonest cause of "Invalid
sample rate" failures) and audio is resampled in software: the microphone to ``sample_rate`` for
``input``, agent audio to the speaker's rate inside ``output`` (a PlaybackBuffer the sound card's
callback pulls from, so the card's clock paces playback).

    async with LocalAudio(input_device="USB", output_device=3) as audio:
        async for chunk in audio.input: ...
        await audio.output.write(chunk)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from moss_agent._optional import require
from moss_agent.errors import ConfigError, TransportError
from moss_agent.transports.capture import QueueAudioInput
from moss_agent.transports.playback import PlaybackBuffer

logger = logging.getLogger(__name__)

DeviceSpec = int | str | None
"""A device index, a (case-insensitive) part of its name, or None for the system default."""


def _sounddevice() -> Any:
    try:
        return require("sounddevice", "local")
    except OSError as exc:  # the package is installed; the PortAudio library it loads is not
        raise TransportError(
            "the PortAudio library is missing (sounddevice needs it); install it with: "
            "sudo apt-get install libportaudio2 (Debian, Ubuntu), or brew install portaudio (macOS)"
        ) from exc


def list_devices() -> list[dict[str, Any]]:
    """Every PortAudio device: index, name, input/output channels, native rate, host API."""
    sd = _sounddevice()
    hostapis = sd.query_hostapis()
    return [
        {
            "index": d["index"],
            "name": d["name"],
            "max_input_channels": d["max_input_channels"],
            "max_output_channels": d["max_output_channels"],
            "default_samplerate": d["default_samplerate"],
            "hostapi": hostapis[d["hostapi"]]["name"],
        }
        for d in sd.query_devices()
    ]


def resolve_device(spec: DeviceSpec, kind: str) -> dict[str, Any]:
    """The device dict for ``spec`` that can do ``kind`` ('input' or 'output'); TransportError if none.

    ``spec``: None (the default device), an index, or a name; a string of digits is an index, as
    typed on a command line.
    """
    if kind not in ("input", "output"):
        raise ConfigError(f"kind must be 'input' or 'output', got {kind!r}")
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec)
    sd = _sounddevice()
    channels_key = f"max_{kind}_channels"
    devices = [d for d in list_devices() if d[channels_key] > 0]
    available = ", ".join(f"{d['index']}: {d['name']}" for d in devices) or "none"
    if not devices:
        raise TransportError(
            f"no {kind} audio device found: PortAudio sees none (list them with: python -m sounddevice); "
            "connect one, or start the sound server (PulseAudio, PipeWire, JACK)"
        )
    if spec is None:
        default = sd.default.device[0 if kind == "input" else 1]
        chosen = next((d for d in devices if d["index"] == default), devices[0])
    elif isinstance(spec, int) and not isinstance(spec, bool):
        by_index = [d for d in devices if d["index"] == spec]
        if not by_index:
            raise TransportError(f"no {kind} device with index {spec}; {kind} devices are: {available}")
        chosen = by_index[0]
    elif isinstance(spec, str):
        exact = [d for d in devices if d["name"].lower() == spec.lower()]
        partial = [d for d in devices if spec.lower() in d["name"].lower()]
        matches = exact or partial
        if not matches:
            raise TransportError(f"no {kind} device named like {spec!r}; {kind} devices are: {available}")
        if len(matches) > 1:
            names = ", ".join(f"{d['index']}: {d['name']}" for d in matches)
            raise TransportError(f"{spec!r} matches several {kind} devices ({names}); give an index or a longer name")
        chosen = matches[0]
    else:
        raise ConfigError(f"a device is an index, a name or None, got {spec!r}")
    return chosen


class LocalAudio:
    """Microphone as ``input`` (AudioInput at ``sample_rate``), speaker as ``output`` (AudioOutput)."""

    def __init__(
        self,
        *,
        input_device: DeviceSpec = None,
        output_device: DeviceSpec = None,
        sample_rate: int = 24_000,
        use_input: bool = True,
        use_output: bool = True,
        block_s: float = 0.02,
        max_buffer_s: float = 1.0,
    ) -> None:
        """Raises TransportError now if a requested device does not exist."""
        if not (use_input or use_output):
            raise ConfigError("LocalAudio needs at least one of use_input / use_output")
        if block_s <= 0:
            raise ConfigError(f"block_s must be positive, got {block_s}")
        self._block_s = block_s
        self.sample_rate = sample_rate
        # Resolved now, so a missing device fails at construction and the buffers know the rates.
        self.input_device = resolve_device(input_device, "input") if use_input else None
        self.output_device = resolve_device(output_device, "output") if use_output else None
        self.input = QueueAudioInput(sample_rate)
        """The microphone as an AudioInput of ``sample_rate`` chunks."""
        play_rate = int(self.output_device["default_samplerate"]) if self.output_device else sample_rate
        self.output = PlaybackBuffer(play_rate, sample_rate=sample_rate, max_buffer_s=max_buffer_s)
        """The speaker as an AudioOutput: write at ``sample_rate`` (or any rate); plays at the device's."""
        self._streams: list[Any] = []
        self.status_flags = 0
        """How many callbacks reported over/underflow (PortAudio status), for diagnostics."""

    async def start(self) -> None:
        """Open and start the devices at their native rates; TransportError if that fails."""
        sd = _sounddevice()
        loop = asyncio.get_running_loop()
        try:
            if self.input_device is not None:
                rate = int(self.input_device["default_samplerate"])
                self.input.bind_loop(loop)
                self._streams.append(
                    sd.InputStream(
                        device=self.input_device["index"],
                        channels=1,
                        samplerate=rate,
                        blocksize=round(rate * self._block_s),
                        dtype="float32",
                        callback=self._make_input_callback(rate),
                    )
                )
            if self.output_device is not None:
                rate = self.output.play_rate
                self._streams.append(
                    sd.OutputStream(
                        device=self.output_device["index"],
                        # Many speakers only open in stereo; the mono voice goes to both channels.
                        channels=min(2, self.output_device["max_output_channels"]),
                        samplerate=rate,
                        blocksize=round(rate * self._block_s),
                        dtype="float32",
                        callback=self._output_callback,
                    )
                )
            # Starting is the real test: some drivers accept a rate when opening and fail here.
            for stream in self._streams:
                stream.start()
        except sd.PortAudioError as exc:
            await self.stop()
            raise TransportError(f"could not start the audio device: {exc}; pick another with list_devices()") from exc
        logger.info(
            "local audio started",
            extra={"input": (self.input_device or {}).get("name"), "output": (self.output_device or {}).get("name")},
        )

    async def stop(self) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            try:
                # Closing waits for the driver's callback thread; keep that off the event loop.
                await asyncio.to_thread(stream.close)
            except Exception:
                logger.exception("closing an audio stream failed")
        self.input.close()
        self.output.close()

    async def __aenter__(self) -> LocalAudio:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _make_input_callback(self, rate: int) -> Any:
        def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            if status:
                self.status_flags += 1
            self.input.feed_threadsafe(indata[:, 0].copy(), rate)

        return callback

    def _output_callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.status_flags += 1
        pcm, _ = self.output.pull(frames)
        outdata[:] = pcm[:, None]
