"""Make intelligible test speech offline with the espeak-ng synthesizer (Debian package ``espeak-ng``).

Used by tests of voice activity detection and speech recognition, and by users who want to feed
their own agents a known utterance without a microphone.

:func:`synthesize_timed_speech` also says when each word is spoken, from espeak-ng's own word events
(its library, ``libespeak-ng.so.1`` from the Debian package ``libespeak-ng1``, through ctypes): ground
truth for word-timing estimates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moss_agent.audio import load_audio, resample
from moss_agent.errors import ConfigError

__all__ = [
    "ESPEAK_LIBRARY_MISSING_REASON",
    "ESPEAK_MISSING_REASON",
    "SpokenWord",
    "TimedSpeech",
    "espeak_ng_library_path",
    "espeak_ng_path",
    "silence",
    "synthesize_speech",
    "synthesize_timed_speech",
]

ESPEAK_MISSING_REASON = "espeak-ng is not installed (apt-get install espeak-ng) to synthesize test speech"
ESPEAK_LIBRARY_MISSING_REASON = (
    "the espeak-ng library libespeak-ng.so.1 is not installed (apt-get install libespeak-ng1) "
    "to synthesize speech with word timings"
)


def espeak_ng_path() -> str | None:
    """Path of the espeak-ng binary, or None when it is not installed."""
    return shutil.which("espeak-ng")


def synthesize_speech(
    text: str,
    sample_rate: int = 24000,
    voice: str = "en-us",
    rate: int = 150,
    *,
    timeout_s: float = 30.0,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng: returns float32 mono [T] at ``sample_rate``.

    ``rate`` is in words per minute (espeak-ng's ``-s``; 80-450). Raises ConfigError when espeak-ng
    is missing or rejects the arguments (e.g. an unknown voice).
    """
    binary = espeak_ng_path()
    if binary is None:
        raise ConfigError(ESPEAK_MISSING_REASON)
    if not text.strip():
        raise ConfigError("synthesize_speech needs some text to speak")
    with tempfile.TemporaryDirectory(prefix="moss_espeak_") as folder:
        wav = Path(folder) / "speech.wav"
        # "--" keeps text that starts with a dash from being read as an option.
        command = [binary, "-v", voice, "-s", str(int(rate)), "-w", str(wav), "--", text]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ConfigError(f"espeak-ng did not finish within {timeout_s} s") from exc
        if result.returncode != 0 or not wav.exists() or wav.stat().st_size <= 44:
            raise ConfigError(
                f"espeak-ng failed for voice {voice!r} (exit {result.returncode}): {result.stderr.strip()}"
            )
        return load_audio(wav, sample_rate)


def silence(seconds: float, sample_rate: int = 24000) -> np.ndarray:
    """float32 zeros [round(seconds * sample_rate)], for padding speech."""
    return np.zeros(round(seconds * sample_rate), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# speech with word timings, from espeak-ng's library


@dataclass(frozen=True, slots=True)
class SpokenWord:
    """One whitespace-separated word of the text, as written (punctuation attached), and when it is
    spoken, in seconds from the first sample.

    ``start_s`` is espeak-ng's word event: the onset of the word's first phoneme (the closure of an
    initial stop counts; a pause before the word does not). ``end_s`` is the end of voiced audio
    (energy above -55 dBFS in 5 ms frames) between the word's start and the next timed word's start,
    so a pause after the word is not part of it; for the last word, the end of all voiced audio.
    espeak sometimes speaks words without a word event of their own (it reads "has not" as one unit;
    a lone dash is silent): such a word has ``start_s`` None, and the word before it ``end_s`` None,
    as only the end of the group is known (it is the group's last word's ``end_s``).
    ``char_start``/``char_end`` index ``text``.
    """

    word: str
    start_s: float | None
    end_s: float | None
    char_start: int
    char_end: int


@dataclass(frozen=True, slots=True)
class TimedSpeech:
    """``audio``: float32 mono [T] at ``sample_rate``; ``words``: every word of ``text`` in order."""

    text: str
    audio: np.ndarray
    sample_rate: int
    words: tuple[SpokenWord, ...]

    @property
    def duration_s(self) -> float:
        return self.audio.shape[0] / self.sample_rate


# speak_lib.h (espeak-ng 1.51; stable since espeak 1.48). The header is not installed here: the layout
# below was checked by synthesis (word events land on the words' text positions and voicing onsets).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMETER_RATE = 1
_EE_OK = 0
_RATE_RANGE = (80, 450)  # words per minute, espeak-ng's documented range (as for its -s option)
_VOICED_DBFS = -55.0  # espeak pauses are digital zeros; a phoneme's quietest 5 ms stay above this
_VOICED_FRAME_S = 0.005


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """espeak_EVENT. ``text_position`` counts characters from 1; ``sample`` is the exact output
    sample of the event (``audio_position`` is the same in whole milliseconds)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


class _Espeak:
    """The loaded library. espeak-ng keeps all its state in globals and is not thread-safe, so the
    process has one instance and every synthesis holds its lock from voice choice to the last event."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.lock = threading.Lock()
        library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        library.espeak_Initialize.restype = ctypes.c_int
        library.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        library.espeak_SetSynthCallback.restype = None
        library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        library.espeak_SetVoiceByName.restype = ctypes.c_int
        library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        library.espeak_SetParameter.restype = ctypes.c_int
        library.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        library.espeak_Synth.restype = ctypes.c_int
        self.library = library
        # Synchronous mode: espeak_Synth returns once the whole text is spoken, calling back on this
        # thread with each buffer of samples and the events that fall in it.
        self.sample_rate = int(library.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0))
        if self.sample_rate <= 0:
            raise ConfigError(
                f"espeak-ng failed to initialise (code {self.sample_rate}); is espeak-ng-data installed?"
            )
        self._chunks: list[bytes] = []
        self._events: list[tuple[int, int, int]] = []  # (text_position from 1, length, sample)
        # The library holds a raw pointer to the callback: it must live as long as the process.
        self._callback = _SynthCallback(self._on_synth)
        library.espeak_SetSynthCallback(self._callback)

    def _on_synth(
        self, wav: ctypes._Pointer[ctypes.c_short], count: int, events: ctypes._Pointer[_Event]
    ) -> int:
        if wav and count > 0:
            self._chunks.append(ctypes.string_at(wav, count * 2))
        index = 0
        while events and events[index].type != _EVENT_LIST_TERMINATED:
            event = events[index]
            # Zero-length word events appear after the last word, pointing back into the text; they
            # name no word.
            if event.type == _EVENT_WORD and event.length > 0:
                self._events.append((event.text_position, event.length, event.sample))
            index += 1
        return 0  # 0 = continue

    def synthesize(self, text: str, voice: str, rate: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """int16 samples [T] at ``sample_rate`` and the word events (text_position, length, sample)."""
        with self.lock:
            self._chunks, self._events = [], []
            if self.library.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ConfigError(f"espeak-ng has no voice {voice!r} (espeak-ng --voices lists them)")
            self.library.espeak_SetParameter(_PARAMETER_RATE, int(rate), 0)
            data = text.encode("utf-8") + b"\0"
            code = self.library.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if code != _EE_OK:
                raise ConfigError(f"espeak-ng could not synthesize the text (espeak_Synth returned {code})")
            pcm = np.frombuffer(b"".join(self._chunks), dtype="<i2").copy()
            events = self._events
            self._chunks, self._events = [], []
        return pcm, events


_espeak: _Espeak | None = None
_espeak_guard = threading.Lock()


def espeak_ng_library_path() -> str | None:
    """The espeak-ng library's name as the loader finds it, or None when it is not installed."""
    for name in ("libespeak-ng.so.1", ctypes.util.find_library("espeak-ng")):
        if name is None:
            continue
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    return None


def _library() -> _Espeak:
    global _espeak
    with _espeak_guard:
        if _espeak is None:
            name = espeak_ng_library_path()
            if name is None:
                raise ConfigError(ESPEAK_LIBRARY_MISSING_REASON)
            _espeak = _Espeak(ctypes.CDLL(name))
        return _espeak


def synthesize_timed_speech(
    text: str, sample_rate: int = 24000, voice: str = "en-us", rate: int = 150
) -> TimedSpeech:
    """Speak ``text`` with espeak-ng's library and say when each word is spoken (see SpokenWord).

    ``rate`` is in words per minute (80-450). Thread-safe (syntheses take turns). Raises ConfigError
    when the library is missing, the voice is unknown, the rate is out of range or there is no text.

    espeak-ng carries a little state from one synthesis to the next in a process (the same text may
    come out a few ms longer, or its first words tens of ms later, after another text): the timings
    always describe the audio returned with them, and a fixed sequence of calls repeats exactly.
    (Restarting the library between calls, espeak_Terminate then espeak_Initialize, hangs.)
    """
    if not text.strip():
        raise ConfigError("synthesize_timed_speech needs some text to speak")
    if not _RATE_RANGE[0] <= rate <= _RATE_RANGE[1]:
        raise ConfigError(f"rate must be {_RATE_RANGE[0]}-{_RATE_RANGE[1]} words per minute, got {rate}")
    espeak = _library()
    pcm, events = espeak.synthesize(text, voice, rate)
    native = espeak.sample_rate
    if pcm.size == 0:
        raise ConfigError(f"espeak-ng produced no audio for voice {voice!r}")
    voiced = _voiced_frames(pcm, native)
    frame = round(_VOICED_FRAME_S * native)
    spans = _word_spans(text)
    starts: list[int | None] = []
    for char_start, char_end in spans:
        # espeak may split a written word into several events ("42" -> "forty", "two"; "10:30"):
        # the word starts at the first one that begins inside it.
        inside = [sample for position, _, sample in events if char_start <= position - 1 < char_end]
        starts.append(min(inside) if inside else None)
    last = -1
    for index, start in enumerate(starts):
        if start is not None and start < last:
            starts[index] = None  # out of order: espeak attached it to another word; no known time
        elif start is not None:
            last = start
    voiced_end = int(np.flatnonzero(voiced)[-1] + 1) * frame if voiced.any() else pcm.size
    ends: list[int | None] = [None] * len(spans)
    timed = [index for index, start in enumerate(starts) if start is not None]
    for number, index in enumerate(timed):
        start = starts[index]
        assert start is not None
        following = starts[timed[number + 1]] if number + 1 < len(timed) else None
        end = voiced_end if following is None else _voiced_end(voiced, frame, start, following)
        # A word espeak merged into this one ("has not" is one event) is spoken inside the same
        # span: only the group's end is known, and it belongs to its last word.
        last = timed[number + 1] - 1 if number + 1 < len(timed) else len(spans) - 1
        ends[last] = max(end, start)
    words = tuple(
        SpokenWord(
            text[char_start:char_end],
            None if start is None else start / native,
            None if end is None else end / native,
            char_start,
            char_end,
        )
        for (char_start, char_end), start, end in zip(spans, starts, ends, strict=True)
    )
    audio = resample(pcm.astype(np.float32) / np.float32(32768.0), native, sample_rate)
    return TimedSpeech(text=text, audio=audio, sample_rate=sample_rate, words=words)


def _word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character indices of each whitespace-separated word."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for index, char in enumerate(text):
        if char.isspace():
            if start is not None:
                spans.append((start, index))
                start = None
        elif start is None:
            start = index
    if start is not None:
        spans.append((start, len(text)))
    return spans


def _voiced_frames(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """bool [ceil(T / frame)]: 5 ms frames whose RMS is above _VOICED_DBFS."""
    frame = round(_VOICED_FRAME_S * sample_rate)
    count = -(-pcm.size // frame)
    padded = np.zeros(count * frame, dtype=np.float64)
    padded[: pcm.size] = pcm / 32768.0
    rms = np.sqrt(np.mean(padded.reshape(count, frame) ** 2, axis=1))
    return rms > 10.0 ** (_VOICED_DBFS / 20.0)


def _voiced_end(voiced: np.ndarray, frame: int, start: int, following: int) -> int:
    """The sample where voiced audio last ends in [start, following): the word's end without the
    pause after it; ``following`` when the word runs into the next one or nothing is voiced."""
    # Only frames wholly before the next word count: the frame that holds its onset is voiced by it.
    first, stop = start // frame, following // frame
    hits = np.flatnonzero(voiced[first:stop])
    if hits.size == 0 or first + int(hits[-1]) + 1 >= stop:
        return following
    return (first + int(hits[-1]) + 1) * frame
