"""SileroVad on real audio: synthetic speech against padded silence, chunked feeding, real recordings."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from system_requirements import ESPEAK_NG, require

from moss_agent.audio import StreamResampler, load_audio, resample
from moss_agent.errors import AudioError

# find_spec, not importorskip: importing silero_vad directly would set torch to one thread for the
# rest of the test session (SileroVad undoes that, a bare import does not).
if importlib.util.find_spec("silero_vad") is None:
    pytest.skip("the [vad] extra (silero-vad) is not installed", allow_module_level=True)

from moss_agent.speech.vad import SileroVad
from moss_agent.testing.speech import silence, synthesize_speech

RATE = SileroVad.sample_rate
WINDOW = SileroVad.window


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def padded_speech_24k() -> np.ndarray:
    """1 s of faint noise, a spoken sentence, 1 s of faint noise, at 24 kHz."""
    require(ESPEAK_NG)
    speech = synthesize_speech("please turn on the kitchen light and close the window", 24000)
    clip = np.concatenate([silence(1.0), speech, silence(1.0)])
    noise = 1e-3 * np.random.default_rng(0).standard_normal(clip.shape[0])
    return (clip + noise).astype(np.float32)


def _window_rms(x: np.ndarray) -> np.ndarray:
    count = x.shape[0] // WINDOW
    return np.sqrt(np.mean(x[: count * WINDOW].reshape(count, WINDOW) ** 2, axis=1))


def test_speech_is_detected_and_padding_is_not(vad: SileroVad, padded_speech_24k: np.ndarray) -> None:
    vad.reset()
    x = resample(padded_speech_24k, 24000, RATE)
    probs = vad.probabilities(x)
    assert probs.shape == (x.shape[0] // WINDOW,)
    assert probs.dtype == np.float32 and probs.min() >= 0.0 and probs.max() <= 1.0

    lead = int(1.0 / vad.frame_duration_s) - 1
    tail = int(0.6 / vad.frame_duration_s)  # the model's hangover after the last word is short
    assert probs[:lead].max() < 0.2
    assert probs[-tail:].max() < 0.2

    loud = _window_rms(x) > 0.03  # windows that carry voiced speech energy
    assert loud.sum() > 20
    assert np.mean(probs[loud] > 0.5) > 0.8


def test_chunks_of_any_size_give_the_same_probabilities(
    vad: SileroVad, padded_speech_24k: np.ndarray
) -> None:
    x = resample(padded_speech_24k, 24000, RATE)
    vad.reset()
    whole = vad.probabilities(x)

    vad.reset()
    sizes = np.random.default_rng(1).integers(1, 1500, size=x.shape[0] // 100)
    bounds = np.cumsum(sizes)
    pieces = np.split(x, bounds[bounds < x.shape[0]])
    chunked = np.concatenate([vad.probabilities(piece) for piece in pieces])
    np.testing.assert_array_equal(chunked, whole)
    assert vad.pending_samples == x.shape[0] % WINDOW


def test_20ms_chunks_resampled_from_24k_match_one_call(vad: SileroVad, padded_speech_24k: np.ndarray) -> None:
    vad.reset()
    reference = vad.probabilities(resample(padded_speech_24k, 24000, RATE))

    vad.reset()
    resampler = StreamResampler(24000, RATE)
    frame = 480  # 20 ms at 24 kHz, as a transport delivers it
    probs = [
        vad.probabilities(resampler.process(padded_speech_24k[i : i + frame]))
        for i in range(0, padded_speech_24k.shape[0], frame)
    ]
    probs.append(vad.probabilities(resampler.flush()))
    streamed = np.concatenate(probs)
    assert streamed.shape == reference.shape
    np.testing.assert_allclose(streamed, reference, atol=1e-4)


def test_reset_forgets_state_and_buffered_samples(vad: SileroVad, padded_speech_24k: np.ndarray) -> None:
    x = resample(padded_speech_24k, 24000, RATE)
    vad.reset()
    first = vad.probabilities(x)
    vad.probabilities(x[:700])  # leaves recurrent state and a partial window behind
    assert vad.pending_samples == (x.shape[0] + 700) % WINDOW > 0
    vad.reset()
    assert vad.pending_samples == 0
    np.testing.assert_array_equal(vad.probabilities(x), first)


def test_real_recordings_are_detected_as_speech(vad: SileroVad, audio_dir: Path) -> None:
    for path in sorted(p for p in audio_dir.iterdir() if p.is_file()):
        vad.reset()
        probs = vad.probabilities(load_audio(path, RATE))
        assert probs.max() > 0.9, path.name
        assert np.mean(probs > 0.5) > 0.4, path.name


def test_faint_noise_is_not_speech(vad: SileroVad) -> None:
    vad.reset()
    noise = (3e-3 * np.random.default_rng(2).standard_normal(3 * RATE)).astype(np.float32)
    assert vad.probabilities(noise).max() < 0.2


def test_short_input_only_buffers(vad: SileroVad) -> None:
    vad.reset()
    assert vad.probabilities(np.zeros(WINDOW - 1, dtype=np.float32)).shape == (0,)
    assert vad.probabilities(np.zeros(1, dtype=np.float32)).shape == (1,)


@pytest.mark.parametrize(
    ("pcm", "message"),
    [
        (np.zeros((2, 1024), dtype=np.float32), "shape"),
        (np.zeros(1024, dtype=np.int16), "pcm16_to_float"),
        (np.full(1024, np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_input_raises_audio_error(vad: SileroVad, pcm: np.ndarray, message: str) -> None:
    vad.reset()
    with pytest.raises(AudioError, match=message):
        vad.probabilities(pcm)
    assert vad.pending_samples == 0


def test_vad_leaves_torch_thread_count_alone() -> None:
    """silero_vad sets torch to one thread on import; other CPU models in the process must not slow down."""
    code = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from moss_agent.speech.vad import SileroVad\n"
        "import numpy as np\n"
        "vad = SileroVad()\n"
        "vad.probabilities(np.zeros(2048, dtype=np.float32))\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"
