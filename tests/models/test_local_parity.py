"""Parity of the Local v1 processor, model and greedy generation with upstream goldens."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.batch_sampling import SamplingParams
from moss_agent.models.local.generation import generate_local
from tests.models.manifest import (
    assert_generated_as_upstream,
    case_kind,
    compare_gathered,
    generation_facts,
    golden_key,
    greedy_params,
    manifest_ids,
    max_new_tokens,
    prompt_of,
    require,
    stated_or,
)
from tests.models.test_delay_parity import check_processor_case

PARITY_MODEL = "local"
KNOWN_KINDS = {"proc", "teacher_forced", "generate"}
GENERATE_IDS = manifest_ids(PARITY_MODEL, "generate")


def acting_penalty(case: dict) -> float:
    """The audio repetition penalty that acts in the case: ``facts.repetition_penalty`` ("1.0: no
    repetition penalty acts in this greedy call ...") or ``audio_repetition_penalty=`` in the pins.
    Default 1.0: upstream Local builds no logits processor for a greedy channel, so under greedy
    decoding its sampling default (1.1) does not act (ours does the same with upstream_compatible)."""
    value = stated_or(case, "repetition_penalty", None)
    if value is None:
        value = stated_or(case, "audio_repetition_penalty", 1.0)
    return float(value)  # type: ignore[arg-type]


def stated_params(case: dict) -> SamplingParams:
    # Upstream Local penalises each sample's own history (HF RepetitionPenaltyLogitsProcessor per row).
    return replace(greedy_params(case, acting_penalty(case)), repetition_scope="sample")


def stated_n_vq(case: dict) -> int | None:
    """``n_vq_for_inference`` as the case states it; None (all codebooks, upstream's default) if unstated."""
    value = stated_or(case, "n_vq_for_inference", None)
    return None if value is None else int(value)  # type: ignore[call-overload]


def generate_cases(cases: dict[str, dict]) -> list[dict]:
    found = [cases[i] for i in GENERATE_IDS if i in cases]
    if not found:
        pytest.skip("this fixture set has no local generate case")
    return found


def run(loaded, goldens, case: dict, **kwargs):
    """Our generation on the case's prompt with the case's settings unless ``kwargs`` override them."""
    ids, mask = prompt_of(case, goldens)
    kwargs.setdefault("params", stated_params(case))
    kwargs.setdefault("max_new_tokens", max_new_tokens(case))
    kwargs.setdefault("n_vq_for_inference", stated_n_vq(case))
    return generate_local(loaded.model, ids, mask, **kwargs)


def test_architecture_is_detected(loaded):
    assert loaded.architecture == "local"
    assert not loaded.processor.delayed


@pytest.mark.parametrize("case_id", manifest_ids(PARITY_MODEL))
def test_every_case_has_a_known_kind(case_id, cases):
    kind = case_kind(require(case_id, cases))
    assert kind in KNOWN_KINDS, f"{case_id}: no parity test handles a local case of kind {kind!r}"


@pytest.mark.parametrize("case_id", manifest_ids(PARITY_MODEL, "proc"))
def test_processor_ids_match_upstream(case_id, cases, goldens, loaded):
    require(case_id, cases)
    check_processor_case(case_id, cases, goldens, loaded.processor)


@pytest.mark.parametrize("case_id", manifest_ids(PARITY_MODEL, "teacher_forced"))
def test_teacher_forced_matches_upstream(case_id, cases, goldens, loaded):
    case = require(case_id, cases)
    tol, outputs = case["tolerance"], case["outputs"]
    with torch.no_grad():
        hidden, logits, losses = loaded.model.teacher_forced(
            goldens[golden_key(case["inputs"]["input_ids"])], goldens[golden_key(case["inputs"]["labels"])]
        )
    torch.testing.assert_close(
        hidden, goldens[golden_key(outputs["global_last_hidden_state"])], atol=tol["hidden_atol"], rtol=0
    )
    frame_rows = goldens[golden_key(outputs["audio_logits_frame_rows"])]  # [n_vq, K+1, V]
    audio = torch.stack([lg[0, -frame_rows.shape[1] :] for lg in logits[1:]])
    torch.testing.assert_close(audio, frame_rows, atol=tol["logits_atol"], rtol=0)
    # Text logits are stored in parts (top-k, fixed samples, logsumexp) under each output's base key.
    text_last = golden_key(outputs["text_logits_last"]).split("_top")[0].split("_sample")[0]
    assert compare_gathered(logits[0][0, -1], goldens, text_last, tol["logits_atol"])
    text_rows = golden_key(outputs["text_logits_frame_rows_top"]).split("_top")[0]
    assert compare_gathered(logits[0][0, -frame_rows.shape[1] :], goldens, text_rows, tol["logits_atol"])
    torch.testing.assert_close(
        losses, goldens[golden_key(outputs["loss_all"])], atol=tol["loss_atol"], rtol=0
    )
    torch.testing.assert_close(
        losses.mean().reshape(1), goldens[golden_key(outputs["loss"])], atol=tol["loss_atol"], rtol=0
    )


@pytest.mark.parametrize("case_id", GENERATE_IDS)
def test_greedy_generation_matches_upstream(case_id, cases, loaded, goldens, model_dir):
    case = require(case_id, cases)
    results = run(loaded, goldens, case, upstream_compatible=True)
    expected = generation_facts(case, model_dir)
    assert_generated_as_upstream(results, case, goldens, expected)
    for result, facts in zip(results, expected, strict=True):
        assert result.prompt_frames == facts["start_length"]
        decoded = loaded.processor.decode_text(result.rows[:, 0], result.prompt_frames)
        assert decoded == facts["content_with_escaped_regex"]


@pytest.mark.parametrize("case_id", GENERATE_IDS)
def test_fixed_generation_keeps_text_to_control_tokens(case_id, cases, loaded, goldens):
    case = require(case_id, cases)
    cfg = loaded.config
    for result in run(loaded, goldens, case):
        generated_text = result.rows[result.prompt_frames + 1 :, 0].tolist()
        assert set(generated_text) <= {cfg.audio_assistant_gen_slot_token_id, cfg.audio_end_token_id}
        if result.finished:
            # The end row carries no codes, so every frame sits on a gen-slot row.
            end_row = result.rows[-1]
            assert end_row[0] == cfg.audio_end_token_id and (end_row[1:] == cfg.audio_pad_code).all()
            assert (
                sum(s.shape[0] for s in result.segments)
                == generated_text.count(cfg.audio_assistant_gen_slot_token_id) + result.prompt_frames
            )


def fewer_codebooks(cases: dict[str, dict], n_vq: int) -> int:
    """The reduced codebook count a generate case states (``n_vq_for_inference`` below n_vq), else
    half of n_vq (at least 1): any count below n_vq exercises the padding."""
    stated = [stated_n_vq(c) for c in generate_cases(cases)]
    below = [n for n in stated if n is not None and n < n_vq]
    return below[0] if below else max(1, n_vq // 2)


def test_fewer_codebooks_pad_the_rest(loaded, goldens, cases):
    cfg = loaded.config
    used = fewer_codebooks(cases, cfg.n_vq)
    case = generate_cases(cases)[-1]
    for result in run(loaded, goldens, case, n_vq_for_inference=used):
        generated = result.rows[result.prompt_frames + 1 :]
        assert (generated[:, 1 + used :] == cfg.audio_pad_code).all(), f"n_vq_for_inference={used}"
        assert all(s.shape[1] == used for s in result.segments), f"n_vq_for_inference={used}"
    with pytest.raises(ConfigError, match="n_vq_for_inference"):
        run(loaded, goldens, case, n_vq_for_inference=cfg.n_vq + 1)


def test_batch_equals_single_greedy(loaded, goldens, cases):
    """Every single-sample generate prompt of the set, left padded into one batch, gives each its own
    rows and segments (settings of the first case; the longest stated max_new_tokens)."""
    params = stated_params(generate_cases(cases)[0])
    steps = max(max_new_tokens(c) for c in generate_cases(cases))
    prompts = [prompt_of(c, goldens)[0] for c in generate_cases(cases)]
    singles = [p[0] for p in prompts if p.shape[0] == 1]
    batch = loaded.processor.pad(singles)
    together = generate_local(
        loaded.model,
        batch.input_ids,
        batch.attention_mask,
        params=params,
        max_new_tokens=steps,
        upstream_compatible=True,
    )
    for prompt, t in zip(singles, together, strict=True):
        (a,) = generate_local(
            loaded.model,
            prompt[None],
            torch.ones(1, prompt.shape[0], dtype=torch.bool),
            params=params,
            max_new_tokens=steps,
            upstream_compatible=True,
        )
        n = a.rows.shape[0]
        assert torch.equal(t.rows[:n], a.rows)
        assert all(torch.equal(x, y) for x, y in zip(t.segments, a.segments, strict=True))
