"""A Session that starts from earlier turns: the engine's conversation and the LLM's history agree."""

from __future__ import annotations

import numpy as np
import pytest

from moss_agent.errors import ConfigError
from moss_agent.streaming.clock import ScaledClock
from moss_agent.streaming.llm import EchoResponder
from moss_agent.streaming.session import Session
from moss_agent.streaming.tts import PastTurn
from moss_agent.testing.backend import FakeSpeechBackend

SPEECH = np.zeros(4800, np.float32)
HISTORY = [
    PastTurn("user", "My name is Ada."),
    PastTurn("assistant", "Nice to meet you, Ada.", SPEECH),
    PastTurn("user", "What is my name?"),
]


async def test_a_session_starts_from_earlier_turns() -> None:
    clock = ScaledClock(50.0)
    backend = FakeSpeechBackend(clock=clock)
    async with Session(backend, llm=EchoResponder(), clock=clock, history=HISTORY) as session:
        conversation = session.conversation
        assert conversation is not None
        assert conversation.history == HISTORY  # type: ignore[attr-defined]
        assert session.history[1:] == [{"role": turn.role, "content": turn.text} for turn in HISTORY]
        result = await session.respond()  # answers the history's last user turn
        assert result.heard_text == "You said: What is my name?"
        assert conversation.context == [  # type: ignore[attr-defined]
            *((turn.role, turn.text) for turn in HISTORY), ("assistant", "You said: What is my name?"),
        ]
        assert session.history[-1] == {"role": "assistant", "content": "You said: What is my name?"}


async def test_a_bad_history_fails_before_any_slot_is_claimed() -> None:
    backend = FakeSpeechBackend()
    with pytest.raises(ConfigError, match="without audio"):
        Session(backend, history=[PastTurn("user", "Hi"), PastTurn("assistant", "Hello!")])
    with pytest.raises(ConfigError, match="role"):
        PastTurn("system", "Be brief.")  # type: ignore[arg-type]
    assert not backend.active
