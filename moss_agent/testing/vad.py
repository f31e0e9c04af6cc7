"""An energy-threshold voice-activity model with the same interface as ``SileroVad``.

Loud is speech, quiet is silence: good enough for synthetic test signals (speech clips over
silence) and free of torch, so unit tests of the listener stay fast.
"""

from __future__ import annotations

import numpy as np

from moss_agent.events import FloatArray


class EnergyVad:
    """``probabilities(pcm16k)`` -> one value per 512-sample window: 1.0 above ``threshold_db`` dBFS RMS."""

    window = 512

    def __init__(self, threshold_db: float = -40.0) -> None:
        self.threshold_db = threshold_db

    def probabilities(self, pcm: FloatArray) -> np.ndarray:
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        count = len(samples) // self.window
        windows = samples[: count * self.window].reshape(count, self.window)
        rms = np.sqrt(np.mean(windows.astype(np.float64) ** 2, axis=1) + 1e-12)
        speech: np.ndarray = (20 * np.log10(rms) > self.threshold_db).astype(np.float32)
        return speech
