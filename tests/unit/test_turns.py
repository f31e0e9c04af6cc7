"""Turn-taking and barge-in on synthetic VAD traces: the input clock is virtual, so seconds of
conversation run in microseconds and every threshold is checked on both sides."""

from __future__ import annotations

import pytest

from moss_agent.config import TurnTakingConfig
from moss_agent.errors import ConfigError
from moss_agent.streaming.turns import BargeIn, SpeechEnd, SpeechStart, TurnDetector, TurnSignal

WINDOW = 0.032


def run(
    detector: TurnDetector, segments: list[tuple[float, float, bool]], start: float = 0.0
) -> list[tuple[float, TurnSignal]]:
    """segments: (seconds, probability, agent_speaking); returns (window time, signal) pairs."""
    out: list[tuple[float, TurnSignal]] = []
    t = start
    for seconds, probability, agent in segments:
        for _ in range(round(seconds / WINDOW)):
            for signal in detector.update(probability, t, WINDOW, agent):
                out.append((t, signal))
            t += WINDOW
    return out


def kinds(signals: list[tuple[float, TurnSignal]]) -> list[str]:
    return [type(s).__name__ for _, s in signals]


def test_short_blip_starts_no_turn_but_min_speech_does() -> None:
    cfg = TurnTakingConfig(min_speech_s=0.2, hang_s=0.5)
    assert run(TurnDetector(cfg), [(1.0, 0.0, False), (0.128, 0.9, False), (1.0, 0.0, False)]) == []
    signals = run(TurnDetector(cfg), [(1.0, 0.0, False), (0.256, 0.9, False), (1.0, 0.0, False)])
    assert kinds(signals) == ["SpeechStart", "SpeechEnd"]
    start = signals[0][1]
    assert isinstance(start, SpeechStart) and start.at_s == pytest.approx(1.0, abs=WINDOW)


def test_hang_time_bridges_pauses_shorter_than_it() -> None:
    cfg = TurnTakingConfig(min_speech_s=0.1, hang_s=0.6)
    trace = [(0.5, 0.9, False), (0.4, 0.0, False), (0.5, 0.9, False), (1.0, 0.0, False)]
    signals = run(TurnDetector(cfg), trace)
    assert kinds(signals) == ["SpeechStart", "SpeechEnd"]
    t_end, end = signals[1]
    assert isinstance(end, SpeechEnd) and not end.backchannel
    assert end.duration_s == pytest.approx(1.4, abs=2 * WINDOW)
    assert t_end - end.at_s == pytest.approx(0.6, abs=2 * WINDOW)  # ended one hang time after last voice
    longer_pause = [(0.5, 0.9, False), (0.8, 0.0, False), (0.5, 0.9, False), (1.0, 0.0, False)]
    assert kinds(run(TurnDetector(cfg), longer_pause)) == ["SpeechStart", "SpeechEnd"] * 2


def test_hysteresis_keeps_a_turn_alive_between_thresholds() -> None:
    cfg = TurnTakingConfig(speech_threshold=0.6, silence_threshold=0.3, min_speech_s=0.1, hang_s=0.3)
    signals = run(TurnDetector(cfg), [(0.3, 0.9, False), (1.0, 0.45, False), (0.5, 0.0, False)])
    assert kinds(signals) == ["SpeechStart", "SpeechEnd"]
    end = signals[1][1]
    assert isinstance(end, SpeechEnd) and end.duration_s == pytest.approx(1.3, abs=2 * WINDOW)
    # 0.45 never starts a turn from silence
    assert run(TurnDetector(cfg), [(2.0, 0.45, False)]) == []


def test_barge_in_needs_min_interrupt_of_overlap() -> None:
    cfg = TurnTakingConfig(min_speech_s=0.1, min_interrupt_s=0.5, hang_s=0.4, echo_mode="none")
    short = run(TurnDetector(cfg), [(1.0, 0.0, True), (0.3, 0.9, True), (1.0, 0.0, True)])
    assert kinds(short) == ["SpeechStart", "SpeechEnd"]
    start, end = short[0][1], short[1][1]
    assert isinstance(start, SpeechStart) and start.during_agent
    assert isinstance(end, SpeechEnd) and end.backchannel  # "mhm": no turn, no interruption
    long = run(TurnDetector(cfg), [(1.0, 0.0, True), (0.8, 0.9, True), (1.0, 0.0, False)])
    assert kinds(long) == ["SpeechStart", "BargeIn", "SpeechEnd"]
    barge = long[1][1]
    assert isinstance(barge, BargeIn) and barge.at_s == pytest.approx(1.5, abs=2 * WINDOW)
    end = long[2][1]
    assert isinstance(end, SpeechEnd) and not end.backchannel


def test_user_speech_without_agent_never_barges_in() -> None:
    cfg = TurnTakingConfig(min_speech_s=0.1, min_interrupt_s=0.2, echo_mode="none")
    assert "BargeIn" not in kinds(run(TurnDetector(cfg), [(3.0, 0.9, False), (1.0, 0.0, False)]))


def test_overlap_counts_from_when_the_agent_started() -> None:
    # The user was already talking when the agent began: only the overlap counts toward barge-in.
    cfg = TurnTakingConfig(min_speech_s=0.1, min_interrupt_s=0.5, hang_s=1.0, echo_mode="none")
    signals = run(TurnDetector(cfg), [(1.0, 0.9, False), (1.0, 0.9, True)])
    barge = [(t, s) for t, s in signals if isinstance(s, BargeIn)]
    assert len(barge) == 1 and barge[0][1].at_s == pytest.approx(1.5, abs=2 * WINDOW)


def test_half_duplex_ignores_the_microphone_while_agent_speaks_and_for_the_tail() -> None:
    cfg = TurnTakingConfig(min_speech_s=0.1, hang_s=0.3, echo_mode="half_duplex", echo_tail_s=0.4)
    during = run(TurnDetector(cfg), [(2.0, 0.9, True)])
    assert during == []
    tail = run(TurnDetector(cfg), [(1.0, 0.0, True), (0.3, 0.9, False), (1.0, 0.0, False)])
    assert tail == []  # echo of the last agent syllables inside the tail
    after = run(TurnDetector(cfg), [(1.0, 0.0, True), (0.5, 0.0, False), (0.3, 0.9, False), (1.0, 0.0, False)])
    assert kinds(after) == ["SpeechStart", "SpeechEnd"]


def test_aec_mode_ignores_barge_in_during_warmup() -> None:
    cfg = TurnTakingConfig(min_speech_s=0.1, min_interrupt_s=0.3, hang_s=0.3, echo_mode="aec", aec_warmup_s=1.0)
    early = run(TurnDetector(cfg), [(0.2, 0.0, True), (0.6, 0.9, True), (0.5, 0.0, True)])
    assert "BargeIn" not in kinds(early)
    late = run(TurnDetector(cfg), [(1.2, 0.0, True), (0.6, 0.9, True), (0.5, 0.0, True)])
    assert "BargeIn" in kinds(late)


def test_max_utterance_forces_an_end() -> None:
    cfg = TurnTakingConfig(min_speech_s=0.1, max_utterance_s=2.0)
    signals = run(TurnDetector(cfg), [(5.0, 0.9, False)])
    assert kinds(signals)[:2] == ["SpeechStart", "SpeechEnd"]
    end = signals[1][1]
    assert isinstance(end, SpeechEnd) and end.duration_s == pytest.approx(2.0, abs=2 * WINDOW)


@pytest.mark.parametrize(
    "kwargs",
    [{"speech_threshold": 0.0}, {"silence_threshold": 0.9}, {"hang_s": -1.0}, {"echo_mode": "loud"}],
)
def test_bad_thresholds_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TurnTakingConfig(**kwargs)  # type: ignore[arg-type]
