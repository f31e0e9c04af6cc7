"""Speech recognition behind one small protocol: an OpenAI-compatible transcription endpoint, or
PocketSphinx offline.

No torch here. Both recognizers take float32 mono audio at any sample rate and return plain text;
every failure becomes :class:`moss_agent.errors.STTError`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moss_agent._optional import require
from moss_agent.audio import as_mono_float, float_to_pcm16, resample, wav_bytes
from moss_agent.errors import AudioError, STTError
from moss_agent.speech.sphinx_worker import DecoderProcess

logger = logging.getLogger(__name__)

__all__ = ["OpenAITranscriber", "PocketSphinxRecognizer", "SpeechRecognizer"]

# Both recognizers work on 16 kHz speech (Whisper resamples to it anyway), so uploads stay small.
RECOGNIZER_RATE = 16000
# One utterance is a turn of a conversation, seconds long. Minutes of audio are a mistake (a whole
# recording passed as one turn): PocketSphinx spends longer than the audio lasts on it, with no output
# until the end. Recognizers take ``max_seconds`` to change it.
MAX_UTTERANCE_SECONDS = 120.0


@runtime_checkable
class SpeechRecognizer(Protocol):
    """Turns one utterance into text."""

    async def transcribe(self, pcm: np.ndarray, sample_rate: int) -> str:
        """pcm: [T] float32 mono at ``sample_rate`` -> the words spoken ("" for silence or no audio)."""
        ...


def _prepare(pcm: np.ndarray, sample_rate: int, max_seconds: float | None) -> np.ndarray:
    """Validate and resample one utterance to 16 kHz: [T] -> [T'] float32. Raises STTError, also
    for an utterance longer than ``max_seconds``."""
    try:
        samples = as_mono_float(pcm, "audio to transcribe")
        seconds = (
            samples.size / sample_rate if isinstance(sample_rate, int | float) and sample_rate > 0 else 0.0
        )
        if max_seconds is not None and seconds > max_seconds:  # before resampling it all
            raise STTError(
                f"cannot transcribe {seconds:.1f} s of audio as one utterance: the recognizer takes at "
                f"most {max_seconds:g} s (its max_seconds); pass shorter turns"
            )
        return resample(samples, sample_rate, RECOGNIZER_RATE)
    except AudioError as exc:
        raise STTError(f"cannot transcribe this audio: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


class OpenAITranscriber:
    """Transcribe through ``POST {base_url}/audio/transcriptions`` (OpenAI, or any compatible server).

    The utterance is sent as a 16 kHz PCM16 wav built in memory. ``language`` is an ISO-639-1 hint
    such as "en"; ``prompt`` biases the vocabulary. ``base_url`` is explicit (for OpenAI itself:
    "https://api.openai.com/v1") so that nothing is read from the environment. Longer utterances
    than ``max_seconds`` (None: any) are refused. Requires the ``llm`` extra (the openai package).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str = "whisper-1",
        language: str | None = None,
        timeout: float = 30.0,
        *,
        prompt: str | None = None,
        max_retries: int = 1,
        max_seconds: float | None = MAX_UTTERANCE_SECONDS,
    ) -> None:
        openai = require("openai", "llm")
        if timeout <= 0:
            raise STTError(f"timeout must be positive seconds, got {timeout}")
        self.max_seconds = max_seconds
        self.model = model
        self.language = language
        self.prompt = prompt
        self.base_url = base_url
        self._openai = openai
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )

    async def transcribe(self, pcm: np.ndarray, sample_rate: int) -> str:
        audio = _prepare(pcm, sample_rate, self.max_seconds)
        if audio.size == 0:
            return ""
        upload = await asyncio.to_thread(wav_bytes, audio, RECOGNIZER_RATE)
        options: dict[str, Any] = {"model": self.model, "file": ("speech.wav", upload, "audio/wav")}
        if self.language:
            options["language"] = self.language
        if self.prompt:
            options["prompt"] = self.prompt
        where = self.base_url
        openai = self._openai
        try:
            result = await self._client.audio.transcriptions.create(response_format="json", **options)
        except openai.APITimeoutError as exc:
            raise STTError(
                f"transcription request to {where} timed out; raise timeout or check the server"
            ) from exc
        except openai.APIConnectionError as exc:
            raise STTError(
                f"cannot reach the transcription endpoint at {where}: {exc}; is the server running?"
            ) from exc
        except openai.AuthenticationError as exc:
            raise STTError(
                f"the transcription endpoint at {where} rejected the API key: {exc.message}"
            ) from exc
        except openai.APIStatusError as exc:
            raise STTError(
                f"transcription with model {self.model!r} failed at {where} (HTTP {exc.status_code}): {exc.message}"
            ) from exc
        except openai.OpenAIError as exc:
            raise STTError(f"transcription at {where} failed: {exc}") from exc
        text = result if isinstance(result, str) else getattr(result, "text", None)
        if not isinstance(text, str):
            raise STTError(f"the transcription endpoint at {where} returned no text: {result!r}")
        logger.debug(
            "utterance transcribed", extra={"audio_s": audio.size / RECOGNIZER_RATE, "chars": len(text)}
        )
        return text.strip()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()


# --------------------------------------------------------------------------------------------------
# PocketSphinx (offline)

# Digital silence (exact zeros) has no counterpart in the acoustic model's training audio and throws
# the feature normalisation off: long zero padding makes grammar search miss its final state. A
# quiet room's noise floor (about -60 dBFS), seeded so results repeat, avoids that.
_NOISE_FLOOR = 1e-3
_DEFAULT_KEYPHRASE_THRESHOLD = 1e-20
_WORD = re.compile(r"[a-z']+")


class PocketSphinxRecognizer:
    """Offline recognition with PocketSphinx's bundled US English model.

    - ``grammar``: the utterance must be one of these phrases (list), or follow this JSGF grammar
      (a string starting with ``#JSGF``). Exact on clear speech.
    - ``keyphrases``: spot these phrases anywhere in the utterance (list, or phrase -> detection
      threshold, 1e-50 sensitive .. 1e-5 strict); the result lists the spotted phrases in order.
    - neither: free dictation with the general language model (weak; fine for "did they say
      something").

    Loading the model takes about a second, so construct it off the event loop. Decoding runs in a
    worker thread; one decoder serves calls one at a time. Free dictation decodes in a child process
    (``sphinx_worker``): its search holds the GIL for seconds, which would stall the event loop and
    every transport's audio clock; ``close()`` ends the child (garbage collection and exit do too).
    Utterances longer than ``max_seconds`` (None: any) are refused.
    """

    def __init__(
        self,
        grammar: Sequence[str] | str | None = None,
        keyphrases: Sequence[str] | Mapping[str, float] | None = None,
        *,
        max_seconds: float | None = MAX_UTTERANCE_SECONDS,
    ) -> None:
        self.max_seconds = max_seconds
        if grammar is not None and keyphrases is not None:
            raise STTError("give either a grammar or keyphrases to PocketSphinxRecognizer, not both")
        # Cheap checks first, so a typo fails before the model loads.
        jsgf = _grammar_source(grammar) if grammar is not None else None
        spotting = _keyphrase_thresholds(keyphrases) if keyphrases is not None else None
        pocketsphinx = require("pocketsphinx", "stt")
        self._lock = threading.Lock()
        self._process: DecoderProcess | None = None
        if jsgf is None and spotting is None:
            try:
                self._process = DecoderProcess()
            except (OSError, RuntimeError) as exc:
                raise STTError(f"could not start PocketSphinx: {exc}") from exc
            return
        try:
            self._decoder = pocketsphinx.Decoder(samprate=RECOGNIZER_RATE, loglevel="FATAL")
        except (RuntimeError, ValueError) as exc:
            raise STTError(f"could not load the PocketSphinx English model: {exc}") from exc
        if jsgf is not None:
            self._use_grammar(jsgf)
        elif spotting is not None:
            self._use_keyphrases(spotting)

    async def transcribe(self, pcm: np.ndarray, sample_rate: int) -> str:
        audio = _prepare(pcm, sample_rate, self.max_seconds)
        if audio.size == 0:
            return ""
        return await asyncio.to_thread(self._decode, audio)

    def _decode(self, audio: np.ndarray) -> str:
        floor = np.random.default_rng(0).standard_normal(audio.shape[0], dtype=np.float32)
        raw = float_to_pcm16(audio + _NOISE_FLOOR * floor).tobytes()
        with self._lock:
            if self._process is not None:
                try:
                    return " ".join(self._process.decode(raw).split())
                except RuntimeError as exc:
                    raise STTError(str(exc)) from exc
            try:
                self._decoder.start_utt()
                self._decoder.process_raw(raw, full_utt=True)
                self._decoder.end_utt()
                hypothesis = self._decoder.hyp()
            except RuntimeError as exc:
                raise STTError(f"PocketSphinx failed to decode the utterance: {exc}") from exc
        if hypothesis is None:
            return ""
        return " ".join(hypothesis.hypstr.split())

    def close(self) -> None:
        """End the free-dictation child process, if any (a later utterance starts a new one)."""
        if self._process is not None:
            self._process.close()

    def _use_grammar(self, jsgf: str | list[list[str]]) -> None:
        if isinstance(jsgf, list):
            self._check_dictionary(jsgf, "grammar")
            jsgf = (
                "#JSGF V1.0;\ngrammar phrases;\npublic <phrase> = " + " | ".join(map(" ".join, jsgf)) + ";\n"
            )
        try:
            self._decoder.add_jsgf_string("grammar", jsgf)
            self._decoder.activate_search("grammar")
        except (ValueError, RuntimeError, KeyError) as exc:
            raise STTError(
                f"PocketSphinx rejected the grammar ({exc}); check its syntax and that every word is in "
                "the English pronunciation dictionary"
            ) from exc

    def _use_keyphrases(self, thresholds: list[tuple[list[str], float]]) -> None:
        self._check_dictionary([words for words, _ in thresholds], "keyphrases")
        lines = "".join(f"{' '.join(words)} /{threshold:.0e}/\n" for words, threshold in thresholds)
        with tempfile.TemporaryDirectory(prefix="moss_kws_") as folder:
            path = Path(folder) / "keyphrases.txt"
            path.write_text(lines)
            try:
                self._decoder.add_kws("keyphrases", str(path))
                self._decoder.activate_search("keyphrases")
            except (ValueError, RuntimeError, KeyError) as exc:
                raise STTError(f"PocketSphinx rejected the keyphrases: {exc}") from exc

    def _check_dictionary(self, phrases: list[list[str]], what: str) -> None:
        unknown = sorted({w for words in phrases for w in words if self._decoder.lookup_word(w) is None})
        if unknown:
            raise STTError(
                f"{what} use words missing from the PocketSphinx English dictionary: {', '.join(unknown)}; "
                "spell them as ordinary English words"
            )


def _grammar_source(grammar: Sequence[str] | str) -> str | list[list[str]]:
    """A JSGF string as given, or the phrases of a list as lower-case words."""
    if isinstance(grammar, str):
        if not grammar.lstrip().startswith("#JSGF"):
            raise STTError(
                "a grammar string must be JSGF (starting with '#JSGF V1.0;'); pass a list of phrases "
                "to accept exactly those"
            )
        return grammar
    return _phrase_words(grammar, "grammar")


def _keyphrase_thresholds(keyphrases: Sequence[str] | Mapping[str, float]) -> list[tuple[list[str], float]]:
    if isinstance(keyphrases, str):
        keyphrases = [keyphrases]
    thresholds = (
        dict(keyphrases)
        if isinstance(keyphrases, Mapping)
        else dict.fromkeys(keyphrases, _DEFAULT_KEYPHRASE_THRESHOLD)
    )
    words = _phrase_words(list(thresholds), "keyphrases")
    for phrase, threshold in thresholds.items():
        if not 0.0 < threshold < 1.0:
            raise STTError(f"keyphrase threshold for {phrase!r} must be in (0, 1), got {threshold}")
    return list(zip(words, thresholds.values(), strict=True))


def _phrase_words(phrases: Sequence[str], what: str) -> list[list[str]]:
    """Each phrase as lower-case words (punctuation dropped)."""
    cleaned = []
    for phrase in phrases:
        words = _WORD.findall(phrase.lower())
        if not words:
            raise STTError(f"{what} contains an empty phrase: {phrase!r}")
        cleaned.append(words)
    if not cleaned:
        raise STTError(f"{what} must list at least one phrase")
    return cleaned
