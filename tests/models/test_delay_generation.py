"""Delay generation: greedy parity with upstream, the fixed trailing frame, batch == single."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.batch_sampling import SamplingParams
from moss_agent.models.delay.generation import generate_delay
from moss_agent.models.tts_loading import LoadedTTS
from tests.models.manifest import (
    assert_generated_as_upstream,
    generation_facts,
    greedy_params,
    manifest_ids,
    max_new_tokens,
    output_key,
    prompt_of,
    require,
    stated_or,
)

PARITY_MODEL = "delay"
GENERATE_IDS = manifest_ids(PARITY_MODEL, "generate")


def stated_params(case: dict) -> SamplingParams:
    """The case's greedy settings. ``audio_repetition_penalty`` defaults to 1.0, upstream Delay
    generate's own default; upstream applies it under greedy decoding too, over the whole batch
    ("batch" scope), so it matters here."""
    penalty = float(stated_or(case, "audio_repetition_penalty", 1.0))  # type: ignore[arg-type]
    return greedy_params(case, penalty)


def generate_cases(cases: dict[str, dict]) -> list[dict]:
    found = [cases[i] for i in GENERATE_IDS if i in cases]
    if not found:
        pytest.skip("this fixture set has no delay generate case")
    return found


def run(loaded: LoadedTTS, goldens: dict, case: dict, **kwargs):
    """Our generation on the case's prompt with the case's settings unless ``kwargs`` override them."""
    ids, mask = prompt_of(case, goldens)
    kwargs.setdefault("params", stated_params(case))
    kwargs.setdefault("max_new_tokens", max_new_tokens(case))
    return generate_delay(loaded.model, ids, mask, **kwargs)


def single_prompts(cases: dict[str, dict], goldens: dict) -> list[torch.Tensor]:
    """Each single-sample generate prompt [L, 1+n_vq] (batch cases are built from such prompts)."""
    prompts = [prompt_of(c, goldens)[0] for c in generate_cases(cases)]
    return [p[0] for p in prompts if p.shape[0] == 1]


@pytest.mark.parametrize("case_id", GENERATE_IDS)
def test_greedy_generation_matches_upstream(case_id, cases, loaded, goldens, model_dir):
    case = require(case_id, cases)
    results = run(loaded, goldens, case, upstream_compatible=True)
    expected = generation_facts(case, model_dir)
    assert_generated_as_upstream(results, case, goldens, expected)
    for result, facts in zip(results, expected, strict=True):
        # Upstream counts the audio_start row as a prompt frame; we report frames.
        assert result.prompt_frames == max(facts["start_length"] - 1, 0)
        assert result.prompt_rows == facts["start_length"]
        decoded = loaded.processor.decode_text(result.rows[:, 0], result.prompt_rows)
        assert decoded == facts["content_with_escaped_regex"]
        assert result.finished


@pytest.mark.parametrize("case_id", GENERATE_IDS)
def test_fixed_flush_has_no_trailing_junk_frame(case_id, cases, loaded, goldens):
    case = require(case_id, cases)
    upstream_all = run(loaded, goldens, case, upstream_compatible=True)
    fixed_all = run(loaded, goldens, case)
    n_vq = loaded.config.n_vq
    for upstream, fixed in zip(upstream_all, fixed_all, strict=True):
        assert upstream.finished and fixed.finished, f"{case_id}: raise the case's max_new_tokens"
        text = fixed.rows[:, 0].tolist()
        gen_rows = text.count(loaded.config.audio_assistant_gen_slot_token_id)
        delay_rows = text.count(loaded.config.audio_assistant_delay_slot_token_id)
        assert delay_rows == n_vq - 1  # the training layout; upstream emits n_vq
        upstream_delay_rows = (
            upstream.rows[:, 0].tolist().count(loaded.config.audio_assistant_delay_slot_token_id)
        )
        assert upstream_delay_rows == n_vq
        (segment,) = fixed.segments
        assert segment.shape[0] == gen_rows  # one frame per gen-slot row, none extra
        assert upstream.segments[0].shape[0] == gen_rows + 1
        # Frames completed before the first delay row are the same in both.
        settled = gen_rows - n_vq + 1
        assert torch.equal(segment[:settled], upstream.segments[0][:settled])


def test_batch_equals_single_greedy(loaded, goldens, cases):
    """Every single generate prompt of the set, left padded into one batch, gives each its own result.
    The repetition history is per sample here, so batching may not change a result by design."""
    case = generate_cases(cases)[0]
    params = replace(stated_params(case), repetition_scope="sample")
    steps = max(max_new_tokens(c) for c in generate_cases(cases))
    prompts = single_prompts(cases, goldens)
    batch = loaded.processor.pad(prompts)
    together_all = generate_delay(
        loaded.model, batch.input_ids, batch.attention_mask, params=params, max_new_tokens=steps
    )
    for prompt, together in zip(prompts, together_all, strict=True):
        (alone,) = generate_delay(
            loaded.model,
            prompt[None],
            torch.ones(1, prompt.shape[0], dtype=torch.bool),
            params=params,
            max_new_tokens=steps,
        )
        n = alone.rows.shape[0]
        assert torch.equal(together.rows[:n], alone.rows)
        # After its end the batched sample only receives filler rows.
        assert (together.rows[n:, 0] == loaded.config.pad_token_id).all()
        assert len(together.segments) == len(alone.segments)
        for a, b in zip(together.segments, alone.segments, strict=True):
            assert torch.equal(a, b)


def test_sampling_is_seeded_and_valid(loaded, goldens, cases):
    params = SamplingParams(audio_repetition_penalty=1.2, repetition_scope="sample")
    batch = loaded.processor.pad(single_prompts(cases, goldens))
    steps = max(max_new_tokens(c) for c in generate_cases(cases))

    def sample(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return generate_delay(
            loaded.model,
            batch.input_ids,
            batch.attention_mask,
            params=params,
            max_new_tokens=steps,
            generator=gen,
        )

    first, again = sample(7), sample(7)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.rows, b.rows)
        for segment in a.segments:
            assert segment.shape[1] == loaded.config.n_vq
            assert int(segment.max()) < loaded.config.audio_vocab_size


def test_generate_rejects_wrong_width(loaded, goldens, cases):
    ids, mask = prompt_of(generate_cases(cases)[0], goldens)
    with pytest.raises(ConfigError, match="codebooks"):
        generate_delay(loaded.model, ids[..., :-1], mask, max_new_tokens=2)  # one codebook short


@pytest.mark.parametrize("case_id", GENERATE_IDS)
def test_static_cache_matches_dynamic(case_id, cases, loaded, goldens):
    case = require(case_id, cases)
    static = run(loaded, goldens, case, upstream_compatible=True, static_cache=True)
    for index, result in enumerate(static):
        assert torch.equal(result.rows, goldens[output_key(case, "output_ids", index)])


def test_on_step_sees_rows_and_can_stop(loaded, goldens, cases):
    """Stopped halfway through its full length, a run ends unfinished with the rows on_step saw."""
    case = generate_cases(cases)[0]
    steps_seen: list[int] = []
    run(loaded, goldens, case, on_step=lambda step, rows: steps_seen.append(step))
    stop_after = max(len(steps_seen) // 2, 1)
    seen_rows = []

    def on_step(step: int, rows: torch.Tensor) -> bool:
        seen_rows.append(rows.clone())
        return step < stop_after - 1

    results = run(loaded, goldens, case, on_step=on_step)
    assert len(seen_rows) == stop_after
    for index, result in enumerate(results):
        assert not result.finished
        assert torch.equal(torch.stack([rows[index] for rows in seen_rows]), result.rows[-stop_after:])
