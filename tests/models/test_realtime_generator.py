"""RealtimeGenerator on tiny random checkpoints: slots, caps, rollback, turn ends, prompt fixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moss_agent.errors import ConfigError, EngineError
from moss_agent.models.realtime import DELAY_TOKENS, RealtimeGenerator, SamplingConfig
from moss_agent.models.realtime.model import model_from_state_dict
from moss_agent.models.realtime.tiny import random_state_dict, tiny_config
from tests.models.shared_fixtures import drain_frames

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Hello there, this is a streaming test of the realtime voice. It keeps going for a while, with commas."
GREEDY = SamplingConfig(greedy=True)


def _model(seed: int = 0, eos_gain: float = 0.0, **tweaks: float):
    config = tiny_config(hidden=32)
    state = random_state_dict(config, seed, eos_gain)
    for code, gain in tweaks.items():  # boost special ids in every head: "pad", "bos", "eos"
        row = {"pad": config.audio_pad, "bos": config.audio_bos, "eos": config.audio_eos}[code]
        for head in range(config.rvq):
            state[f"local_transformer.local_lm_heads.{head}.weight"][row] *= gain
    return model_from_state_dict(config, state, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def model():
    """Never reaches EOS by itself (EOS row scaled to 0): turns end at their frame cap."""
    return _model()


@pytest.fixture(scope="module")
def eos_model():
    """Greedy runs of TEXT reach EOS after some frames (seed 0, gain 2)."""
    return _model(seed=0, eos_gain=2.0)


def _drain(gen: RealtimeGenerator, slot: int, limit: int = 400) -> list[torch.Tensor]:
    return drain_frames(gen, slot, limit)


def _turn(gen, slot, text=TEXT, sampling=GREEDY, seed=None, max_frames=30, user="How are you?"):
    gen.start_turn(slot, user, None, sampling=sampling, seed=seed, max_frames=max_frames)
    gen.push_text(slot, text)
    gen.end_text(slot)
    return _drain(gen, slot)


def test_frame_cap_stops_a_turn_without_eos(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256)
    gen.start_conversation(1)
    gen.start_turn(1, "Hi", None, sampling=GREEDY, max_frames=7)
    gen.push_text(1, TEXT)
    gen.end_text(1)
    outputs = []
    while gen.has_work():
        outputs.append(gen.step())
    produced = [o for o in outputs if o.produced[1]]
    assert len(produced) == 7
    assert bool(produced[-1].capped[1]) and bool(produced[-1].finished[1]) and not bool(produced[-1].eos[1])
    assert not any(bool(o.capped[1]) for o in produced[:-1])
    assert [int(o.frame_index[1]) for o in produced] == list(range(7))
    assert not gen.turn_running(1) and gen.frames_generated(1) == 7
    assert not bool(gen.step().produced.any())


def test_context_limit_caps_and_prompt_overflow_raises(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=1, max_context=160)
    gen.start_conversation(0)
    frames = _turn(gen, 0, max_frames=1000)
    assert gen.context_length(0) <= 160 - 2 and len(frames) > 0
    with pytest.raises(EngineError, match="max_context"):
        gen.start_turn(0, "another question " * 10, None, sampling=GREEDY)


def test_prefill_waits_for_twelve_tokens(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=1, max_context=256)
    gen.start_conversation(0)
    gen.start_turn(0, None, None, sampling=GREEDY)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    gen.push_tokens(0, ids[: DELAY_TOKENS - 1])
    assert not gen.has_work()
    assert not bool(gen.step().produced[0])
    gen.push_tokens(0, ids[DELAY_TOKENS - 1 : DELAY_TOKENS + 2])
    out = [gen.step() for _ in range(4)]
    # frame 0 from the 12-token prefill, then one frame per further token, then wait for text
    assert [bool(o.produced[0]) for o in out] == [True, True, True, False]
    assert [int(o.text_position[0]) for o in out[:3]] == [12, 13, 14]
    rows = gen.context_rows(0)
    assert rows[-3, 1] == model.config.audio_bos and rows[-3, 0] == ids[11]
    assert torch.equal(rows[-2:, 0], torch.tensor(ids[12:14]))
    assert torch.equal(rows[-1, 1:], out[1].frames[0])


def test_empty_text_finishes_without_frames(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=1, max_context=256)
    gen.start_conversation(0)
    gen.start_turn(0, "Hi", None, sampling=GREEDY)
    gen.end_text(0)
    out = gen.step()
    assert bool(out.finished[0]) and not bool(out.produced[0]) and not gen.turn_running(0)


def test_chunked_text_gives_the_same_rows_as_whole_text(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256)
    for slot in range(2):
        gen.start_conversation(slot)
        gen.start_turn(slot, "Hi", None, sampling=GREEDY, max_frames=40)
    gen.push_tokens(0, tokenizer.encode(TEXT, add_special_tokens=False))
    gen.end_text(0)
    for start in range(0, len(TEXT), 3):
        gen.push_text(1, TEXT[start : start + 3])
    gen.end_text(1)
    while gen.has_work():
        gen.step()
    assert torch.equal(gen.context_rows(0), gen.context_rows(1))


@pytest.mark.parametrize("upstream_compat", [False, True])
def test_short_and_one_shot_texts_keep_bos_on_the_training_grid(model, tokenizer, upstream_compat) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256, upstream_compat=upstream_compat)
    short, long = "Hi there.", TEXT
    short_ids = tokenizer.encode(short, add_special_tokens=False)
    long_ids = tokenizer.encode(long, add_special_tokens=False)
    assert len(short_ids) < DELAY_TOKENS < len(long_ids)
    for slot, text in enumerate((short, long)):
        gen.start_conversation(slot)
        gen.start_turn(slot, None, None, sampling=GREEDY, max_frames=1)
        gen.push_tokens(slot, tokenizer.encode(text, add_special_tokens=False))
        base = gen.context_length(slot)
        gen.end_text(slot)  # the whole text ends before any prefill
        gen.step()
        rows = gen.context_rows(slot)[base:]
        bos_rows = (rows[:, 1] == model.config.audio_bos).nonzero().flatten().tolist()
        if slot == 0:  # shorter than 12 tokens: BOS on the last text token, as in training
            assert bos_rows == [len(short_ids) - 1]
        elif upstream_compat:  # upstream prefills everything and moves BOS off the grid
            assert bos_rows == [len(long_ids) - 1]
        else:
            assert bos_rows == [DELAY_TOKENS - 1]


def test_voice_prompt_of_exactly_sixteen_frames(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=1, max_context=256)
    codes = torch.arange(16 * 32).reshape(16, 32) % 1024  # [frames, codebooks]: never transposed
    gen.start_conversation(0, voice_codes=codes)
    gen.start_turn(0, "Hi", None, sampling=GREEDY)
    rows = gen.context_rows(0)
    voice = rows[rows[:, 0] == model.config.audio_pad_text_id]
    assert torch.equal(voice[:, 1:], codes[:, :16])
    with pytest.raises(ConfigError, match="codebooks"):
        gen.start_conversation(0, voice_codes=codes[:, :8])
    with pytest.raises(ConfigError, match="outside"):
        gen.start_conversation(0, voice_codes=codes + 1024)


def test_special_codes_are_masked_unless_asked(tokenizer) -> None:
    model = _model(seed=1, pad=40.0, bos=40.0)
    config = model.config
    seen = {}
    for mask in (True, False):
        gen = RealtimeGenerator(model, tokenizer, num_slots=1, max_context=256)
        gen.start_conversation(0)
        frames = torch.stack(
            _turn(gen, 0, sampling=SamplingConfig(greedy=True, mask_special_codes=mask), max_frames=6)
        )
        seen[mask] = frames
    assert not bool(torch.isin(seen[True][:, 0], torch.tensor([config.audio_pad, config.audio_bos])).any())
    assert int(seen[True][:, 1:].max()) < config.codebook_size
    assert bool((seen[False] >= config.audio_pad).any())  # upstream behaviour: pad/BOS get picked


def _script(gen: RealtimeGenerator, slot: int, sampling: SamplingConfig, seed: int, first_chars: int) -> None:
    gen.start_conversation(slot, system_prompt=f"Voice {slot}.")
    gen.start_turn(slot, f"Question {slot}", None, sampling=sampling, seed=seed, max_frames=25 + slot)
    gen.push_text(slot, TEXT[:first_chars])


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=0.9, top_k=20, top_p=0.8)])
def test_slot_isolation(model, tokenizer, sampling) -> None:
    """Slot 1's frames are bit-identical whether it runs alone or with others joining and leaving."""

    def run(with_others: bool) -> list[torch.Tensor]:
        gen = RealtimeGenerator(model, tokenizer, num_slots=3, max_context=256)
        frames: list[torch.Tensor] = []
        if with_others:
            _script(gen, 0, SamplingConfig(), seed=5, first_chars=60)
        _script(gen, 1, sampling, seed=11, first_chars=20)
        for tick in range(60):
            if tick == 4:
                gen.push_text(1, TEXT[20:])
            if tick == 9:
                gen.end_text(1)
            if with_others and tick == 3:
                _script(gen, 2, SamplingConfig(temperature=1.2), seed=7, first_chars=90)
            if with_others and tick == 6:
                gen.end_text(0)
            if with_others and tick == 12:
                gen.rollback(0, 2)
                gen.start_turn(0, "Next", None, sampling=GREEDY, max_frames=10)
                gen.push_text(0, TEXT)
            if with_others and tick == 15:
                gen.release(2)
            out = gen.step()
            if out.produced[1]:
                frames.append(out.frames[1])
        return frames

    alone, together = run(False), run(True)
    assert len(alone) == 26
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))


def test_sampling_depends_on_the_seed_only(model, tokenizer) -> None:
    sampled = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95)

    def frames(seed: int, slot: int) -> torch.Tensor:
        gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256)
        gen.start_conversation(slot)
        return torch.stack(_turn(gen, slot, sampling=sampled, seed=seed, max_frames=8))

    assert torch.equal(frames(1, 0), frames(1, 1))
    assert not torch.equal(frames(1, 0), frames(2, 0))


def test_rollback_then_next_turn_matches_a_fresh_context(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=320)
    gen.start_conversation(0)
    frames = _turn(gen, 0, max_frames=15)
    base = gen.context_length(0) - DELAY_TOKENS - 14  # 15 frames made, 14 fed back
    heard = gen.rollback(0, 6)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert heard == tokenizer.decode(ids[: DELAY_TOKENS + 6])
    # frames 0..4 stay as cache rows; the last heard frame's row and the EOS row wait for the next prompt
    assert gen.context_length(0) == base + DELAY_TOKENS + 5
    assert gen.context_layout(0).pending_rows == 2
    kept = gen.context_rows(0)
    assert torch.equal(kept[-1, 1:], frames[4])

    # a fresh slot fed exactly the heard context, closed as the next prompt closes it
    eos_row = torch.full((17,), model.config.audio_pad)
    eos_row[0], eos_row[1] = model.config.text_pad_id, model.config.audio_eos
    frame_row = torch.cat([torch.tensor([ids[DELAY_TOKENS + 5]]), frames[5]])
    gen.restore_context(1, torch.cat([kept, frame_row[None], eos_row[None]]))
    results = []
    for slot in (0, 1):
        results.append(
            torch.stack(_turn(gen, slot, text="Sure, next answer here and more words.", max_frames=10))
        )
    assert torch.equal(results[0], results[1])
    assert torch.equal(gen.context_rows(0), gen.context_rows(1))
    length = gen.context_length(0)
    keys = gen.state.cache.keys
    assert torch.allclose(keys[:, 0, :, :length], keys[:, 1, :, :length], atol=1e-5)


def test_rollback_edges(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=1, max_context=256)
    gen.start_conversation(0)
    gen.start_turn(0, "Hi", None, sampling=GREEDY, max_frames=5)
    prompt_end = gen.context_length(0)
    gen.push_text(0, TEXT)
    while gen.has_work():
        gen.step()
    with pytest.raises(ConfigError, match="heard_frames"):
        gen.rollback(0, 6)
    assert gen.rollback(0, 0) == ""
    assert gen.context_length(0) == prompt_end
    with pytest.raises(EngineError, match="already closed"):
        gen.rollback(0, 0)
    # a heard turn that never reached the prefill (text still short) also cuts back to the prompt
    gen.start_turn(0, "Again", None, sampling=GREEDY)
    gen.push_text(0, "Just a few")
    start = gen.context_length(0)
    assert gen.rollback(0, 0) == "" and gen.context_length(0) == start


@pytest.mark.parametrize("upstream_compat", [False, True])
def test_turn_end_rows_in_the_next_context(model, eos_model, tokenizer, upstream_compat) -> None:
    """A turn that ends by itself (frame cap or EOS) closes, in the next prompt, with the row of its
    last real frame and the EOS row (upstream: the rows it fed, nothing more)."""
    config = model.config
    for which, net in (("cap", model), ("eos", eos_model)):
        gen = RealtimeGenerator(net, tokenizer, num_slots=1, max_context=320, upstream_compat=upstream_compat)
        gen.start_conversation(0)
        frames = _turn(gen, 0, max_frames=60)
        real = gen.frames_generated(0)
        assert (len(frames) == real + 1) if which == "eos" else (len(frames) == real == 60)
        end = gen.context_length(0)
        fed_last = real - 2 if which == "cap" else real - 1  # the cap's last frame was never fed back
        assert torch.equal(gen.context_rows(0)[-1, 1:], frames[fed_last])
        gen.start_turn(0, "Thanks", None, sampling=GREEDY)
        rows = gen.context_rows(0)
        user_start = gen.context_layout(0).turn_starts[-1]
        assert rows[user_start, 0] == 151645  # <|im_end|> opens the user block
        if upstream_compat:
            assert user_start == end
            continue
        # the last real frame's row (fed back or not) is cut and fed again with the next prompt
        assert user_start == end + (2 if which == "cap" else 1)
        assert torch.equal(rows[user_start - 2, 1:], frames[real - 1])
        eos_row = rows[user_start - 1]
        assert eos_row[0] == config.text_pad_id and eos_row[1] == config.audio_eos
        assert bool((eos_row[2:] == config.audio_pad).all())


def test_bad_calls_raise_clear_errors(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256)
    with pytest.raises(ConfigError, match="slot 2"):
        gen.start_conversation(2)
    with pytest.raises(EngineError, match="start_conversation"):
        gen.start_turn(0, "Hi", None)
    gen.start_conversation(0)
    with pytest.raises(EngineError, match="start_turn"):
        gen.push_text(0, "hello")
    with pytest.raises(ConfigError, match="max_top_k"):
        gen.start_turn(0, "Hi", None, sampling=SamplingConfig(top_k=200))
    with pytest.raises(ConfigError, match="repetition_window"):
        gen.start_turn(0, "Hi", None, sampling=SamplingConfig(repetition_window=500))
    with pytest.raises(ConfigError, match="num_slots"):
        RealtimeGenerator(model, tokenizer, num_slots=0)


def test_release_and_reuse(model, tokenizer, tmp_path: Path) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256)
    gen.start_conversation(0)
    first = torch.stack(_turn(gen, 0, max_frames=5))
    gen.release(0)
    assert gen.context_length(0) == 0
    gen.start_conversation(0)
    again = torch.stack(_turn(gen, 0, max_frames=5))
    assert torch.equal(first, again)


def test_held_slots_stay_untouched(model, tokenizer) -> None:
    """``step(hold)`` skips held slots; their frames later equal those of an unheld run."""

    def run(hold_ticks: range) -> list[torch.Tensor]:
        gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256)
        for slot in range(2):
            gen.start_conversation(slot)
            gen.start_turn(slot, "Hi", None, sampling=SamplingConfig(), seed=slot, max_frames=12)
            gen.push_text(slot, TEXT)
            gen.end_text(slot)
        hold = torch.tensor([False, True])
        frames = []
        for tick in range(40):
            held = tick in hold_ticks
            before = gen.context_length(1)
            out = gen.step(hold if held else None)
            if held:
                assert not bool(out.produced[1]) and gen.context_length(1) == before
            if out.produced[1]:
                frames.append(out.frames[1])
        return frames

    free, held = run(range(0)), run(range(2, 9))
    assert len(free) == 12 and all(torch.equal(a, b) for a, b in zip(free, held, strict=True))


def test_attention_in_blocks_of_64_rows_gives_the_frames_of_the_whole_cache(model, tokenizer) -> None:
    """The default bucket (64) reads only the cache rows each slot uses, rounded up to 64, not the
    whole cache: every slot makes the same frames, and its backbone states match the whole-cache
    ones to float rounding, for a long slot and for a short one beside it (each reads its own length).

    States (RMS-normed, up to ~5) are compared within 1e-5 absolute + 1e-5 relative, not bit for bit:
    the CPU attention kernel may sum a different number of masked rows in another order, which on
    some CPUs moves states by ~5e-7. A skipped last block or a mask that ignores the positions moves
    them by 0.03 to 10."""
    hidden, frames = [], []
    for bucket in (None, 64):
        gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=512, attention_bucket=bucket)
        gen.start_conversation(0, system_prompt="A long system prompt. " * 60)
        gen.start_conversation(1)
        for slot in range(2):
            gen.start_turn(slot, "Hi", None, sampling=GREEDY, max_frames=40)
            gen.push_text(slot, TEXT)
            gen.end_text(slot)
        states, codes = [], []
        for _ in range(20):
            out = gen.step()
            assert bool(out.produced.all()) and gen.last_hidden is not None
            states.append(gen.last_hidden.clone())
            codes.append(out.frames)
        lengths = [gen.context_length(slot) for slot in range(2)]
        hidden.append(torch.stack(states))
        frames.append(torch.stack(codes))
    assert lengths[0] - lengths[1] > 128  # the two slots read lengths two 64-row blocks apart at least
    torch.testing.assert_close(hidden[1], hidden[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(frames[0], frames[1])


def test_bucketed_attention_gives_the_same_greedy_frames(model, tokenizer) -> None:
    results = []
    for bucket in (None, 16):
        gen = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256, attention_bucket=bucket)
        for slot in range(2):
            gen.start_conversation(slot)
        frames = [_turn(gen, 0, max_frames=10), _turn(gen, 1, text=TEXT[:40], max_frames=10)]
        results.append(torch.stack([torch.stack(f) for f in frames]))
    assert torch.equal(results[0], results[1])


def test_min_frames_holds_eos_back_per_slot(tokenizer) -> None:
    """A model that picks EOS on every frame still speaks min_frames frames where a slot asks for
    them; a slot beside it without a minimum ends at once, exactly as it does alone."""
    model = _model(seed=0, eos_gain=1.0, eos=60.0)
    eos = model.config.audio_eos
    settings = {
        0: GREEDY,
        1: SamplingConfig(greedy=True, min_frames=7),
        2: SamplingConfig(temperature=0.9, top_k=20, top_p=0.8, min_frames=3, mask_special_codes=False),
    }

    def run(slots: list[int]) -> dict[int, list[torch.Tensor]]:
        gen = RealtimeGenerator(model, tokenizer, num_slots=3, max_context=256)
        for slot in slots:
            gen.start_conversation(slot)
            gen.start_turn(slot, "How are you?", None, sampling=settings[slot], seed=slot, max_frames=30)
            gen.push_text(slot, TEXT)
            gen.end_text(slot)
        made: dict[int, list[torch.Tensor]] = {slot: [] for slot in slots}
        while gen.has_work():
            out = gen.step()
            for slot in slots:
                if out.produced[slot]:
                    made[slot].append(out.frames[slot])
                    assert bool(out.eos[slot]) == (int(out.frames[slot, 0]) == eos)
        return made

    together = run([0, 1, 2])
    ends = {}
    for slot, made in together.items():
        codes = [int(frame[0]) for frame in made]
        assert codes[-1] == eos and eos not in codes[:-1]
        ends[slot] = len(codes) - 1  # the EOS frame's index: real frames before it
    assert ends[0] <= 1  # without a minimum this model stops at once
    assert ends[1] >= 7 and ends[2] >= 3  # never before the minimum, then ended by EOS
    alone = run([0]) | run([1])
    for slot in (0, 1):
        assert len(alone[slot]) == len(together[slot])
        assert all(torch.equal(a, b) for a, b in zip(alone[slot], together[slot], strict=True))


def test_frame_cap_wins_over_min_frames(model, tokenizer) -> None:
    gen = RealtimeGenerator(model, tokenizer, num_slots=1, max_context=256)
    gen.start_conversation(0)
    frames = _turn(gen, 0, sampling=SamplingConfig(greedy=True, min_frames=50), max_frames=5)
    assert len(frames) == 5 and not gen.turn_running(0)
