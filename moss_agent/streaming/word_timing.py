"""When each word of an agent turn is spoken, estimated from the turn's text and audio as they stream.

Why not from the model's text feed: MOSS-TTS-Realtime reads its text ahead of its speech (a 12-token
lead, then one token per 80 ms frame, about three times faster than anyone speaks), so the frame at
which a token is fed only bounds when it is spoken from below, and the lead grows through a turn.
What the audio itself says is more useful, and it needs no model internals, so the same estimate
works on the in-process engine, the remote service and the fake:

1. **Voice activity.** The audio is cut into 10 ms hops; a hop is voiced when its RMS is above an
   absolute floor (-50 dBFS) and within 35 dB of the loudest hop so far. Voiced blips shorter than
   30 ms between silences are clicks, not speech.
2. **Speaking-rate model.** Each word weighs its letters (a digit counts 4: "42" is "forty-two"; a
   CJK character 3, a syllable) plus one for the junction with the next, and is spoken at ``rate``
   weight units per second of *voiced* time. A word's place in voiced time, mapped back to the
   clock, never straddles a pause.
3. **Correction as audio arrives.** While streaming, the rate comes from the audio itself: syllable
   nuclei (loudness peaks 3 dB above the valleys around them) are counted and are worth the text's
   weight per syllable, shrunk towards the rate known before them. Each silence of 150 ms or more
   inside speech is tied to the word end nearest the estimate (nobody pauses inside a word; one
   after punctuation is preferred), which pins the position and re-estimates the rate. Words whose
   estimate ends a safety margin before the latest voiced audio are *settled*: reported once, in
   order. What was heard at a cut is claimed at 0.9 times the estimated rate: late rather than early.
4. **Final alignment.** When the speech ended by itself the model has spoken all its text, so the
   total weight spans the total voiced time exactly; every pause is then matched to a word end by a
   small dynamic programme (cost: distance from the uniform-rate position, plus a penalty for a word
   without punctuation, or for leaving a pause unmatched), and the words are spread linearly between
   anchors.

``benchmarks/word_timing.py`` measures the error against synthetic speech with known word boundaries.
"""

from __future__ import annotations

import bisect
import math
import re
import unicodedata

import numpy as np

from moss_agent.events import FloatArray, WordTiming

__all__ = ["WordTimer", "WordTiming", "split_words"]

HOP_S = 0.01
FLOOR_RMS = 10 ** (-50 / 20)
RELATIVE_DB = 35.0
MIN_BLIP_HOPS = 3  # voiced runs shorter than this between silences are clicks
MIN_PAUSE_HOPS = 15  # 150 ms of silence inside speech is a phrase boundary
PRIOR_RATE = 15.0  # weight units per voiced second: ~15 letters/s is conversational English
PRIOR_SECONDS = 2.0  # how much voiced time the prior rate is worth when re-estimating it
RATE_RANGE = (PRIOR_RATE / 2.5, PRIOR_RATE * 2.5)
SETTLE_MARGIN_S = 0.25  # a word is reported once the estimate is this far (voiced time) past its end
NO_PUNCTUATION_COST = 4.0  # weight units: a pause after a word without punctuation is less likely
UNMATCHED_PAUSE_COST = 12.0
NUCLEUS_DB = 3.0  # a loudness peak this far above the valleys around it is a syllable
SYLLABLES_PER_NUCLEUS = 0.85  # loudness peaks overcount syllables a little (measured on espeak-ng)
SYLLABLE_TRUST_S = 1.0
HEARD_MARGIN_S = 0.0  # seconds a streaming estimate must be past the cut to count as heard
HEARD_RATE_SCALE = 0.9  # ... and at this fraction of the estimated rate (claim late rather than early)
_PHRASE_END = re.compile(r"[,.;:!?\u2026\u2014\u3001\u3002\uff0c\uff01\uff1f\uff1b\uff1a)\"'\u201d]$")
_VOWELS = re.compile(r"[aeiouy\u00e0-\u00ff]+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def split_words(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the spoken words of ``text``: runs between spaces, with each
    CJK character a word of its own (those languages write no spaces); punctuation stays on its word."""
    spans: list[tuple[int, int]] = []
    for match in re.finditer(r"\S+", text):
        start, end = match.span()
        if not _CJK.search(match.group()):
            spans.append((start, end))
            continue
        for i in range(start + 1, end):
            if _CJK.match(text[i]):
                spans.append((start, i))
                start = i
        spans.append((start, end))
    return spans


def word_syllables(word: str) -> float:
    """Syllables of ``word``, roughly: vowel groups (a final silent e aside), 1.4 per digit, one per
    CJK character."""
    letters = "".join(ch for ch in word.lower() if ch.isalpha() and not _CJK.match(ch))
    count = len(_VOWELS.findall(letters))
    if count > 1 and letters.endswith("e") and not letters.endswith(("le", "ee")):
        count -= 1
    count = max(1, count) if letters else 0
    return count + 1.4 * sum(ch.isdigit() for ch in word) + sum(bool(_CJK.match(ch)) for ch in word)


def word_weight(word: str) -> float:
    """Relative speaking time of ``word`` (see the module docstring); 0 for bare punctuation."""
    weight = 0.0
    for ch in word:
        if _CJK.match(ch):
            weight += 3.0
        elif ch.isdigit():
            weight += 4.0
        elif ch.isalpha() or unicodedata.category(ch) == "Mn":
            weight += 1.0
    return weight + 1.0 if weight else 0.0


class _VoiceTrack:
    """Voice activity of a turn as its audio streams, decided hop by hop (nothing is recomputed).

    Keeps the voiced hops and the pauses found so far (as voiced-time positions); a hop's decision
    uses the loudest hop heard before it, and a click is taken back once its run ends.
    """

    def __init__(self) -> None:
        self.voiced_hops = np.zeros(1024, dtype=np.int64)
        self.count = 0  # voiced hops so far
        self.hops = 0  # hops so far
        self.pauses: list[float] = []
        self.nuclei: list[float] = []  # voiced-time positions of syllable nuclei (loudness peaks)
        self._peak = 0.0
        self._recent = [0.0, 0.0, 0.0]  # the last hops' levels (dB), smoothed before peak picking
        self._rising = True
        self._extreme = -200.0  # the highest level since the last valley, or the lowest since the peak
        self._run = 0  # the current voiced run, in hops
        self._silent = 0  # the current silence, in hops (before the current voiced run, if any)
        self._paused = False  # the current silence has its pause already

    def add(self, rms: np.ndarray) -> None:
        for value in rms.tolist():
            self._peak = max(self._peak, value)
            if value > max(FLOOR_RMS, self._peak * 10 ** (-RELATIVE_DB / 20)):
                self._voiced()
                self._loudness(20 * math.log10(value))
            else:
                self._silence()
                self._rising, self._extreme = True, -200.0
            self.hops += 1

    def _loudness(self, level_db: float) -> None:
        """Count syllable nuclei: loudness peaks that rise and fall NUCLEUS_DB around them."""
        self._recent = [*self._recent[1:], level_db]
        smooth = sum(self._recent) / 3
        if self._rising:
            if smooth > self._extreme:
                self._extreme = smooth
            elif smooth < self._extreme - NUCLEUS_DB:
                self.nuclei.append(self.count * HOP_S)
                self._rising, self._extreme = False, smooth
        elif smooth < self._extreme:
            self._extreme = smooth
        elif smooth > self._extreme + NUCLEUS_DB:
            self._rising, self._extreme = True, smooth

    def _voiced(self) -> None:
        if self.count == len(self.voiced_hops):
            self.voiced_hops = np.concatenate([self.voiced_hops, np.zeros_like(self.voiced_hops)])
        self.voiced_hops[self.count] = self.hops
        self.count += 1
        self._run += 1
        if self._run >= MIN_BLIP_HOPS:  # speech again: the next silence may be a new pause
            self._silent, self._paused = 0, False

    def _silence(self) -> None:
        if 0 < self._run < MIN_BLIP_HOPS and self.count > self._run:
            # a click inside a silence: take it back, the silence goes on through it
            self.count -= self._run
            self._silent += self._run
        elif self._run:
            self._silent = 0
        self._run = 0
        self._silent += 1
        if self._silent >= MIN_PAUSE_HOPS and self.count and not self._paused:
            self.pauses.append(self.count * HOP_S)
            self._paused = True

    @property
    def voiced(self) -> np.ndarray:
        return self.voiced_hops[: self.count]


class WordTimer:
    """Word timings of one turn; feed it the text sent to the speech engine and the audio it made.

    ``push_audio`` returns the words settled by that audio (each word once, in order, with start
    times never going back); after the speech ended by itself ``finish`` returns the rest with their
    final times, and ``words`` then holds every word's final timing. Not thread-safe. Each push
    costs the same however long the turn (tens of microseconds per 80 ms chunk).
    """

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._hop = max(1, round(sample_rate * HOP_S))
        self._rms: list[float] = []  # every hop's level, for the final alignment
        self._residual = np.zeros(0, dtype=np.float32)
        self._samples = 0
        self._track = _VoiceTrack()
        self.text = ""
        self._text_ended = False
        self._finished = False
        self._layout: tuple[list[tuple[int, int]], np.ndarray, list[bool]] | None = None
        self._anchors = [(0.0, 0.0)]  # (voiced s, weight) pinned at pauses while streaming
        self._anchored = 0  # pauses considered for anchors so far
        self._rate = PRIOR_RATE
        self._weight_per_syllable = PRIOR_RATE / 4  # of the text so far (set with the layout)
        self._settled: list[WordTiming] = []
        self._final: list[WordTiming] | None = None

    # ------------------------------------------------------------------ input

    def push_text(self, delta: str) -> None:
        if delta:
            self.text += delta
            self._layout = None

    def end_text(self) -> None:
        self._text_ended = True
        self._layout = None

    def push_audio(self, pcm: FloatArray) -> list[WordTiming]:
        """Add the turn's next audio (float32 mono at ``sample_rate``) -> words settled by it."""
        if self._finished:
            return []
        self._samples += len(pcm)
        samples = np.concatenate([self._residual, np.asarray(pcm, dtype=np.float32)])
        whole = len(samples) // self._hop * self._hop
        if whole:
            hops = samples[:whole].reshape(-1, self._hop).astype(np.float64)
            rms = np.sqrt(np.mean(hops * hops, axis=1))
            self._rms.extend(rms.tolist())
            self._track.add(rms)
        self._residual = samples[whole:]
        self._anchor_new_pauses()
        horizon = self._horizon()
        done = len(self._settled)
        if horizon < 0 or done >= len(self._word_layout()[0]):
            return []
        return self._settle(self._streaming_words(first=done, horizon=horizon), horizon)

    def finish(self) -> list[WordTiming]:
        """The speech ended by itself (all the text was spoken): the words not reported yet, final."""
        if self._finished:
            return []
        self._finished = True
        self.end_text()
        self._final = self._final_words()
        return self._settle(self._final[len(self._settled) :], math.inf)

    # ------------------------------------------------------------------ output

    @property
    def audio_s(self) -> float:
        return self._samples / self.sample_rate

    @property
    def words(self) -> list[WordTiming]:
        """The current best timing of every word of the text (the final one after ``finish``)."""
        if self._final is not None:
            return list(self._final)
        return self._streaming_words(first=0)

    def heard_words(self, heard_s: float, *, within: str | None = None) -> list[WordTiming]:
        """The words spoken by ``heard_s`` seconds, in order; with ``within`` (the text the speech
        engine says its kept audio covered), no more of the text than that."""
        return self.words[: self._heard_count(heard_s, within)[0]]

    def heard_text(self, heard_s: float, *, within: str | None = None) -> str:
        """The text of ``heard_words``, as written (spaces kept)."""
        return self.text[: self._heard_count(heard_s, within)[1]]

    def _heard_count(self, heard_s: float, within: str | None) -> tuple[int, int]:
        """(words heard, the character index in ``text`` just past the last of them)."""
        # compared without spaces: the engine's text is its tokens decoded, spacing may differ
        max_chars = None if within is None else len("".join(within.split()))
        count, end, chars = 0, 0, 0
        # While streaming the estimate is looser: claim a word only once it is safely past, by a
        # margin and at a slower rate than the best estimate.
        if self._final is not None:
            words, margin = self._final, 0.0
        else:
            words, margin = self._streaming_words(0, rate_scale=HEARD_RATE_SCALE), HEARD_MARGIN_S
        for word, (start, char_end) in zip(words, self._word_layout()[0], strict=False):
            chars += char_end - start
            if word.end_s > heard_s - margin + 1e-6 or (max_chars is not None and chars > max_chars):
                break
            count, end = count + 1, char_end
        if count and count == len(words) and self._text_ended:
            end = len(self.text)  # every word heard: the text as written, its trailing space too
        return count, end

    # ------------------------------------------------------------------ estimation

    def _word_layout(self) -> tuple[list[tuple[int, int]], np.ndarray, list[bool]]:
        """The complete words' spans (the last one waits for a space or the end of the text), the
        cumulative weight at each word's end, and whether each word ends a phrase."""
        if self._layout is None:
            spans = split_words(self.text)
            last = self.text[-1:] if self.text else ""
            if spans and not self._text_ended and spans[-1][1] == len(self.text) and not _CJK.match(last):
                spans.pop()
            words = [self.text[a:b] for a, b in spans]
            cumulative = np.cumsum([word_weight(w) for w in words]) if words else np.zeros(0)
            syllables = sum(word_syllables(w) for w in words)
            self._weight_per_syllable = float(cumulative[-1]) / syllables if syllables else PRIOR_RATE / 4
            self._layout = (spans, cumulative, [bool(_PHRASE_END.search(w)) for w in words])
        return self._layout

    def _rate_since(self, at_v: float, to_v: float) -> float:
        """The speaking rate (weight per voiced second) to use after the anchor at ``at_v``: the
        loudness peaks counted since then, worth the text's weight per syllable, shrunk towards the
        rate known before them (anchors, else the prior) by SYLLABLE_TRUST_S."""
        nuclei = self._track.nuclei
        if len(nuclei) < 2:  # no loudness structure (yet): nothing to count, keep the rate known
            return self._rate
        counted = len(nuclei) - bisect.bisect_right(nuclei, at_v + 1e-9)
        per_nucleus = self._weight_per_syllable * SYLLABLES_PER_NUCLEUS
        rate = (counted * per_nucleus + self._rate * SYLLABLE_TRUST_S) / (max(0.0, to_v - at_v) + SYLLABLE_TRUST_S)
        return min(max(rate, RATE_RANGE[0]), RATE_RANGE[1])

    def _anchor_new_pauses(self) -> None:
        """Tie each new pause to the word end nearest the rate model's estimate (one after
        punctuation preferred) and re-estimate the rate from the anchored span."""
        pauses = self._track.pauses
        if self._anchored == len(pauses):
            return
        _, cumulative, phrase_end = self._word_layout()
        penalty = np.where(phrase_end, 0.0, NO_PUNCTUATION_COST)
        known = float(cumulative[-1]) if len(cumulative) else 0.0
        for pause in pauses[self._anchored :]:
            at_v, at_w = self._anchors[-1]
            expected = at_w + (pause - at_v) * self._rate_since(at_v, pause)
            if not len(cumulative):
                continue
            cost = np.abs(cumulative - expected) + penalty
            cost[(cumulative <= at_w) | (cumulative > known)] = math.inf
            best = int(np.argmin(cost))
            if not cost[best] <= max(8.0, 0.5 * (expected - at_w)) + NO_PUNCTUATION_COST:
                continue  # no word end near: a hesitation the text does not mark
            self._anchors.append((pause, float(cumulative[best])))
            # re-estimate from everything anchored so far, shrunk towards the prior
            rate = (self._anchors[-1][1] + PRIOR_RATE * PRIOR_SECONDS) / (pause + PRIOR_SECONDS)
            self._rate = min(max(rate, RATE_RANGE[0]), RATE_RANGE[1])
        self._anchored = len(pauses)

    def _streaming_words(self, first: int, horizon: float = math.inf, rate_scale: float = 1.0) -> list[WordTiming]:
        """Words ``first``.. by the rate model through the anchors so far, extrapolated past them;
        only those ending by ``horizon``."""
        spans, cumulative, _ = self._word_layout()
        voiced = self._track.voiced
        rate = self._rate_since(self._anchors[-1][0], len(voiced) * HOP_S) * rate_scale
        return self._timings(spans, cumulative, self._anchors, rate, voiced, first, horizon)

    def _final_words(self) -> list[WordTiming]:
        """All the text over all the voiced audio, pauses matched to word ends by dynamic programming."""
        spans, cumulative, phrase_end = self._word_layout()
        if not spans:
            return []
        voiced = _voice_activity(np.asarray(self._rms))
        if not voiced.any():  # silence or constant noise: spread the words over the whole turn
            voiced = np.ones(len(self._rms), dtype=bool)
        total_v = float(voiced.sum()) * HOP_S
        total_w = float(cumulative[-1])
        if total_v <= 0 or total_w <= 0:
            return [WordTiming(self.text[a:b], 0.0, 0.0) for a, b in spans]
        anchors = [(0.0, 0.0)]
        pauses = [p for p in _pauses(voiced) if p < total_v - 1e-6]  # not the silence after the end
        for pause, k in _match_pauses(pauses, cumulative, phrase_end, total_w / total_v):
            anchors.append((pause, float(cumulative[k])))
        anchors.append((total_v, total_w))
        return self._timings(spans, cumulative, anchors, total_w / total_v, np.flatnonzero(voiced), 0)

    def _timings(
        self,
        spans: list[tuple[int, int]],
        cumulative: np.ndarray,
        anchors: list[tuple[float, float]],
        rate: float,
        voiced_hops: np.ndarray,
        first: int,
        horizon: float = math.inf,
    ) -> list[WordTiming]:
        """Words ``first``..: each word's weight span mapped to voiced time (piecewise linear through
        ``anchors``, at ``rate`` past the last), then to the clock: a start after a silence, an end
        before it. Only the leading words that end by ``horizon``."""
        if first >= len(spans):
            return []
        anchor_v = np.array([v for v, _ in anchors])
        anchor_w = np.array([w for _, w in anchors])
        ends_w = cumulative[first:]
        starts_w = np.concatenate([cumulative[first - 1 : first] if first else [0.0], cumulative[first:-1]])

        def to_voiced(weights: np.ndarray) -> np.ndarray:
            inside = np.interp(weights, anchor_w, anchor_v)
            beyond = anchor_v[-1] + (weights - anchor_w[-1]) / rate
            return np.where(weights > anchor_w[-1], beyond, inside)

        count = len(voiced_hops)
        voiced_s = count * HOP_S
        # past the voiced audio (words not spoken yet): after the audio made so far, at the same
        # rate; in the final alignment all the words are within the voiced audio
        last = len(self._rms) * HOP_S

        def to_clock(v: np.ndarray, *, start: bool) -> np.ndarray:
            if not count:
                return last + v
            if start:  # a start on a pause boundary is after the silence
                index = np.floor((v + 1e-9) / HOP_S).astype(np.int64)
                beyond = index >= count
            else:  # an end on a pause boundary is before it
                index = np.maximum(0, np.ceil((v - 1e-9) / HOP_S).astype(np.int64) - 1)
                beyond = v > voiced_s + 1e-9
            inside = voiced_hops[np.minimum(index, count - 1)] * HOP_S + (v - index * HOP_S)
            return np.where(beyond, last + (v - voiced_s), inside)

        starts = to_clock(to_voiced(starts_w), start=True)
        ends = np.maximum(starts, to_clock(to_voiced(ends_w), start=False))
        late = np.flatnonzero(ends > horizon)
        if len(late):
            starts, ends = starts[: late[0]], ends[: late[0]]
        return [
            WordTiming(self.text[a:b], round(float(start), 4), round(float(end), 4))
            for (a, b), start, end in zip(spans[first:], starts, ends, strict=False)
        ]

    def _settle(self, words: list[WordTiming], horizon: float) -> list[WordTiming]:
        """The leading ``words`` that end by ``horizon``, start times never before the last reported."""
        floor = self._settled[-1].start_s if self._settled else 0.0
        new = []
        for word in words:
            if word.end_s > horizon:
                break
            start = max(word.start_s, floor)
            new.append(WordTiming(word.word, start, max(word.end_s, start)))
            floor = start
        self._settled.extend(new)
        return new

    def _horizon(self) -> float:
        """Clock time before which estimates are firm: SETTLE_MARGIN_S of voiced time before the
        latest voiced audio (a word cannot end in audio not made yet)."""
        margin_hops = round(SETTLE_MARGIN_S / HOP_S)
        voiced = self._track.voiced
        if len(voiced) <= margin_hops:
            return -1.0
        return float(voiced[-1 - margin_hops] * HOP_S)


def _voice_activity(rms: np.ndarray) -> np.ndarray:
    """Voiced flags of every hop against the turn's loudest hop, clicks between silences removed."""
    peak = float(rms.max()) if len(rms) else 0.0
    voiced = rms > max(FLOOR_RMS, peak * 10 ** (-RELATIVE_DB / 20))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], voiced.astype(np.int8), [0]])))
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        if end - start < MIN_BLIP_HOPS and start > 0 and end < len(voiced):
            voiced[start:end] = False
    return voiced


def _pauses(voiced: np.ndarray) -> list[float]:
    """Voiced-time positions (s) of the silences of MIN_PAUSE_HOPS or more inside speech; a silence
    still running at the end counts once it is long enough."""
    if not voiced.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[1], voiced.astype(np.int8), [1]])))
    starts, ends = edges[::2], edges[1::2]  # silent runs [start, end)
    long_inside = (ends - starts >= MIN_PAUSE_HOPS) & (starts > np.argmax(voiced))
    voiced_before = np.cumsum(voiced)  # voiced hops up to and including each hop
    return [float(voiced_before[start - 1]) * HOP_S for start in starts[long_inside]]


def _match_pauses(
    pauses: list[float], cumulative: np.ndarray, phrase_end: list[bool], rate: float
) -> list[tuple[float, int]]:
    """Match pauses (voiced-time positions) to word ends, in order, at least cost -> (pause, word)."""
    ends = len(cumulative) - 1  # the last word's end is the end of the speech, not a pause
    if not pauses or ends <= 0:
        return []
    weights = cumulative[:ends]
    penalty = np.array([0.0 if p else NO_PUNCTUATION_COST for p in phrase_end[:ends]])
    # best[k + 1]: least cost so far with the last matched word end k (best[0]: none matched yet)
    best = np.concatenate([[0.0], np.full(ends, math.inf)])
    choices: list[np.ndarray] = []
    for pause in pauses:
        cost = np.abs(weights - pause * rate) + penalty
        before = np.minimum.accumulate(best[:-1])  # least cost with the last match before word k
        arg_before = _running_argmin(best[:-1])
        matched = before + cost
        unmatched = best + UNMATCHED_PAUSE_COST
        new = unmatched.copy()
        take = matched < new[1:]
        new[1:] = np.where(take, matched, new[1:])
        choices.append(np.where(np.concatenate([[False], take]), np.concatenate([[-1], arg_before]), -2))
        best = new
    # walk back from the cheapest final state
    state = int(np.argmin(best))
    matches: list[tuple[float, int]] = []
    for pause, choice in zip(reversed(pauses), reversed(choices), strict=True):
        previous = int(choice[state])
        if previous == -2:  # this pause stayed unmatched
            continue
        matches.append((pause, state - 1))
        state = previous
    return matches[::-1]


def _running_argmin(values: np.ndarray) -> np.ndarray:
    """An index of the minimum of values[:i + 1] for each i (the latest one on ties)."""
    at_minimum = values == np.minimum.accumulate(values)
    return np.maximum.accumulate(np.where(at_minimum, np.arange(len(values)), 0))
