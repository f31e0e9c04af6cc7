"""The user's side of a session: microphone audio -> (echo canceller) -> VAD -> turn detector.

Keeps the recent user audio (24 kHz by default) so a finished utterance can go to the engine as
acoustic context and to the speech recognizer. Timing is the input's sample position, so the
decisions are the same whether audio arrives in real time or all at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from moss_agent.audio import StreamResampler
from moss_agent.config import SessionConfig
from moss_agent.events import FloatArray
from moss_agent.streaming.turns import SpeechEnd, SpeechStart, TurnDetector, TurnSignal
from moss_agent.transports.base import AudioInput

log = logging.getLogger(__name__)


@runtime_checkable
class VoiceActivityModel(Protocol):
    """Speech probability per window (``moss_agent.speech.vad.SileroVad`` implements it).

    ``probabilities(pcm)``: pcm [n] float32 at 16 kHz, n a multiple of ``window`` -> [n // window].
    Blocking; the listener calls it in a worker thread. Keeps its own streaming state.
    """

    def probabilities(self, pcm: FloatArray) -> np.ndarray: ...


@runtime_checkable
class Transcriber(Protocol):
    """``moss_agent.speech.stt.SpeechRecognizer``: audio of one utterance -> its text."""

    async def transcribe(self, pcm: FloatArray, sample_rate: int) -> str: ...


@runtime_checkable
class EchoCanceller(Protocol):
    """Removes the agent's own voice from the microphone (``echo_mode='aec'``).

    ``feed_far(pcm)`` gets agent audio as it is sent to the speaker; ``process_near(pcm)`` gets the
    microphone and returns it with the echo removed. Both at ``sample_rate``, any chunk length.
    """

    sample_rate: int

    def feed_far(self, pcm: FloatArray) -> None: ...

    def process_near(self, pcm: FloatArray) -> FloatArray: ...


VAD_WINDOW = 512


class AudioRing:
    """The last ``capacity`` samples of a stream, addressed by absolute sample position (circular, no copies on append)."""

    def __init__(self, capacity: int) -> None:
        self._buffer = np.zeros(capacity, dtype=np.float32)
        self.end = 0  # absolute position one past the newest sample

    def append(self, pcm: FloatArray) -> None:
        cap = len(self._buffer)
        n = len(pcm)
        if n == 0:
            return
        if n > cap:
            pcm, self.end = pcm[-cap:], self.end + n - cap
            n = cap
        head = self.end % cap
        first = min(n, cap - head)
        self._buffer[head : head + first] = pcm[:first]
        self._buffer[: n - first] = pcm[first:]
        self.end += n

    def slice(self, start: int, stop: int) -> FloatArray:
        """Samples [start, stop) clipped to what is still held."""
        cap = len(self._buffer)
        start = max(start, self.end - cap, 0)
        stop = min(stop, self.end)
        if stop <= start:
            return np.zeros(0, dtype=np.float32)
        index = np.arange(start, stop) % cap
        return self._buffer[index]


@dataclass(frozen=True, slots=True)
class Utterance:
    """One finished user utterance."""

    audio: FloatArray
    sample_rate: int
    start_s: float
    end_s: float
    text: str = ""


class Listener:
    """Runs the input side; reports turn signals and finished utterances through callbacks."""

    def __init__(
        self,
        source: AudioInput,
        vad: VoiceActivityModel,
        config: SessionConfig,
        *,
        agent_speaking: Callable[[], bool],
        on_signal: Callable[[TurnSignal, Utterance | None], None],
        echo_canceller: EchoCanceller | None = None,
    ) -> None:
        self.source = source
        self.vad = vad
        self.config = config
        self.detector = TurnDetector(config.turns)
        self._agent_speaking = agent_speaking
        self._on_signal = on_signal
        self._aec = echo_canceller
        self._vad_rate = config.vad_sample_rate
        self._to_vad = StreamResampler(source.sample_rate, self._vad_rate, quality="QQ")
        self._keep_rate = config.user_audio_sample_rate
        self._to_keep = StreamResampler(source.sample_rate, self._keep_rate, quality="MQ")
        self._aec_in = (
            StreamResampler(source.sample_rate, echo_canceller.sample_rate) if echo_canceller else None
        )
        self._aec_out = (
            StreamResampler(echo_canceller.sample_rate, source.sample_rate) if echo_canceller else None
        )
        capacity = int((config.turns.max_utterance_s + config.turns.pre_roll_s + 2.0) * self._keep_rate)
        self.ring = AudioRing(capacity)
        self._pending = np.zeros(0, dtype=np.float32)
        self._windows = 0
        self._speech_start_s = 0.0

    @property
    def input_time_s(self) -> float:
        return self._windows * VAD_WINDOW / self._vad_rate

    def _cancel_echo(self, pcm: FloatArray) -> FloatArray:
        if self._aec is None or self._aec_in is None or self._aec_out is None:
            return pcm
        cleaned = self._aec.process_near(self._aec_in.process(pcm))
        return self._aec_out.process(cleaned)

    async def run(self) -> None:
        async for chunk in self.source:
            await self.feed(chunk.pcm)

    async def feed(self, pcm: FloatArray) -> None:
        """One chunk of input at ``source.sample_rate``."""
        pcm = self._cancel_echo(np.asarray(pcm, dtype=np.float32).reshape(-1))
        self.ring.append(self._to_keep.process(pcm))
        self._pending = np.concatenate([self._pending, self._to_vad.process(pcm)])
        usable = len(self._pending) - len(self._pending) % VAD_WINDOW
        if usable == 0:
            return
        block, self._pending = self._pending[:usable], self._pending[usable:]
        probabilities = await asyncio.to_thread(self.vad.probabilities, block)
        window_s = VAD_WINDOW / self._vad_rate
        for probability in np.asarray(probabilities, dtype=np.float32).reshape(-1):
            t = self._windows * window_s
            self._windows += 1
            for signal in self.detector.update(float(probability), t, window_s, self._agent_speaking()):
                self._on_signal(signal, self._utterance(signal))

    def _utterance(self, signal: TurnSignal) -> Utterance | None:
        if isinstance(signal, SpeechStart):
            self._speech_start_s = signal.at_s
            return None
        if not isinstance(signal, SpeechEnd) or signal.backchannel:
            return None
        rate = self._keep_rate
        start_s = max(0.0, self._speech_start_s - self.config.turns.pre_roll_s)
        end_s = signal.at_s + 0.1
        audio = self.ring.slice(int(start_s * rate), int(end_s * rate))
        return Utterance(audio, rate, self._speech_start_s, signal.at_s)
