"""Opening a conversation with earlier turns: the history's rows are the rows live turns leave.

Generator level (exact): a live turn, then a slot opened with that turn as history (its codes), give
the same context rows and the same next turn, frame for frame. Engine level (the tiny codec): the
history's audio is encoded by the codec, and ``codec(decode(codes))`` is not ``codes``, so there the
rows equal the live rows in everything but the assistant frames' codes, which are the codec's codes
of the turn's audio, exactly as a user turn's audio is encoded; a history given those codes continues
exactly as the live conversation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.realtime import DELAY_TOKENS, EncodedTurn, RealtimeGenerator, SamplingConfig
from moss_agent.models.realtime.model import model_from_state_dict
from moss_agent.models.realtime.tiny import random_state_dict, tiny_config
from moss_agent.streaming.tts import PastTurn, UserTurn
from tests.models.shared_fixtures import drain_frames

pytestmark = pytest.mark.usefixtures("one_thread")

USER = "How are you today?"
TEXT = "Hello there, this is a streaming test of the realtime voice. It keeps going for a while, with commas."
NEXT_USER = "And what comes next?"
NEXT_TEXT = "Next comes another answer, spoken after the history."
GREEDY = SamplingConfig(greedy=True)
SAMPLED = SamplingConfig(temperature=0.8, top_k=30, top_p=0.6, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def eos_model():
    """Greedy runs of TEXT reach EOS by themselves after some frames."""
    config = tiny_config(hidden=32)
    return model_from_state_dict(
        config, random_state_dict(config, 0, 2.0), device=torch.device("cpu"), dtype=torch.float32
    )


def _drain(gen: RealtimeGenerator, slot: int, limit: int = 400) -> list[torch.Tensor]:
    return drain_frames(gen, slot, limit, with_eos=False)


def _turn(gen, slot, user, text, sampling=GREEDY, seed=None, max_frames=60, deltas=7):
    gen.start_turn(slot, user, None, sampling=sampling, seed=seed, max_frames=max_frames)
    for start in range(0, len(text), deltas):  # streamed in pieces, as an LLM sends it
        gen.push_text(slot, text[start : start + deltas])
    gen.end_text(slot)
    return _drain(gen, slot)


@pytest.mark.parametrize(
    ("cut", "sampling"), [(None, GREEDY), (None, SAMPLED), (5, GREEDY)], ids=["greedy", "sampled", "cut"]
)
def test_history_rows_are_the_rows_a_live_turn_left(eos_model, tokenizer, cut, sampling) -> None:
    gen = RealtimeGenerator(eos_model, tokenizer, num_slots=2, max_context=512)
    gen.start_conversation(0, "Be brief.")
    frames = _turn(gen, 0, USER, TEXT)
    real = gen.frames_generated(0)
    assert real == len(frames) and 0 < real < 60  # the model stopped by itself
    heard = real if cut is None else cut
    gen.rollback(0, heard)  # the listener heard it all (or the first frames)

    history = [EncodedTurn("user", USER), EncodedTurn("assistant", TEXT, torch.stack(frames[:heard]))]
    gen.start_conversation(1, "Be brief.", history=history)
    # the history is fed at open: the first turn only adds its own prompt
    assert gen.context_layout(1).pending_rows == 0
    assert len(gen.context_layout(1).turn_starts) == 1

    results = [_turn(gen, slot, NEXT_USER, NEXT_TEXT, sampling, seed=11, max_frames=20) for slot in (0, 1)]
    assert torch.equal(gen.context_rows(0), gen.context_rows(1))
    assert torch.equal(torch.stack(results[0]), torch.stack(results[1]))
    assert gen.context_layout(0).turn_starts == gen.context_layout(1).turn_starts


def test_history_layout_of_each_role(eos_model, tokenizer) -> None:
    gen = RealtimeGenerator(eos_model, tokenizer, num_slots=1, max_context=512)
    config, prompts = eos_model.config, gen.prompts
    codes = torch.randint(0, 1024, (4, 16))
    header = prompts.encode("<|im_end|>\n<|im_start|>assistant\n")
    # a short assistant text: BOS on its last token, frames after it on <|text_pad|>, then the EOS row
    rows = prompts.assistant_rows("Hi there.", codes)
    ids = prompts.encode("Hi there.")
    assert rows[: len(header), 0].tolist() == header
    bos = len(header) + len(ids) - 1
    assert rows[bos, 1] == config.audio_bos and rows[bos + 1 : bos + 5, 1:].equal(codes)
    assert rows[-1, 0] == config.text_pad_id and rows[-1, 1] == config.audio_eos
    assert rows.shape[0] == len(header) + len(ids) + 4 + 1
    # text the audio never reached (more than 12 tokens past its last frame) is left out
    long = prompts.assistant_rows(TEXT, codes)
    assert long.shape[0] == len(header) + DELAY_TOKENS + 4 + 1
    assert long[len(header) : -1, 0].tolist() == prompts.encode(TEXT)[: DELAY_TOKENS + 4]
    # a user turn without audio: its text rows, no header (the next turn brings it)
    user, starts = prompts.history_rows([EncodedTurn("user", USER), EncodedTurn("user", "Hello?")])
    assert user[:, 0].tolist() == prompts.encode("<|im_end|>\n<|im_start|>user\n" + USER) + prompts.encode(
        "<|im_end|>\n<|im_start|>user\nHello?"
    )
    assert starts == [0, user.shape[0] - len(prompts.encode("<|im_end|>\n<|im_start|>user\nHello?"))]
    # a user turn with audio: the user rows of a live turn, less the header
    with_audio = prompts.user_rows(USER, codes)
    got, _ = prompts.history_rows([EncodedTurn("user", USER, codes)])
    assert torch.equal(got, with_audio[: -len(header)])
    with pytest.raises(ConfigError, match="needs its audio"):
        prompts.history_rows([EncodedTurn("assistant", "Silent.")])


def test_history_ending_with_a_user_turn_is_answered_like_a_live_user_turn(eos_model, tokenizer) -> None:
    gen = RealtimeGenerator(eos_model, tokenizer, num_slots=2, max_context=512)
    gen.start_conversation(0)
    gen.start_turn(0, USER, None, sampling=GREEDY)
    gen.start_conversation(1, history=[EncodedTurn("user", USER)])
    gen.start_turn(1, None, None, sampling=GREEDY)
    assert torch.equal(gen.context_rows(0), gen.context_rows(1))


def test_history_turns_are_trimmed_later_like_live_turns(eos_model, tokenizer) -> None:
    gen = RealtimeGenerator(eos_model, tokenizer, num_slots=1, max_context=512)
    codes = torch.randint(0, 1024, (6, 16))
    turns = [EncodedTurn("user", "First question?"), EncodedTurn("assistant", "First answer.", codes),
             EncodedTurn("assistant", "And more.", codes), EncodedTurn("user", "Second?", codes)]  # fmt: skip
    gen.start_conversation(0, history=turns)
    layout = gen.context_layout(0)
    # as live turns: the user turn with its answer, the answer with no user turn, the next user turn
    assert len(layout.turn_starts) == 3
    kept = gen.context_rows(0)[layout.turn_starts[1] :].clone()  # a view of the state on the CPU
    dropped = gen.trim_context(0, layout.length - 1)  # one row too many: the oldest block goes
    assert dropped == layout.turn_starts[1] - layout.prefix_rows
    after = gen.context_layout(0)
    assert after.turn_starts[0] == after.prefix_rows and torch.equal(gen.context_rows(0)[after.prefix_rows :], kept)


def test_a_history_over_the_budget_is_refused_and_the_slot_untouched(eos_model, tokenizer) -> None:
    gen = RealtimeGenerator(eos_model, tokenizer, num_slots=1, max_context=256)
    long = [EncodedTurn("user", "word " * 300)]
    with pytest.raises(ConfigError, match=r"needs \d+ rows .* at most 200"):
        gen.start_conversation(0, history=long, budget_rows=200)
    with pytest.raises(ConfigError, match="raise max_context"):
        gen.start_conversation(0, history=long)
    assert not gen.state.slots[0].active and gen.context_length(0) == 0


# -- the engine, with the tiny codec ------------------------------------------------------------


@pytest.fixture(scope="module")
def codec(tiny_codec_dir: Path) -> Any:
    from moss_agent.models.codec import load_codec

    return load_codec(tiny_codec_dir, device="cpu")


@pytest.fixture
async def engine(tiny_realtime_dir: Path, codec: Any):
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig

    config = RealtimeEngineConfig(
        num_slots=3, max_context=1024, max_frames_per_turn=40, sampling=GREEDY, cuda_graph=False
    )
    async with RealtimeEngine.load(tiny_realtime_dir, codec, device="cpu", config=config) as engine:
        yield engine


async def _speak(conversation: Any, user: UserTurn | None, text: str, turn_id: int) -> tuple[np.ndarray, Any]:
    stream = await conversation.start_turn(user, turn_id)
    await stream.push_text(text)
    await stream.end_input()
    chunks = [chunk.pcm async for chunk in stream]
    heard = await stream.interrupt(None)  # settled as heard in full
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), heard


async def test_engine_history_continues_as_the_live_conversation(engine: Any) -> None:
    live = await engine.open_conversation(system_prompt="Be brief.")
    audio, heard = await _speak(live, UserTurn(USER), TEXT, 1)
    assert heard.frames > 0 and audio.size == heard.frames * 1920
    generator = engine.generator
    live_rows = generator.context_rows(live.slot).clone()  # the cache rows; the EOS rows wait for the next turn

    history = [PastTurn("user", USER), PastTurn("assistant", TEXT, audio, engine.sample_rate)]
    resumed = await engine.open_conversation(system_prompt="Be brief.", history=history)
    rows = generator.context_rows(resumed.slot).clone()
    codes = engine._encode(audio, engine.sample_rate)  # what any audio given to the engine becomes
    assert codes.shape == (heard.frames, 16)
    # live: the cache ends on the row before the last frame's; its row and the EOS row are pending
    assert rows.shape[0] == live_rows.shape[0] + 2
    assert torch.equal(rows[: live_rows.shape[0], 0], live_rows[:, 0])  # every text id, in place
    frame_rows = slice(rows.shape[0] - 1 - heard.frames, rows.shape[0] - 1)
    assert torch.equal(rows[frame_rows, 1:], codes)
    assert torch.equal(rows[: frame_rows.start], live_rows[: frame_rows.start])  # up to BOS: all equal

    # the same history with the live turn's own codes continues exactly as the live conversation
    exact = await engine.open_conversation(system_prompt="Be brief.")
    await engine._call(
        lambda: generator.start_conversation(
            exact.slot, "Be brief.",
            history=[EncodedTurn("user", USER), EncodedTurn("assistant", TEXT, _live_codes(generator, live.slot))],
        )
    )  # fmt: skip
    nexts = [await _speak(c, UserTurn(NEXT_USER), NEXT_TEXT, 2) for c in (live, exact)]
    assert nexts[0][1] == nexts[1][1] and nexts[0][1].frames > 0
    # the same frames (the codec decodes them on another slot, to within float rounding)
    assert torch.equal(generator.context_rows(live.slot), generator.context_rows(exact.slot))
    assert torch.equal(_live_codes(generator, live.slot), _live_codes(generator, exact.slot))
    np.testing.assert_allclose(nexts[0][0], nexts[1][0], atol=1e-4)
    for conversation in (live, resumed, exact):
        await conversation.aclose()


def _live_codes(generator: RealtimeGenerator, slot: int) -> torch.Tensor:
    """The codes of the slot's last (closed) turn: its cached frame rows and the pending last frame."""
    record = generator.state.slots[slot]
    turn = record.turn
    assert turn is not None and record.closing is not None
    start = turn.base + turn.prefill_len
    cached = generator.context_rows(slot)[start:, 1:]
    return torch.cat([cached, record.closing[:1, 1:].cpu()])


async def test_engine_refuses_bad_histories(engine: Any) -> None:
    with pytest.raises(ConfigError, match="without audio"):
        await engine.open_conversation(history=[PastTurn("user", "Hi"), PastTurn("assistant", "Hello!")])
    with pytest.raises(ConfigError, match="role"):
        PastTurn("system", "Be brief.")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shorter than one codec frame"):
        await engine.open_conversation(history=[PastTurn("assistant", "Hi", np.zeros(100, np.float32))])
    too_long = [PastTurn("user", "word " * 200), PastTurn("assistant", "Sure.", np.zeros(24000 * 60, np.float32))]
    with pytest.raises(ConfigError, match="leave out the oldest turns"):
        await engine.open_conversation(history=too_long)
    assert engine.free_slots == 3  # nothing was kept of the refused opens
    ok = await engine.open_conversation(history=[PastTurn("user", "Hi", np.zeros(4000, np.float32), 16000)])
    await ok.aclose()


async def test_fake_backend_keeps_the_history_in_its_context() -> None:
    from moss_agent.testing import FakeSpeechBackend

    backend = FakeSpeechBackend(max_history_chars=100)
    voice = np.zeros(2400, np.float32)
    history = [PastTurn("user", "Hi"), PastTurn("assistant", "Hello!", voice), PastTurn("user", "")]
    conversation = await backend.open_conversation(history=history)
    assert conversation.context == [("user", "Hi"), ("assistant", "Hello!")]
    assert conversation.history == history
    stream = await conversation.start_turn(UserTurn("Again?"), 1)
    await stream.push_text("Yes.")
    await stream.end_input()
    _ = [chunk async for chunk in stream]
    assert conversation.context[-2:] == [("user", "Again?"), ("assistant", "Yes.")]
    with pytest.raises(ConfigError, match="without audio"):
        await backend.open_conversation(history=[PastTurn("assistant", "Hello!")])
    with pytest.raises(ConfigError, match="at most 100"):
        await backend.open_conversation(history=[PastTurn("user", "x" * 101)])
    with pytest.raises(ConfigError, match="PastTurn"):
        await backend.open_conversation(history=[("user", "Hi")])  # type: ignore[list-item]
