"""Streaming voice activity detection with the Silero VAD model shipped inside the ``silero-vad`` wheel.

:class:`SileroVad` turns 16 kHz float32 audio of any chunk size into one speech probability per
512-sample window (32 ms). Turn-taking decisions built on those probabilities live in
``moss_agent.streaming.turns``. Calls are blocking; the pipeline runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from moss_agent._optional import require
from moss_agent.audio import as_mono_float
from moss_agent.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = ["SileroVad"]


class SileroVad:
    """Single-stream Silero VAD on the CPU, one thread.

    Feed audio with :meth:`probabilities` as it arrives; samples that do not fill a whole window are
    kept for the next call, so chunk boundaries never change the result. The model is recurrent:
    call :meth:`reset` between unrelated streams. One instance serves one stream; calls on it must
    not overlap (they are serialised by a lock).
    """

    sample_rate: int = 16000
    window: int = 512
    frame_duration_s: float = window / sample_rate

    def __init__(self) -> None:
        self._model: Any = _load_model()  # TorchScript module with reset_states()
        self._pending = np.zeros(0, dtype=np.float32)
        self._lock = threading.Lock()

    def probabilities(self, pcm: np.ndarray) -> np.ndarray:
        """pcm: [T] float32 mono at 16 kHz, any length -> [W] float32 speech probabilities in [0, 1].

        W is the number of windows completed by this call (remainder carried over). Raises AudioError
        for multi-channel, non-float or non-finite input.
        """
        samples = as_mono_float(pcm, "VAD input (mono float audio at 16 kHz)")
        with self._lock:
            buffered = np.concatenate([self._pending, samples]) if self._pending.size else samples
            count = buffered.shape[0] // self.window
            self._pending = buffered[count * self.window :].copy()
            if count == 0:
                return np.zeros(0, dtype=np.float32)
            windows = torch.from_numpy(np.ascontiguousarray(buffered[: count * self.window])).view(
                count, 1, self.window
            )
            out = np.empty(count, dtype=np.float32)
            with _single_thread(), torch.inference_mode():
                for index in range(count):
                    out[index] = float(self._model(windows[index], self.sample_rate))
            return out

    def reset(self) -> None:
        """Forget the recurrent state and any buffered samples (start of a new stream)."""
        with self._lock:
            self._model.reset_states()
            self._pending = np.zeros(0, dtype=np.float32)

    @property
    def pending_samples(self) -> int:
        """Samples waiting for their window to fill."""
        return int(self._pending.shape[0])


def _load_model() -> Any:
    # silero_vad calls torch.set_num_threads(1) when imported; that would slow every other CPU
    # model in this thread, so the setting is put back.
    threads = torch.get_num_threads()
    try:
        silero_vad = require("silero_vad", "vad")
    finally:
        torch.set_num_threads(threads)
    try:
        model = silero_vad.load_silero_vad(onnx=False)
    except Exception as exc:  # the package's loader raises bare Exceptions for a damaged install
        raise ModelError(f"could not load the Silero VAD model shipped with silero-vad: {exc}") from exc
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.reset_states()
    return model


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run one small recurrent step per window on one core: extra threads only add overhead here.

    torch's OpenMP thread count is per calling thread, so this does not touch other threads' work.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


