"""Speech recognition end to end: espeak-ng speech recognised by PocketSphinx, and the OpenAI-compatible
transcriber talking HTTP to a local fake server that runs PocketSphinx on the uploaded wav."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from system_requirements import ESPEAK_NG, requires

pytest.importorskip("pocketsphinx", reason="the [stt] extra (pocketsphinx) is not installed")
pytest.importorskip("openai", reason="the [llm] extra (openai) is not installed")

from moss_agent.errors import STTError
from moss_agent.speech.stt import OpenAITranscriber, PocketSphinxRecognizer, SpeechRecognizer
from moss_agent.testing.openai_server import FakeOpenAIServer
from moss_agent.testing.speech import silence, synthesize_speech

PHRASES = [
    "turn on the kitchen light",
    "open the front door",
    "close the window",
    "what time is it",
    "play some music",
    "stop",
]

needs_espeak = requires(ESPEAK_NG)


def _utterance(
    text: str, rate: int = 24000, *, pad_s: float = 0.5, words_per_minute: int = 150
) -> np.ndarray:
    speech = synthesize_speech(text, rate, rate=words_per_minute)
    return np.concatenate([silence(pad_s, rate), speech, silence(pad_s, rate)])


@pytest.fixture(scope="module")
def grammar_recognizer() -> PocketSphinxRecognizer:
    return PocketSphinxRecognizer(grammar=PHRASES)


# ------------------------------------------------------------------------------------ PocketSphinx


@needs_espeak
@pytest.mark.parametrize("words_per_minute", [130, 170])
async def test_grammar_recognises_every_phrase_exactly(
    grammar_recognizer: PocketSphinxRecognizer, words_per_minute: int
) -> None:
    assert isinstance(grammar_recognizer, SpeechRecognizer)
    for phrase in PHRASES:
        heard = await grammar_recognizer.transcribe(
            _utterance(phrase, words_per_minute=words_per_minute), 24000
        )
        assert heard == phrase


@needs_espeak
@pytest.mark.parametrize("rate", [8000, 16000, 44100])
async def test_any_input_rate_and_long_silence_padding(
    grammar_recognizer: PocketSphinxRecognizer, rate: int
) -> None:
    clip = _utterance("open the front door", rate, pad_s=1.5)
    assert await grammar_recognizer.transcribe(clip, rate) == "open the front door"


@needs_espeak
async def test_jsgf_grammar_string() -> None:
    jsgf = (
        "#JSGF V1.0;\ngrammar rooms;\n"
        "public <command> = (turn on | turn off) the <room> light;\n"
        "<room> = kitchen | bedroom | garden;\n"
    )
    recognizer = await asyncio.to_thread(PocketSphinxRecognizer, jsgf)
    assert (
        await recognizer.transcribe(_utterance("turn on the garden light"), 24000)
        == "turn on the garden light"
    )


@needs_espeak
async def test_keyphrases_are_spotted_in_order() -> None:
    recognizer = await asyncio.to_thread(PocketSphinxRecognizer, None, ["kitchen light", "front door"])
    heard = await recognizer.transcribe(
        _utterance("please open the front door and turn on the kitchen light"), 24000
    )
    assert heard == "front door kitchen light"
    assert await recognizer.transcribe(_utterance("what a lovely day it is"), 24000) == ""


@needs_espeak
async def test_free_recognition_hears_something() -> None:
    recognizer = await asyncio.to_thread(PocketSphinxRecognizer)
    assert (await recognizer.transcribe(_utterance("hello world", pad_s=0.2), 24000)).strip()


async def test_empty_audio_is_no_words(grammar_recognizer: PocketSphinxRecognizer) -> None:
    assert await grammar_recognizer.transcribe(np.zeros(0, dtype=np.float32), 24000) == ""


@pytest.mark.parametrize(
    ("pcm", "rate", "message"),
    [
        (np.zeros((2, 1600), dtype=np.float32), 16000, "shape"),
        (np.zeros(1600, dtype=np.int16), 16000, "pcm16_to_float"),
        (np.full(1600, np.nan, dtype=np.float32), 16000, "NaN"),
        (np.zeros(1600, dtype=np.float32), 0, "sample rate"),
    ],
)
async def test_bad_audio_raises_stt_error(
    grammar_recognizer: PocketSphinxRecognizer, pcm: np.ndarray, rate: int, message: str
) -> None:
    with pytest.raises(STTError, match=message):
        await grammar_recognizer.transcribe(pcm, rate)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grammar": ["open the flurbnixed door"]}, "flurbnixed"),
        ({"grammar": "open | close"}, "JSGF"),
        ({"grammar": "#JSGF V1.0;\ngrammar broken;\npublic <a> = ( open ;\n"}, "rejected the grammar"),
        ({"grammar": []}, "at least one phrase"),
        ({"keyphrases": {"front door": 2.0}}, "threshold"),
        ({"grammar": ["stop"], "keyphrases": ["stop"]}, "not both"),
    ],
)
def test_bad_configuration_raises_stt_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(STTError, match=message):
        PocketSphinxRecognizer(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- OpenAI protocol


@needs_espeak
async def test_openai_transcriber_against_local_server(grammar_recognizer: PocketSphinxRecognizer) -> None:
    clip = _utterance("what time is it", 24000)
    async with FakeOpenAIServer(transcribe=grammar_recognizer.transcribe) as server:
        transcriber = OpenAITranscriber(server.base_url, api_key="test-key", language="en", max_retries=0)
        try:
            assert isinstance(transcriber, SpeechRecognizer)
            assert await transcriber.transcribe(clip, 24000) == "what time is it"
        finally:
            await transcriber.aclose()
    ((uploaded, text),) = server.transcriptions
    assert text == "what time is it"
    assert abs(len(uploaded) / server.transcribe_rate - len(clip) / 24000) < 0.01


async def test_openai_transcriber_server_down_raises_stt_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transcriber = OpenAITranscriber(
        f"http://127.0.0.1:{port}/v1", api_key="test-key", timeout=5.0, max_retries=0
    )
    with pytest.raises(STTError, match="cannot reach"):
        await transcriber.transcribe(np.zeros(1600, dtype=np.float32), 16000)
    await transcriber.aclose()


async def test_openai_transcriber_server_error_raises_stt_error() -> None:
    def broken(pcm: np.ndarray, rate: int) -> str:
        raise RuntimeError("recognizer crashed")

    async with FakeOpenAIServer(transcribe=broken) as server:
        transcriber = OpenAITranscriber(server.base_url, api_key="test-key", max_retries=0)
        with pytest.raises(STTError, match="HTTP 500"):
            await transcriber.transcribe(np.zeros(1600, dtype=np.float32), 16000)
        await transcriber.aclose()


async def test_openai_transcriber_timeout_raises_stt_error() -> None:
    async def slow(pcm: np.ndarray, rate: int) -> str:
        await asyncio.sleep(30)
        return "too late"

    async with FakeOpenAIServer(transcribe=slow) as server:
        transcriber = OpenAITranscriber(server.base_url, api_key="test-key", timeout=0.5, max_retries=0)
        with pytest.raises(STTError, match="timed out"):
            await transcriber.transcribe(np.zeros(1600, dtype=np.float32), 16000)
        await transcriber.aclose()


@needs_espeak
async def test_free_recognition_runs_in_a_child_process_that_is_replaced_when_it_dies() -> None:
    # Free dictation holds the GIL for seconds per utterance; in a child it cannot stall the event loop.
    recognizer = await asyncio.to_thread(PocketSphinxRecognizer)
    child = recognizer._process._process  # type: ignore[union-attr]
    assert child is not None and child.poll() is None
    child.kill()
    await asyncio.to_thread(child.wait)
    assert (await recognizer.transcribe(_utterance("hello world", pad_s=0.2), 24000)).strip()
    replacement = recognizer._process._process  # type: ignore[union-attr]
    assert replacement is not None and replacement.pid != child.pid
    recognizer.close()
    assert replacement.poll() is not None
