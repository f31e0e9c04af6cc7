"""BatchEngine on tiny checkpoints: every request kind, streaming, batch == single, long-text
splitting and stitching, reference encoding with the codec, clear errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from moss_agent.audio import resample, write_wav
from moss_agent.engine.batch import BatchEngine, Waveform
from moss_agent.engine.stitch import split_dialogue, split_text, stitch
from moss_agent.errors import ConfigError
from moss_agent.models.codec import load_codec
from moss_agent.models.delay.requests import DialogueRequest, SoundEffectRequest, TTSRequest
from moss_agent.models.delay.tiny import save_tiny_delay
from moss_agent.models.tts_loading import load_tts

RATE = 24000


@pytest.fixture(scope="module")
def delay_dir(tmp_path_factory) -> Path:
    """Tiny Delay model with the tiny codec's 16 x 1024 codebooks whose text channel follows the script."""
    return save_tiny_delay(tmp_path_factory.mktemp("delay16"), n_vq=16, seed=1, scripted_frames=6)


@pytest.fixture(scope="module")
def engine(delay_dir, tiny_codec_dir) -> BatchEngine:
    tts = load_tts(delay_dir, device="cpu", dtype="float32")
    codec = load_codec(tiny_codec_dir, device="cpu", dtype="float32")
    return BatchEngine(tts, codec, max_chars=40, max_new_tokens=40)


def tone(seconds: float, rate: int = RATE, freq: float = 220.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def greedy(engine: BatchEngine, kind: str = "tts"):
    return engine.default_params(kind).greedy()


def expected_samples(engine: BatchEngine, request) -> int:
    """Generate the same single piece directly on the model: its frames after the prompt, in samples."""
    [sample] = engine.tts.generate(
        [request], params=greedy(engine), max_new_tokens=engine._row_budget(request)
    )
    frames = sum(len(s) for s in sample.segments) - sample.prompt_frames
    return frames * engine.codec.frame_size


def test_each_kind_gives_audio_of_the_generated_length(engine):
    voice = Waveform(tone(0.5, 16000), 16000)
    requests = [
        {"kind": "tts", "text": "Hello there.", "reference": voice},
        {"kind": "voice_design", "instruction": "a calm low voice", "text": "Good evening."},
        {"kind": "sfx", "description": "rain on a tin roof", "duration_s": 1.0},
        {"kind": "dialogue", "script": "[S1] hi. [S2] hello.", "references": [voice, None]},
    ]
    results = engine.generate(requests, params=greedy(engine), progress=False)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.kind for r in results] == ["tts", "voice_design", "sfx", "dialogue"]
    for result, item in zip(results, requests, strict=True):
        request = engine.request(**item)
        assert result.sample_rate == RATE and result.pcm.dtype == np.float32
        assert len(result.pcm) == result.frames * engine.codec.frame_size > 0
        assert len(result.pcm) == expected_samples(engine, request)


def test_continuation_prompt_is_trimmed_from_the_decoded_segment(engine):
    voice = engine.encode_audio(tone(0.4))
    request = DialogueRequest("[S1] hi there.", references=[voice])
    [sample] = engine.tts.generate([request], params=greedy(engine), max_new_tokens=30)
    assert sample.prompt_frames == len(voice)
    [pcm] = engine.decode([sample])
    whole, _ = engine.codec.decode(sample.segments[0].T[:, None])
    frame = engine.codec.frame_size
    assert len(pcm) == (len(sample.segments[0]) - len(voice)) * frame
    np.testing.assert_allclose(pcm, whole[0, 0, len(voice) * frame :].numpy(), atol=1e-5)


def test_stream_yields_every_request_once(engine):
    requests = [TTSRequest(f"Sentence number {k}.") for k in range(5)]
    stream = engine.stream(requests, batch_size=2, progress=False, seed=3)
    assert iter(stream) is stream
    results = list(stream)
    assert sorted(r.index for r in results) == [0, 1, 2, 3, 4]
    assert all(len(r.pcm) == r.frames * engine.codec.frame_size for r in results)


def test_greedy_batch_equals_single(engine):
    texts = ["Short one.", "A somewhat longer sentence here.", "Mid length text."]
    requests = [{"text": t} for t in texts]
    batched = engine.generate(requests, batch_size=3, params=greedy(engine), progress=False)
    for index, request in enumerate(requests):
        [alone] = engine.generate([request], batch_size=1, params=greedy(engine), progress=False)
        assert alone.frames == batched[index].frames
        np.testing.assert_allclose(alone.pcm, batched[index].pcm, atol=1e-5)


def test_seeded_sampling_repeats(engine):
    requests = [{"text": "One two three."}, {"kind": "sfx", "description": "wind"}]
    first = engine.generate(requests, seed=11, progress=False)
    again = engine.generate(requests, seed=11, progress=False)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.pcm, b.pcm)


def test_long_text_is_split_and_stitched(engine):
    text = "The first sentence is here. A second one follows it. Then a third closes the text."
    [result] = engine.generate([{"text": text}], params=greedy(engine), progress=False)
    pieces = split_text(text, engine.max_chars)
    assert result.pieces == len(pieces) == 3
    fade = round(engine.crossfade_s * RATE)
    expected = sum(expected_samples(engine, TTSRequest(p)) for p in pieces) - (len(pieces) - 1) * fade
    assert len(result.pcm) == expected


def test_split_text_bounds_and_cjk():
    english = " ".join(f"Sentence {k} is short." for k in range(40))
    pieces = split_text(english, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith(".") for p in pieces)  # broken at sentence ends only
    assert " ".join(pieces) == english
    chinese = "今天天气很好。我们去公园散步吧！你觉得怎么样？" * 10
    pieces = split_text(chinese, 30)
    assert all(len(p) <= 30 and p[-1] in "。！？" for p in pieces)
    assert "".join(pieces) == chinese
    no_breaks = "word " * 100
    assert all(len(p) <= 50 for p in split_text(no_breaks, 50))
    script = "[S1] hello there. [S2] hi! " * 6 + "[S2] " + "a long turn. " * 10
    turns = split_dialogue(script, 60)
    assert all(p.startswith("[S") and len(p) <= 60 for p in turns)


def test_stitch_crossfades_without_a_step():
    t = np.arange(round(0.3 * RATE)) / RATE
    left = (0.3 * np.cos(2 * np.pi * 200 * (t - t[-1]))).astype(np.float32)  # ends on a positive peak
    right = (-0.3 * np.cos(2 * np.pi * 300 * t)).astype(np.float32)  # starts on a negative peak
    fade = round(0.02 * RATE)
    joined = stitch([left, right], RATE, crossfade_s=0.02)
    assert len(joined) == len(left) + len(right) - fade
    naive_step = abs(float(right[0] - left[-1]))
    steepest = max(np.abs(np.diff(left)).max(), np.abs(np.diff(right)).max())
    boundary = np.abs(np.diff(joined[len(left) - fade - 5 : len(left) + 5]))
    assert naive_step > 5 * steepest  # the test signal does have a jump to hide
    assert boundary.max() < 2 * steepest
    three = stitch([left, right, left], RATE)
    assert len(three) == 3 * len(left) - 2 * fade
    assert len(stitch([left, np.zeros(0, np.float32)], RATE)) == len(left)


def test_reference_audio_is_encoded_with_the_codec(engine, tmp_path):
    audio = tone(0.5, 48000)
    path = tmp_path / "voice.wav"
    write_wav(path, audio, 48000, sample_format="float32")
    from_wave = engine.encode_audio(Waveform(audio, 48000))
    from_path = engine.encode_audio(path)
    assert from_wave.shape == (round(0.5 * RATE) // engine.codec.frame_size, 16)
    assert from_wave.dtype == torch.long
    torch.testing.assert_close(from_wave, from_path)
    at_rate = resample(audio, 48000, RATE)
    gain = 10 ** (np.clip(-20 - 10 * np.log10(np.mean(at_rate.astype(np.float64) ** 2) + 1e-9), -3, 3) / 20)
    codes, _ = engine.codec.encode(
        torch.from_numpy(at_rate * np.float32(gain))[None, None], num_quantizers=16
    )
    torch.testing.assert_close(from_wave, codes[:, 0, : len(from_wave)].T)
    wide = torch.randint(0, 1024, (5, 32))
    torch.testing.assert_close(engine.encode_audio(wide), wide[:, :16])
    with pytest.raises(ConfigError, match="at least one codec frame"):
        engine.encode_audio(tone(0.01))


def test_bad_requests_name_their_index(engine):
    with pytest.raises(ConfigError, match=r"request 1: .*empty"):
        engine.generate([{"text": "fine"}, {"text": "  "}], progress=False)
    with pytest.raises(ConfigError, match=r"request 2: unknown request kind"):
        engine.generate([{"text": "a"}, {"text": "b"}, {"kind": "song", "text": "c"}], progress=False)
    with pytest.raises(ConfigError, match=r"request 0: bad fields"):
        engine.generate([{"text": "a", "voice": "x.wav"}], progress=False)
    with pytest.raises(ConfigError, match=r"request 0: codes must have shape"):
        engine.generate([TTSRequest("a", reference=torch.zeros(4, 3, dtype=torch.long))], progress=False)
    with pytest.raises(ConfigError, match=r"request 1: .*such\.wav"):
        engine.generate(
            [SoundEffectRequest("rain"), {"text": "a", "reference": "/no/such.wav"}], progress=False
        )


def test_agenerate_runs_off_the_event_loop(engine):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        results = await engine.agenerate([{"text": "Hello."}], seed=0)
        task.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert len(results) == 1 and ticks > 0
