"""Word timings from a turn's text and audio (moss_agent.streaming.word_timing), without a model.

The audio here is made of tone bursts, one per word, as long as the word's weight at a chosen
speaking rate, with one loudness hump per syllable and a pause after punctuation: the true
boundaries are known exactly. Accuracy on
real (synthetic) speech is measured in tests/integration/test_word_timing_truth.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moss_agent.events import WordTimes
from moss_agent.streaming.clock import ScaledClock
from moss_agent.streaming.session import Session
from moss_agent.streaming.word_timing import WordTimer, split_words, word_syllables, word_weight
from moss_agent.testing import FakeSpeechBackend

RATE = 24000
TEXT = "Well, this is a test of the timer. It should find every word, even the long ones!"


def burst_speech(text: str, units_per_s: float, pause_s: float = 0.3) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Tone bursts for the words of ``text`` -> (pcm, true (start, end) of each word)."""
    pieces, truth, t = [np.zeros(int(0.2 * RATE), np.float32)], [], 0.2
    rng = np.random.default_rng(0)
    for a, b in split_words(text):
        word = text[a:b]
        n = round(word_weight(word) / units_per_s * RATE)
        at = np.arange(n) / RATE
        # one loudness hump per syllable, as in speech
        humps = 0.35 + 0.65 * np.abs(np.sin(np.pi * word_syllables(word) * at / (n / RATE)))
        tone = 0.3 * humps * np.sin(2 * np.pi * rng.uniform(150, 300) * at)
        pieces.append(tone.astype(np.float32))
        truth.append((t, t + n / RATE))
        t += n / RATE
        gap = pause_s if word[-1] in ",.!?" else 0.0
        pieces.append(np.zeros(round(gap * RATE), np.float32))
        t += round(gap * RATE) / RATE
    return np.concatenate(pieces), truth


def stream(timer: WordTimer, text: str, pcm: np.ndarray, chunk_s: float = 0.08) -> list:
    """Text in 7-character deltas, then the audio in chunks -> every word reported, in order."""
    for i in range(0, len(text), 7):
        timer.push_text(text[i : i + 7])
    timer.end_text()
    step = round(chunk_s * RATE)
    reported = []
    for i in range(0, len(pcm), step):
        reported += timer.push_audio(pcm[i : i + step])
        assert all(word.end_s <= (i + step) / RATE + 1e-6 for word in reported), "a word ended in unmade audio"
    return reported + timer.finish()


def test_words_are_runs_between_spaces_and_each_cjk_character() -> None:
    text = "Hi, there!  你好，世界。 x"
    assert [text[a:b] for a, b in split_words(text)] == ["Hi,", "there!", "你", "好，", "世", "界。", "x"]
    assert word_weight("—") == 0 and word_weight("42") == 9 and word_weight("cat.") == 4


@pytest.mark.parametrize("units_per_s", [9.0, 15.0, 24.0])
def test_final_timings_find_the_true_boundaries_at_any_speaking_rate(units_per_s: float) -> None:
    pcm, truth = burst_speech(TEXT, units_per_s)
    words = stream(WordTimer(RATE), TEXT, pcm)
    assert [w.word for w in words] == [TEXT[a:b] for a, b in split_words(TEXT)]
    starts = [w.start_s for w in words]
    assert starts == sorted(starts), "reported starts went back in time"
    final = WordTimer(RATE)
    stream(final, TEXT, pcm)
    errors = [abs(w.start_s - s) for w, (s, _) in zip(final.words, truth, strict=True)]
    errors += [abs(w.end_s - e) for w, (_, e) in zip(final.words, truth, strict=True)]
    # Pauses pin the phrase boundaries; within a phrase the bursts follow the weights exactly.
    assert max(errors) < 0.03, f"worst boundary off by {max(errors):.3f} s"


def test_streaming_estimates_settle_each_word_once_and_stay_close() -> None:
    pcm, truth = burst_speech(TEXT, 12.0)
    timer = WordTimer(RATE)
    for i in range(0, len(TEXT), 7):
        timer.push_text(TEXT[i : i + 7])
    timer.end_text()
    settled = []
    for i in range(0, len(pcm), 1920):
        settled += timer.push_audio(pcm[i : i + 1920])
    assert len(settled) >= len(truth) // 2, "streaming settled too few words before the end"
    errors = [abs(w.start_s - s) for w, (s, _) in zip(settled, truth, strict=False)]
    assert np.median(errors) < 0.25  # the prior rate (15/s) differs from this speaker's (12/s)
    rest = timer.finish()
    assert [w.word for w in settled + rest] == [TEXT[a:b] for a, b in split_words(TEXT)]
    assert timer.finish() == [] and timer.push_audio(pcm[:1920]) == []


def test_the_last_word_waits_for_a_space_or_the_end_of_the_text() -> None:
    timer = WordTimer(RATE)
    timer.push_text("one two thr")
    assert [w.word for w in timer.words] == ["one", "two"]
    timer.push_text("ee ")
    assert [w.word for w in timer.words] == ["one", "two", "three"]
    timer.push_text("fo")
    timer.end_text()
    assert [w.word for w in timer.words][-1] == "fo"


def test_heard_text_is_whole_words_spoken_by_the_cut_and_within_the_model_text() -> None:
    pcm, truth = burst_speech(TEXT, 15.0)
    timer = WordTimer(RATE)
    stream(timer, TEXT, pcm)
    previous = ""
    for cut in np.arange(0.0, len(pcm) / RATE + 0.1, 0.05):
        heard = timer.heard_text(float(cut))
        assert TEXT.startswith(heard) and (heard in ("", TEXT) or TEXT[len(heard)] == " ")
        assert heard.startswith(previous)
        previous = heard
        spoken = sum(1 for _, end in truth if end <= cut - 0.03)
        assert len(timer.heard_words(float(cut))) >= spoken
        assert all(end <= cut + 0.03 for (_, end) in truth[: len(timer.heard_words(float(cut)))])
    assert timer.heard_text(100.0) == TEXT
    assert timer.heard_text(100.0, within="Well, this") == "Well, this"


def test_silence_and_empty_text_do_not_break_it() -> None:
    timer = WordTimer(RATE)
    timer.push_text("quiet words here")
    timer.end_text()
    assert timer.push_audio(np.zeros(RATE, np.float32)) == []
    words = timer.finish()
    assert [w.word for w in words] == ["quiet", "words", "here"]
    assert words[-1].end_s == pytest.approx(1.0, abs=0.011)  # spread over the whole turn
    empty = WordTimer(RATE)
    empty.end_text()
    assert empty.push_audio(np.ones(2400, np.float32) * 0.1) == [] and empty.finish() == []
    assert empty.heard_text(1.0) == ""


def test_chunk_size_does_not_change_the_final_timings() -> None:
    pcm, _ = burst_speech(TEXT, 13.0)
    results = []
    for chunk_s in (0.08, 0.013, 5.0):
        timer = WordTimer(RATE)
        stream(timer, TEXT, pcm, chunk_s)
        results.append(timer.words)
    assert results[0] == results[1] == results[2]


async def test_a_session_reports_word_times_and_puts_only_heard_words_in_the_history() -> None:
    clock = ScaledClock(20.0)
    backend = FakeSpeechBackend(clock=clock)
    async with Session(backend, clock=clock) as session:
        events = session.events()
        done = await asyncio.wait_for(session.say("Two words."), 10)
        times = [e for e in events.drain() if isinstance(e, WordTimes) and e.turn_id == done.turn_id]
        assert times and times[-1].final and [w.word for w in times[-1].words] == ["Two", "words."]
        assert times[-1].words[-1].end_s <= done.audio_s + 1e-6
        assert done.heard_text == "Two words."

        long = session.say("one two three four five six seven eight nine ten eleven twelve")
        while True:
            event = await asyncio.wait_for(anext(aiter(events)), 10)
            if isinstance(event, WordTimes) and len(event.words) and event.words[-1].word == "three":
                break
        cut = await long.interrupt()
        final = [e for e in events.drain() if isinstance(e, WordTimes) and e.turn_id == cut.turn_id][-1]
        assert final.final and cut.interrupted
        heard = " ".join(w.word for w in final.words)
        assert cut.heard_text == heard and heard.startswith("one two three")
        assert len(heard) < len("one two three four five six seven eight nine ten eleven twelve")
        assert all(w.end_s <= cut.heard_s + 1e-6 for w in final.words)
        # two agent turns in a row share one assistant message in the history
        assert session.history[-1] == {"role": "assistant", "content": "Two words. " + heard}
