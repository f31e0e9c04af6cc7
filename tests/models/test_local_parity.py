"""Parity of the Local v1 processor, model and greedy generation with upstream goldens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.batch_sampling import SamplingParams
from moss_agent.models.local.generation import generate_local
from tests.models.test_delay_parity import build_case, golden_key, manifest_ids, max_new_tokens, require

PARITY_MODEL = "local"

GREEDY = SamplingParams().greedy()


@pytest.fixture(scope="module")
def cases(parity_dir: Path) -> dict[str, dict]:
    manifest = json.loads((parity_dir / "manifest.json").read_text())
    return {c["id"]: c for c in manifest["cases"] if c["id"].startswith("local.")}


def test_architecture_is_detected(loaded):
    assert loaded.architecture == "local"
    assert not loaded.processor.delayed


@pytest.mark.parametrize(
    "case_id", ["local.proc.text_only", "local.proc.reference", "local.proc.continuation"]
)
def test_processor_ids_match_upstream(case_id, cases, goldens, loaded):
    prompt = build_case(case_id, cases, loaded.processor, goldens)
    assert torch.equal(prompt.input_ids, goldens[f"{case_id}.input_ids"])
    assert torch.equal(prompt.attention_mask, goldens[f"{case_id}.attention_mask"])


@pytest.mark.parametrize("case_id", manifest_ids("local.teacher_forced"))
def test_teacher_forced_matches_upstream(case_id, cases, goldens, loaded):
    case = require(case_id, cases)
    tol = case["tolerance"]
    prefix = case_id
    with torch.no_grad():
        hidden, logits, losses = loaded.model.teacher_forced(
            goldens[golden_key(case["inputs"]["input_ids"])], goldens[golden_key(case["inputs"]["labels"])]
        )
    torch.testing.assert_close(
        hidden, goldens[f"{prefix}.global_last_hidden_state"], atol=tol["hidden_atol"], rtol=0
    )
    frame_rows = goldens[f"{prefix}.audio_logits_frame_rows"]
    audio = torch.stack([lg[0, -frame_rows.shape[1] :] for lg in logits[1:]])
    torch.testing.assert_close(audio, frame_rows, atol=tol["logits_atol"], rtol=0)
    text_last = logits[0][0, -1]
    for key in ("top64", "sample"):
        index = goldens[f"{prefix}.text_logits_last_{key}_idx"]
        torch.testing.assert_close(
            text_last.gather(0, index),
            goldens[f"{prefix}.text_logits_last_{key}"],
            atol=tol["logits_atol"],
            rtol=0,
        )
    rows = logits[0][0, -frame_rows.shape[1] :]
    torch.testing.assert_close(
        rows.gather(1, goldens[f"{prefix}.text_logits_frame_rows_top_idx"]),
        goldens[f"{prefix}.text_logits_frame_rows_top"],
        atol=tol["logits_atol"],
        rtol=0,
    )
    torch.testing.assert_close(losses, goldens[f"{prefix}.loss_all"], atol=tol["loss_atol"], rtol=0)
    torch.testing.assert_close(
        losses.mean().reshape(1), goldens[f"{prefix}.loss"], atol=tol["loss_atol"], rtol=0
    )


def run(loaded, goldens, prompt, **kwargs):
    return generate_local(
        loaded.model,
        goldens[f"local.proc.{prompt}.input_ids"],
        goldens[f"local.proc.{prompt}.attention_mask"],
        params=GREEDY,
        max_new_tokens=10,
        **kwargs,
    )


@pytest.mark.parametrize("case_id", manifest_ids("local.generate."))
def test_greedy_generation_matches_upstream(case_id, cases, loaded, goldens, generation_cases):
    case = require(case_id, cases)
    (result,) = generate_local(
        loaded.model,
        goldens[golden_key(case["inputs"]["input_ids"])],
        goldens[golden_key(case["inputs"]["attention_mask"])],
        params=GREEDY,
        max_new_tokens=max_new_tokens(case),
        upstream_compatible=True,
    )
    facts = generation_cases[case_id][0]
    prefix = f"{case_id}.0"
    assert torch.equal(result.rows, goldens[f"{prefix}.output_ids"])
    assert result.rows[:, 0].tolist() == facts["text_channel"]
    assert [s.shape[0] for s in result.segments] == facts["segment_frames"]
    assert torch.equal(result.segments[0], goldens[f"{prefix}.decoded_codes.0"])
    assert result.prompt_frames == facts["start_length"]
    decoded = loaded.processor.decode_text(result.rows[:, 0], result.prompt_frames)
    assert decoded == facts["content_with_escaped_regex"]


@pytest.mark.parametrize("case", ["reference", "continuation"])
def test_fixed_generation_keeps_text_to_control_tokens(case, loaded, goldens):
    (result,) = run(loaded, goldens, case)
    cfg = loaded.config
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


def test_fewer_codebooks_pad_the_rest(loaded, goldens):
    (result,) = run(loaded, goldens, "continuation", n_vq_for_inference=2)
    cfg = loaded.config
    generated = result.rows[result.prompt_frames + 1 :]
    assert (generated[:, 3:] == cfg.audio_pad_code).all()
    assert all(s.shape[1] == 2 for s in result.segments)
    with pytest.raises(ConfigError, match="n_vq_for_inference"):
        run(loaded, goldens, "continuation", n_vq_for_inference=cfg.n_vq + 1)


def test_batch_equals_single_greedy(loaded, goldens, cases):
    batch = loaded.processor.pad(
        [
            goldens["local.proc.reference.input_ids"][0],
            goldens["local.proc.continuation.input_ids"][0],
        ]
    )
    together = generate_local(
        loaded.model,
        batch.input_ids,
        batch.attention_mask,
        params=GREEDY,
        max_new_tokens=10,
        upstream_compatible=True,
    )
    alone = [
        run(loaded, goldens, "reference", upstream_compatible=True)[0],
        run(loaded, goldens, "continuation", upstream_compatible=True)[0],
    ]
    for t, a in zip(together, alone, strict=True):
        n = a.rows.shape[0]
        assert torch.equal(t.rows[:n], a.rows)
        assert all(torch.equal(x, y) for x, y in zip(t.segments, a.segments, strict=True))
