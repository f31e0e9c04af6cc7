"""The Delay/Local prompt processor names the shape it expects when given a flat message list.

Upstream takes ``proc([user, assistant])`` as two one-message conversations and fails deep inside
(bug 5 of the parity notes); ours says what it expects and what it got, and builds nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.delay.config import TTSModelConfig
from moss_agent.models.delay.processor import TTSProcessor
from moss_agent.models.delay.requests import TTSRequest, prepare_batch
from moss_agent.models.delay.tiny import save_tiny_delay
from moss_agent.models.loading import read_config
from moss_agent.models.local.tiny import save_tiny_local


@pytest.fixture(scope="module", params=["delay", "local"])
def processor(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TTSProcessor:
    delay = save_tiny_delay(tmp_path_factory.mktemp("delay"), n_vq=3, seed=4)
    folder = delay if request.param == "delay" else save_tiny_local(
        tmp_path_factory.mktemp("local"), n_vq=3, seed=4, tokenizer_source=delay
    )
    config = TTSModelConfig.from_dict(read_config(Path(folder)))
    assert config.architecture == request.param
    return TTSProcessor.from_folder(folder, config)


def _pair(processor: TTSProcessor) -> tuple[object, object]:
    codes = torch.zeros(4, processor.config.n_vq, dtype=torch.long)
    return processor.user_message(text="Hello there."), processor.assistant_message([codes])


def test_a_flat_message_list_is_a_clear_config_error(processor: TTSProcessor) -> None:
    user, assistant = _pair(processor)
    for mode in ("continuation", "generation"):
        with pytest.raises(ConfigError, match=r"list of conversations, each a list of Message") as caught:
            processor([user, assistant], mode=mode)  # type: ignore[list-item]
        assert "flat message list" in str(caught.value) and "list of 2 (Message)" in str(caught.value)
    # The nested form of the same conversation builds.
    assert processor([[user, assistant]], mode="continuation").input_ids.shape[0] == 1


@pytest.mark.parametrize(
    ("make", "got"),
    [
        (lambda user: user, "got a Message"),
        (lambda user: [[user], user], r"list of 2 \(Message, list\)"),
        (lambda user: [[user], [user, "text"]], r"conversation 1 must be a list of Message, got a list of 2"),
        (lambda user: [(user,), "text"], "conversation 1 must be a list of Message, got a str"),
    ],
)
def test_other_wrong_shapes_say_what_came(processor: TTSProcessor, make, got: str) -> None:  # type: ignore[no-untyped-def]
    user, _ = _pair(processor)
    with pytest.raises(ConfigError, match=got):
        processor(make(user))
    with pytest.raises(ConfigError, match="conversation must be a list of Message, got a Message"):
        processor.build(user)  # type: ignore[arg-type]


def test_one_request_instead_of_a_list(processor: TTSProcessor) -> None:
    request = TTSRequest(text="Hello there.")
    with pytest.raises(ConfigError, match=r"expected a list of requests, got one TTSRequest: pass \[request\]"):
        prepare_batch(processor, request)  # type: ignore[arg-type]
    assert prepare_batch(processor, [request]).input_ids.shape[0] == 1
