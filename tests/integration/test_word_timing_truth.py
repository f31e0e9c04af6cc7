"""WordTimer against espeak-ng's own word boundaries (``synthesize_timed_speech``), and those
boundaries against the audio they came with. ``benchmarks/word_timing.py`` prints the full figures."""

from __future__ import annotations

import numpy as np
import pytest
from system_requirements import SystemRequirement, requires

from moss_agent.errors import ConfigError
from moss_agent.streaming.word_timing import WordTimer
from moss_agent.testing.speech import TimedSpeech, espeak_ng_library_path, synthesize_timed_speech

LIBESPEAK_NG = SystemRequirement(
    "the espeak-ng library (libespeak-ng.so.1)", "libespeak-ng1", espeak_ng_library_path
)
pytestmark = requires(LIBESPEAK_NG)

# Conversational sentences that espeak gives one word event per written word.
SENTENCES = (
    "Could you repeat the last part, please?",
    "The meeting moved to Thursday afternoon.",
    "Do you want the red one, the blue one, or the green one?",
    "Our support line is open from nine to five, Monday through Friday, except on public holidays.",
    "Thanks for calling. Have a great day, and goodbye!",
)
RATE_WPM = 175
FRAME_S = 0.08  # one codec frame: the model reads one text token per frame...
LEAD_TOKENS = 12  # ...after reading this many
CHARS_PER_TOKEN = 4  # English averages about 4 characters per Qwen3 token
# Measured (2026-12, on these sentences at 150/175/200 wpm): the final estimate's median start error
# is 72-87 ms, the naive one's 1.1-1.5 s. 150 ms leaves room for the estimator to change without
# letting it fall to the naive estimate's level.
MEDIAN_START_ERROR_S = 0.150


@pytest.fixture(scope="module")
def speeches() -> list[TimedSpeech]:
    return [synthesize_timed_speech(text, 24000, rate=RATE_WPM) for text in SENTENCES]


def run_timer(
    speech: TimedSpeech, heard_every_s: float | None = None
) -> tuple[WordTimer, list[tuple[float, str]]]:
    """Stream a turn as the engine does: text one token per 80 ms frame after a 12-token lead,
    audio in 80 ms chunks; then finish. With ``heard_every_s``, also ask ``heard_text`` at cuts that
    far apart, each at the moment the audio first reaches it (an interruption mid-turn) ->
    (cut, heard text)."""
    text, rate = speech.text, speech.sample_rate
    pieces = [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]
    timer = WordTimer(rate)
    chunk = round(FRAME_S * rate)
    cuts = list(np.arange(0.0, speech.duration_s, heard_every_s)) if heard_every_s else []
    heard: list[tuple[float, str]] = []
    fed = 0
    for frame, offset in enumerate(range(0, speech.audio.shape[0], chunk)):
        while fed < min(LEAD_TOKENS + 1 + frame, len(pieces)):
            timer.push_text(pieces[fed])
            fed += 1
            if fed == len(pieces):
                timer.end_text()
        timer.push_audio(speech.audio[offset : offset + chunk])
        reached = min(speech.audio.shape[0], offset + chunk) / rate
        while cuts and cuts[0] <= reached:
            cut = float(cuts.pop(0))
            heard.append((cut, timer.heard_text(cut)))
    timer.finish()
    return timer, heard


def assert_not_ahead(speech: TimedSpeech, cut: float, heard_text: str) -> None:
    """``heard_text`` at ``cut`` is a prefix of the words, none ending more than a frame after the cut."""
    heard = heard_text.split()
    assert heard == [w.word for w in speech.words[: len(heard)]]
    if heard:
        last = speech.words[len(heard) - 1]
        assert last.end_s is not None
        assert last.end_s <= cut + FRAME_S, (speech.text, cut, heard_text, last)


def rms_dbfs(audio: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(audio.astype(np.float64) ** 2)) + 1e-12))


# --------------------------------------------------------------------------------------------------
# the ground truth itself


def test_word_events_fit_the_audio(speeches: list[TimedSpeech]) -> None:
    for speech in speeches:
        rate = speech.sample_rate
        assert [w.word for w in speech.words] == speech.text.split()
        starts = [w.start_s for w in speech.words]
        ends = [w.end_s for w in speech.words]
        assert None not in starts and None not in ends, speech.words
        assert starts[0] == 0.0
        for index, word in enumerate(speech.words):
            assert word.start_s is not None and word.end_s is not None
            assert word.start_s < word.end_s <= speech.duration_s
            if index + 1 < len(speech.words):
                following = speech.words[index + 1].start_s
                assert following is not None and word.start_s < following and word.end_s <= following
                # between a word's end and the next start there is only silence (a pause or none)
                gap = speech.audio[
                    round(word.end_s * rate) + rate // 100 : round(following * rate) - rate // 100
                ]
                assert gap.size == 0 or rms_dbfs(gap) < -50, (word, rms_dbfs(gap))
            # a word is speech: its span is voiced
            assert rms_dbfs(speech.audio[round(word.start_s * rate) : round(word.end_s * rate)]) > -40, word
        # the phrase ends (comma, full stop) carry pauses; espeak puts them after the word, not in it
        for word, nxt in zip(speech.words, speech.words[1:], strict=False):
            if word.word[-1] in ",.?!":
                assert nxt.start_s is not None and word.end_s is not None
                assert nxt.start_s - word.end_s > 0.1, (word, nxt)


def test_a_word_spoken_as_several_is_one_word_and_rates_scale() -> None:
    slow = synthesize_timed_speech("It costs 42 dollars.", 16000, rate=120)
    fast = synthesize_timed_speech("It costs 42 dollars.", 16000, rate=240)
    # espeak reads "42" as two words ("forty two"), each with its own event: still one word here
    assert [w.word for w in slow.words] == ["It", "costs", "42", "dollars."]
    assert slow.sample_rate == 16000 and slow.audio.dtype == np.float32
    assert fast.duration_s < 0.75 * slow.duration_s
    for quick, steady in zip(fast.words[1:], slow.words[1:], strict=True):
        assert quick.start_s is not None and steady.start_s is not None
        assert quick.start_s < steady.start_s


def test_merged_words_have_no_time_of_their_own() -> None:
    # espeak speaks "has not" as one unit (one word event): "not" has no start, "has" no end
    speech = synthesize_timed_speech("It has not arrived yet.", rate=RATE_WPM)
    words = {w.word: w for w in speech.words}
    if words["not"].start_s is not None:
        pytest.skip("this espeak-ng version gives 'not' its own word event")
    assert words["has"].start_s is not None and words["has"].end_s is None
    assert words["not"].end_s is not None and words["arrived"].start_s is not None
    assert words["not"].end_s <= words["arrived"].start_s


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="voice"):
        synthesize_timed_speech("hello", voice="no-such-voice")
    with pytest.raises(ConfigError, match="rate"):
        synthesize_timed_speech("hello", rate=20)
    with pytest.raises(ConfigError, match="text"):
        synthesize_timed_speech("   ")


# --------------------------------------------------------------------------------------------------
# WordTimer against it


def naive_start(speech: TimedSpeech, index: int) -> float:
    """The old assumption: a word is spoken when its first token is fed (12 tokens ahead)."""
    first_token = speech.words[index].char_start // CHARS_PER_TOKEN
    return max(0, first_token - LEAD_TOKENS) * FRAME_S


def test_final_word_starts_are_close_and_beat_the_naive_estimate(speeches: list[TimedSpeech]) -> None:
    ours, naive = [], []
    for speech in speeches:
        timer, _ = run_timer(speech)
        assert [w.word for w in timer.words] == [w.word for w in speech.words]
        for index, (estimate, truth) in enumerate(zip(timer.words, speech.words, strict=True)):
            assert truth.start_s is not None
            ours.append(abs(estimate.start_s - truth.start_s))
            naive.append(abs(naive_start(speech, index) - truth.start_s))
    assert float(np.median(ours)) < MEDIAN_START_ERROR_S, np.median(ours)
    assert float(np.median(ours)) < float(np.median(naive)), (np.median(ours), np.median(naive))


def test_heard_text_never_claims_a_word_ending_a_frame_after_the_cut(speeches: list[TimedSpeech]) -> None:
    for speech in speeches:
        timer, _ = run_timer(speech)
        for cut in np.arange(0.0, speech.duration_s + FRAME_S, 0.02):
            assert_not_ahead(speech, float(cut), timer.heard_text(float(cut)))


def words_ahead(speech: TimedSpeech, cut: float, heard_text: str) -> int:
    """How many words ``heard_text`` claims that end more than a frame after ``cut``."""
    heard = heard_text.split()
    assert heard == [w.word for w in speech.words[: len(heard)]]  # always a prefix of whole words
    return sum(1 for w in speech.words[: len(heard)] if w.end_s is not None and w.end_s > cut + FRAME_S)


def test_streaming_heard_text_rarely_runs_ahead_and_never_by_more_than_a_word(
    speeches: list[TimedSpeech],
) -> None:
    """Mid-turn the estimate has only the audio so far, so it can claim a word just before it ends
    (measured: 21 of 910 cuts here, each by one word; benchmarks/word_timing.py has the
    figures per speaking rate). It must stay rare and small, including in slow speech."""
    slow = synthesize_timed_speech("Yes, I can help with that.", 24000, rate=130)
    ahead = []
    for speech in [*speeches, slow]:
        # asked when the audio first reaches the cut (made no further): an interruption mid-turn
        _, streamed = run_timer(speech, heard_every_s=0.02)
        ahead += [words_ahead(speech, cut, heard) for cut, heard in streamed]
    assert max(ahead) <= 1, "a cut claimed two or more words not yet spoken"
    assert sum(1 for n in ahead if n) / len(ahead) < 0.15, f"{sum(map(bool, ahead))} of {len(ahead)} cuts ran ahead"
