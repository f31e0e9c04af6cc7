"""Turn-taking and barge-in as a pure state machine driven by VAD probabilities and input time.

Time is the position in the input audio (seconds), so a ten-second exchange is replayed in
microseconds in tests and the decision never depends on how fast the event loop ran.
Half-duplex echo handling and the AEC warm-up window are applied here as well, so every rule that
decides "is the user talking to us" lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moss_agent.config import TurnTakingConfig


@dataclass(frozen=True, slots=True)
class SpeechStart:
    """The user started talking at ``at_s`` (confirmed ``min_speech_s`` later)."""

    at_s: float
    during_agent: bool


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    """The user stopped at ``at_s`` after ``duration_s`` of speech.

    ``backchannel``: a short overlap with agent speech ("mhm", a cough) that did not interrupt; it
    starts no turn.
    """

    at_s: float
    duration_s: float
    backchannel: bool


@dataclass(frozen=True, slots=True)
class BargeIn:
    """The user has spoken over the agent for ``min_interrupt_s``: stop the agent."""

    at_s: float


TurnSignal = SpeechStart | SpeechEnd | BargeIn


class _State(Enum):
    IDLE = "idle"
    PENDING = "pending"
    SPEAKING = "speaking"


class TurnDetector:
    """Feed one VAD window at a time with :meth:`update`; it returns the signals that window caused."""

    def __init__(self, config: TurnTakingConfig) -> None:
        self.config = config
        self._state = _State.IDLE
        self._speech_start = 0.0
        self._last_voice_end = 0.0
        self._started_during_agent = False
        self._barged = False
        self._agent_since: float | None = None
        self._agent_last_end = float("-inf")

    @property
    def user_speaking(self) -> bool:
        return self._state is _State.SPEAKING

    def reset(self) -> None:
        self._state = _State.IDLE
        self._barged = False

    def _suppressed(self, t: float, agent_speaking: bool) -> bool:
        """Half-duplex: the microphone hears the speaker, so ignore it while the agent talks plus a tail."""
        if self.config.echo_mode != "half_duplex":
            return False
        return agent_speaking or t < self._agent_last_end + self.config.echo_tail_s

    def _may_interrupt(self, t: float, agent_speaking: bool) -> bool:
        if not agent_speaking or self.config.echo_mode == "half_duplex":
            return False
        if self.config.echo_mode == "aec" and self._agent_since is not None:
            return t >= self._agent_since + self.config.aec_warmup_s
        return True

    def update(self, probability: float, t: float, duration_s: float, agent_speaking: bool) -> list[TurnSignal]:
        """One VAD window starting at input time ``t`` lasting ``duration_s``; ``agent_speaking``: agent audio is playing."""
        cfg = self.config
        end = t + duration_s
        if agent_speaking:
            if self._agent_since is None:
                self._agent_since = t
            self._agent_last_end = end
        else:
            self._agent_since = None
        if self._suppressed(t, agent_speaking):
            probability = 0.0
        signals: list[TurnSignal] = []
        if self._state is _State.IDLE and probability >= cfg.speech_threshold:
            self._state = _State.PENDING
            self._speech_start = t
            self._started_during_agent = agent_speaking
            self._last_voice_end = end
        if self._state is _State.PENDING:
            if probability < cfg.silence_threshold:
                self._state = _State.IDLE
            else:
                if probability >= cfg.speech_threshold:
                    self._last_voice_end = end
                if end - self._speech_start >= cfg.min_speech_s:
                    self._state = _State.SPEAKING
                    self._barged = False
                    signals.append(SpeechStart(self._speech_start, self._started_during_agent))
        elif self._state is _State.SPEAKING and probability >= cfg.silence_threshold:
            self._last_voice_end = end
        if self._state is _State.SPEAKING:
            voiced_now = probability >= cfg.silence_threshold
            if voiced_now and not self._barged and self._may_interrupt(t, agent_speaking):
                listening_since = self._agent_since if self._agent_since is not None else t
                if cfg.echo_mode == "aec":
                    listening_since += cfg.aec_warmup_s
                overlap_from = max(self._speech_start, listening_since)
                # Count only voiced time: a cough followed by silence must not ripen into a barge-in.
                if self._last_voice_end - overlap_from >= cfg.min_interrupt_s:
                    self._barged = True
                    signals.append(BargeIn(self._last_voice_end))
            silent_for = end - self._last_voice_end
            too_long = end - self._speech_start >= cfg.max_utterance_s
            if silent_for >= cfg.hang_s or too_long:
                duration = self._last_voice_end - self._speech_start
                backchannel = (
                    self._started_during_agent and not self._barged and duration < cfg.min_interrupt_s
                )
                signals.append(SpeechEnd(self._last_voice_end, duration, backchannel))
                self._state = _State.IDLE
        return signals
