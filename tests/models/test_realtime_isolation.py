"""A conversation depends only on itself: long contexts beside each other, interrupts at any run-ahead,
and context trimming that keeps the prefix, on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from moss_agent.models.realtime import DELAY_TOKENS, RealtimeGenerator, SamplingConfig
from moss_agent.models.realtime.generator import plan_attention
from moss_agent.models.realtime.model import model_from_state_dict
from moss_agent.models.realtime.tiny import random_state_dict, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Hello there, this is a streaming test of the realtime voice. It keeps going for a while, with commas. "
GREEDY = SamplingConfig(greedy=True)
SAMPLED = SamplingConfig(temperature=0.9, top_k=20, top_p=0.8, repetition_penalty=1.2, repetition_window=8)
# Three conversations of very different lengths: ~1100, ~330 and ~40 rows of prefix.
PROMPTS = {0: "A long system prompt about many things. " * 125, 1: "A middle one. " * 75, 2: "Short."}
SAMPLING = {0: GREEDY, 1: SAMPLED, 2: GREEDY}
HEARD = 5


@pytest.fixture(scope="module")
def model():
    config = tiny_config(hidden=32)
    state = random_state_dict(config, 0, 0.0)  # never stops by itself: turns end at their cap
    return model_from_state_dict(config, state, device=torch.device("cpu"), dtype=torch.float32)


Record = dict[int, list[tuple[torch.Tensor, torch.Tensor]]]


def converse(model, tokenizer, active: list[int], interrupted: int, run_ahead: int) -> Record:
    """Every active slot speaks a turn; ``interrupted`` is cut after HEARD frames, once generation has
    run ``run_ahead`` frames past them (held there meanwhile), then speaks a second turn.
    -> per slot, (frame, backbone state) of every frame it made, in order."""
    gen = RealtimeGenerator(model, tokenizer, num_slots=3, max_context=1536)
    record: Record = {slot: [] for slot in active}
    for slot in active:
        gen.start_conversation(slot, system_prompt=PROMPTS[slot])
        gen.start_turn(slot, f"Question {slot}?", None, sampling=SAMPLING[slot], seed=slot + 3, max_frames=40)
        gen.push_text(slot, TEXT * 2)
        gen.end_text(slot)
    hold = torch.zeros(3, dtype=torch.bool)
    cut = interrupted not in active
    for _ in range(400):
        if not cut and gen.frames_generated(interrupted) >= HEARD + run_ahead:
            hold[interrupted] = True
            if not gen.has_work(hold):  # the others are done: the listener stops the turn now
                gen.rollback(interrupted, HEARD)
                gen.start_turn(interrupted, "Wait, what?", None, sampling=SAMPLING[interrupted], seed=9,
                               max_frames=30)
                gen.push_text(interrupted, TEXT)
                gen.end_text(interrupted)
                hold[interrupted], cut = False, True
        if not gen.has_work(hold):
            break
        out = gen.step(hold)
        assert gen.last_hidden is not None
        for slot in active:
            if out.produced[slot]:
                record[slot].append((out.frames[slot], gen.last_hidden[slot].clone()))
    assert cut
    return record


def assert_same(alone: list, together: list) -> None:
    assert len(alone) == len(together) > 0
    for (frame_a, hidden_a), (frame_b, hidden_b) in zip(alone, together, strict=True):
        assert torch.equal(frame_a, frame_b)
        assert torch.equal(hidden_a, hidden_b)


@pytest.mark.parametrize("interrupted", [0, 2])
def test_long_conversations_with_an_interrupt_equal_each_one_run_alone(model, tokenizer, interrupted) -> None:
    """Slots of ~1100, ~330 and ~40 rows beside each other, one interrupted at 0, 1 or 4 frames of
    run-ahead: every slot's frames and backbone states are bit-identical to the same conversation
    run alone, and the interrupted one's next turn does not depend on the run-ahead."""
    together = {ahead: converse(model, tokenizer, [0, 1, 2], interrupted, ahead) for ahead in (0, 1, 4)}
    alone = {slot: converse(model, tokenizer, [slot], interrupted, 0)[slot] for slot in range(3)}
    assert len(alone[interrupted]) == HEARD + 30  # the first turn up to the cut, then the second turn
    for ahead, record in together.items():
        for slot in range(3):
            kept = record[slot]
            if slot == interrupted:  # frames made past the cut were never heard
                kept = kept[:HEARD] + kept[HEARD + ahead :]
            assert_same(alone[slot], kept)
    alone_ahead = converse(model, tokenizer, [interrupted], interrupted, 4)[interrupted]
    assert_same(alone[interrupted], alone_ahead[:HEARD] + alone_ahead[HEARD + 4 :])


def test_interrupt_leaves_the_same_context_whatever_the_run_ahead(model, tokenizer) -> None:
    contexts = []
    for ahead in (0, 1, 3):
        gen = RealtimeGenerator(model, tokenizer, num_slots=1, max_context=512)
        gen.start_conversation(0)
        gen.start_turn(0, "Hi", None, sampling=GREEDY, max_frames=40)
        gen.push_text(0, TEXT)
        gen.end_text(0)
        while gen.frames_generated(0) < HEARD + ahead:
            gen.step()
        text = gen.rollback(0, HEARD)
        layout = gen.context_layout(0)
        gen.start_turn(0, "Next", None, sampling=GREEDY)
        length = gen.context_length(0)
        contexts.append((text, layout, gen.context_rows(0), gen.state.cache.keys[:, 0, :, :length].clone()))
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    for text, layout, rows, keys in contexts:
        assert text == contexts[0][0] == tokenizer.decode(ids[: DELAY_TOKENS + HEARD])
        assert layout == contexts[0][1] and layout.pending_rows == 2  # last heard frame + EOS row
        assert torch.equal(rows, contexts[0][2]) and torch.equal(keys, contexts[0][3])


def test_each_slot_attends_over_a_length_of_its_own(model, tokenizer) -> None:
    """Whatever its neighbours' lengths, a slot whose backbone state is used reads its own rows in use
    rounded up to the bucket: no kernel ever sums its keys over a length set by another slot."""
    gen = RealtimeGenerator(model, tokenizer, num_slots=3, max_context=1536)
    for slot in range(3):
        gen.start_conversation(slot, system_prompt=PROMPTS[slot])
        gen.start_turn(slot, "Hi", None, sampling=GREEDY, max_frames=20)
        gen.push_text(slot, TEXT)
        gen.end_text(slot)
    plans = set()
    while gen.has_work():
        positions = [gen.context_length(slot) for slot in range(3)]
        out = gen.step()
        plans.add(gen.last_attention)
        for slot in range(3):
            if out.produced[slot] and out.frame_index[slot] > 0:  # frame 0 comes from the prefill
                length = next(n for first, end, n in gen.last_attention if first <= slot < end)
                assert length == -(-(positions[slot] + 1) // 64) * 64
    assert any(len(plan) == 3 for plan in plans)  # three lengths side by side


def test_plan_attention_gives_each_used_slot_its_own_length() -> None:
    # slots whose state is used (fixed) read exactly their own length; the others join any run
    assert plan_attention([128, 128, 128], [True, True, True]) == ((0, 3, 128),)
    assert plan_attention([1088, 64, 320], [True, True, True]) == ((0, 1, 1088), (1, 2, 64), (2, 3, 320))
    assert plan_attention([1088, 64, 320, 64], [True, False, True, False]) == ((0, 2, 1088), (2, 4, 320))
    assert plan_attention([64, 320, 128], [False, True, False]) == ((0, 3, 320),)
    assert plan_attention([640, 128, 128], [False, True, True]) == ((0, 1, 640), (1, 3, 128))
    assert plan_attention([64, 64], [False, False]) == ((0, 2, 64),)


def speak_turns(gen: RealtimeGenerator, slot: int, count: int) -> None:
    for turn in range(count):
        gen.start_turn(slot, f"Question {turn}?", None, sampling=GREEDY, max_frames=12)
        gen.push_text(slot, f"Answer number {turn}, a few words here.")
        gen.end_text(slot)
        while gen.has_work():
            gen.step()
        gen.rollback(slot, gen.frames_generated(slot))  # heard in full: the closing rows are known


def test_trim_context_drops_the_oldest_whole_turns_and_keeps_the_prefix(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=512)
    gen.start_conversation(0, system_prompt="You are a calm narrator.")
    prefix_rows = gen.context_layout(0).prefix_rows
    assert gen.trim_context(0, 10) == 0  # nothing fed yet, nothing to drop
    speak_turns(gen, 0, 4)
    before = gen.context_layout(0)
    rows_before = gen.context_rows(0)
    assert before.turn_starts[0] == prefix_rows and len(before.turn_starts) == 4
    whole = before.length + before.pending_rows
    assert gen.trim_context(0, whole) == 0

    # a budget that the last two turns fit: the first two go, whole
    keep_from = before.turn_starts[2]
    budget = prefix_rows + whole - keep_from
    assert gen.trim_context(0, budget) == keep_from - prefix_rows
    after = gen.context_layout(0)
    assert after.prefix_rows == prefix_rows and after.pending_rows == before.pending_rows
    assert after.turn_starts == tuple(s - keep_from + prefix_rows for s in before.turn_starts[2:])
    assert torch.equal(gen.context_rows(0), torch.cat([rows_before[:prefix_rows], rows_before[keep_from:]]))

    # the trimmed slot continues exactly like a fresh slot fed the same rows
    closing = gen.state.slots[0].closing
    assert closing is not None
    gen.restore_context(1, torch.cat([gen.context_rows(0), closing.cpu()]))
    frames = []
    for slot in (0, 1):
        gen.start_turn(slot, "And then?", None, sampling=GREEDY, max_frames=10)
        gen.push_text(slot, TEXT)
        gen.end_text(slot)
        made = []
        while gen.has_work():
            out = gen.step()
            if out.produced[slot]:
                made.append(out.frames[slot])
        frames.append(torch.stack(made))
    assert torch.equal(frames[0], frames[1])

    # a budget below the last turn alone: only the prefix stays
    gen.trim_context(0, prefix_rows + 1)
    only = gen.context_layout(0)
    assert only.length == prefix_rows and only.turn_starts == () and only.pending_rows == 0
    assert torch.equal(gen.context_rows(0), rows_before[:prefix_rows])
    speak_turns(gen, 0, 1)  # and the conversation goes on
    assert gen.context_layout(0).turn_starts == (prefix_rows,)
