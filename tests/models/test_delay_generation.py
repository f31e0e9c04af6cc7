"""Delay generation: greedy parity with upstream, the fixed trailing frame, batch == single."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.batch_sampling import SamplingParams
from moss_agent.models.delay.generation import generate_delay
from moss_agent.models.tts_loading import LoadedTTS
from tests.models.test_delay_parity import golden_key, manifest_ids, max_new_tokens, require

PARITY_MODEL = "delay"

GREEDY = SamplingParams().greedy()


@pytest.fixture(scope="module")
def cases(parity_dir: Path) -> dict[str, dict]:
    manifest = json.loads((parity_dir / "manifest.json").read_text())
    return {c["id"]: c for c in manifest["cases"]}


def run(loaded: LoadedTTS, goldens: dict, prompt: str, max_new_tokens: int = 30, **kwargs):
    return generate_delay(
        loaded.model,
        goldens[f"delay.proc.{prompt}.input_ids"],
        goldens[f"delay.proc.{prompt}.attention_mask"],
        params=GREEDY,
        max_new_tokens=max_new_tokens,
        **kwargs,
    )


@pytest.mark.parametrize("case_id", manifest_ids("delay.generate."))
def test_greedy_generation_matches_upstream(case_id, cases, loaded, goldens, generation_cases):
    case = require(case_id, cases)
    results = generate_delay(
        loaded.model,
        goldens[golden_key(case["inputs"]["input_ids"])],
        goldens[golden_key(case["inputs"]["attention_mask"])],
        params=GREEDY,
        max_new_tokens=max_new_tokens(case),
        upstream_compatible=True,
    )
    expected = generation_cases[case_id]
    assert len(results) == len(expected)
    for index, (result, facts) in enumerate(zip(results, expected, strict=True)):
        prefix = f"{case_id}.{index}"
        assert torch.equal(result.rows, goldens[f"{prefix}.output_ids"])
        assert result.rows[:, 0].tolist() == facts["text_channel"]
        assert [s.shape[0] for s in result.segments] == facts["segment_frames"]
        for i, segment in enumerate(result.segments):
            assert torch.equal(segment, goldens[f"{prefix}.decoded_codes.{i}"])
        # Upstream counts the audio_start row as a prompt frame; we report frames.
        assert result.prompt_frames == max(facts["start_length"] - 1, 0)
        assert result.prompt_rows == facts["start_length"]
        decoded = loaded.processor.decode_text(result.rows[:, 0], result.prompt_rows)
        assert decoded == facts["content_with_escaped_regex"]
        assert result.finished


@pytest.mark.parametrize("case", ["reference", "continuation"])
def test_fixed_flush_has_no_trailing_junk_frame(case, loaded, goldens):
    (upstream,) = run(loaded, goldens, case, upstream_compatible=True)
    (fixed,) = run(loaded, goldens, case)
    n_vq = loaded.config.n_vq
    text = fixed.rows[:, 0].tolist()
    gen_rows = text.count(loaded.config.audio_assistant_gen_slot_token_id)
    delay_rows = text.count(loaded.config.audio_assistant_delay_slot_token_id)
    assert delay_rows == n_vq - 1  # the training layout; upstream emits n_vq
    assert upstream.rows[:, 0].tolist().count(loaded.config.audio_assistant_delay_slot_token_id) == n_vq
    (segment,) = fixed.segments
    assert segment.shape[0] == gen_rows  # one frame per gen-slot row, none extra
    assert upstream.segments[0].shape[0] == gen_rows + 1
    # Frames completed before the first delay row are the same in both.
    settled = gen_rows - n_vq + 1
    assert torch.equal(segment[:settled], upstream.segments[0][:settled])


def test_batch_equals_single_greedy(loaded, goldens):
    batch = run(loaded, goldens, "batch")
    singles = [run(loaded, goldens, "text_only")[0], run(loaded, goldens, "reference")[0]]
    for together, alone in zip(batch, singles, strict=True):
        n = alone.rows.shape[0]
        assert torch.equal(together.rows[:n], alone.rows)
        # After its end the batched sample only receives filler rows.
        assert (together.rows[n:, 0] == loaded.config.pad_token_id).all()
        assert len(together.segments) == len(alone.segments)
        for a, b in zip(together.segments, alone.segments, strict=True):
            assert torch.equal(a, b)


def test_sampling_is_seeded_and_valid(loaded, goldens):
    params = SamplingParams(audio_repetition_penalty=1.2, repetition_scope="sample")

    def sample(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return generate_delay(
            loaded.model,
            goldens["delay.proc.batch.input_ids"],
            goldens["delay.proc.batch.attention_mask"],
            params=params,
            max_new_tokens=24,
            generator=gen,
        )

    first, again = sample(7), sample(7)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.rows, b.rows)
        for segment in a.segments:
            assert segment.shape[1] == loaded.config.n_vq
            assert int(segment.max()) < loaded.config.audio_vocab_size


def test_generate_rejects_wrong_width(loaded, goldens):
    ids = goldens["delay.proc.reference.input_ids"][..., :3]
    with pytest.raises(ConfigError, match="codebooks"):
        generate_delay(loaded.model, ids, goldens["delay.proc.reference.attention_mask"], max_new_tokens=2)


def test_static_cache_matches_dynamic(loaded, goldens):
    for case in ("reference", "batch"):
        static = run(loaded, goldens, case, upstream_compatible=True, static_cache=True)
        for index, result in enumerate(static):
            assert torch.equal(result.rows, goldens[f"delay.generate.{case}.{index}.output_ids"])


def test_on_step_sees_rows_and_can_stop(loaded, goldens):
    seen_rows = []

    def on_step(step: int, rows: torch.Tensor) -> bool:
        seen_rows.append(rows.clone())
        return step < 4

    (result,) = run(loaded, goldens, "reference", on_step=on_step)
    assert len(seen_rows) == 5 and not result.finished
    assert torch.equal(torch.cat(seen_rows), result.rows[-5:])
