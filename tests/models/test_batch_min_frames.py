"""SamplingParams.min_frames on the batch models: a model that ends its audio at once still speaks
the minimum, under sampling and greedy decoding; 0 leaves the model's own choice."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.batch_sampling import SamplingParams, preset
from moss_agent.models.delay.requests import TTSRequest
from moss_agent.models.delay.tiny import save_tiny_delay
from moss_agent.models.local.tiny import save_tiny_local
from moss_agent.models.tts_loading import LoadedTTS, load_tts

pytestmark = pytest.mark.usefixtures("one_thread")

REQUESTS = [TTSRequest(text="Hi."), TTSRequest(text="Hello there, how are you?")]


@pytest.fixture(scope="module")
def stopping_delay(tmp_path_factory: pytest.TempPathFactory) -> LoadedTTS:
    """A scripted tiny Delay whose text channel prefers the delay slot (the end of the audio) to a
    gen slot by a wide margin: the scripted text logits read hidden dim 0, a constant ~4."""
    folder = save_tiny_delay(tmp_path_factory.mktemp("delay"), n_vq=4, scripted_frames=25)
    loaded = load_tts(folder, device="cpu", dtype="float32")
    loaded.model.lm_heads[0].weight.data[loaded.config.audio_assistant_delay_slot_token_id, 0] += 20.0
    return loaded


@pytest.fixture(scope="module")
def stopping_local(tmp_path_factory: pytest.TempPathFactory) -> LoadedTTS:
    """The tiny Local of ``make-tiny`` (seed 0): its random text head picks <|audio_end|> at once."""
    return load_tts(save_tiny_local(tmp_path_factory.mktemp("local")), device="cpu", dtype="float32")


def _frames(loaded: LoadedTTS, params: SamplingParams) -> list[tuple[int, bool]]:
    """(frames of audio, finished) per request."""
    samples = loaded.generate(REQUESTS, params=params, max_new_tokens=40, generator=torch.Generator().manual_seed(1))
    return [(sum(len(segment) for segment in s.segments), s.finished) for s in samples]


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize(("model", "name"), [("stopping_delay", "moss-tts"), ("stopping_local", "moss-tts-local")])
def test_a_model_that_stops_at_once_speaks_min_frames(request, model: str, name: str, greedy: bool) -> None:
    loaded = request.getfixturevalue(model)
    params = preset(name).greedy() if greedy else preset(name)
    assert _frames(loaded, params) == [(0, True)] * len(REQUESTS)  # the model's own choice: nothing
    # With a minimum every sample speaks at least that long, then ends by itself (soon: it would
    # have ended at once).
    results = _frames(loaded, replace(params, min_frames=5))
    assert all(finished and 5 <= frames <= 8 for frames, finished in results), results


def test_delay_rows_keep_the_training_layout(stopping_delay: LoadedTTS) -> None:
    """audio_start, the gen slots, n_vq - 1 delay slots (the flush), audio_end, im_end."""
    config = stopping_delay.config
    sample = stopping_delay.generate(
        REQUESTS[:1], params=replace(preset("moss-tts"), min_frames=3), max_new_tokens=40,
        generator=torch.Generator().manual_seed(2),
    )[0]
    expected = (
        [config.audio_start_token_id]
        + [config.audio_assistant_gen_slot_token_id] * 3
        + [config.audio_assistant_delay_slot_token_id] * (config.n_vq - 1)
        + [config.audio_end_token_id, config.im_end_token_id]
    )
    assert sample.rows[sample.prompt_rows :, 0].tolist() == expected


def test_min_frames_is_checked() -> None:
    with pytest.raises(ConfigError, match="min_frames"):
        SamplingParams(min_frames=-1)
