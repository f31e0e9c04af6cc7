"""Parity of the Delay processor and model with upstream goldens (../shared/parity/delay)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moss_agent.models.delay.processor import Message, TTSProcessor
from tests.conftest import _parity_root

PARITY_MODEL = "delay"


@pytest.fixture(scope="module")
def cases(parity_dir: Path) -> dict[str, dict]:
    manifest = json.loads((parity_dir / "manifest.json").read_text())
    return {c["id"]: c for c in manifest["cases"] if c["id"].startswith(("delay.", "local."))}


def conversation_for(case: dict, proc: TTSProcessor, goldens: dict[str, torch.Tensor]) -> list[Message]:
    """The messages a processor case describes (codes referenced by name in the goldens)."""
    call = case["inputs"]["call"]
    user = dict(call["build_user_message"])
    if "reference" in user:
        user["reference"] = [goldens[name] for name in user["reference"]]
    messages = [proc.user_message(**user)]
    if "build_assistant_message" in call:
        (spec,) = call["build_assistant_message"]["audio_codes_list"]
        names = spec[4:-1].split(", ") if spec.startswith("cat(") else [spec]
        messages.append(proc.assistant_message([torch.cat([goldens[n] for n in names])]))
    return messages


def build_case(case_id: str, cases: dict, proc: TTSProcessor, goldens: dict):
    case = cases[case_id]
    call = case["inputs"]["call"]
    if "conversations" in call:
        convs = [conversation_for(cases[c], proc, goldens) for c in call["conversations"]]
        modes = [cases[c]["inputs"]["mode"] for c in call["conversations"]]
        return proc(convs, modes)
    return proc([conversation_for(case, proc, goldens)], case["inputs"]["mode"])


def manifest_ids(prefix: str) -> list[str]:
    """Case ids with ``prefix`` from the manifest, read at collection so another fixture set runs unchanged."""
    root = _parity_root()
    manifest = root / "manifest.json" if root is not None else None
    if manifest is None or not manifest.is_file():
        return [f"{prefix}<no parity goldens>"]
    return [c["id"] for c in json.loads(manifest.read_text())["cases"] if c["id"].startswith(prefix)]


def golden_key(reference: str) -> str:
    """'delay/goldens.safetensors:some.key  [shape note]' -> 'some.key'."""
    return reference.split(":", 1)[1].split()[0]


def max_new_tokens(case: dict) -> int:
    match = re.search(r"max_new_tokens=(\d+)", case["pins"])
    assert match, f"{case['id']} does not state max_new_tokens"
    return int(match.group(1))


def require(case_id: str, cases: dict) -> dict:
    if case_id not in cases:
        pytest.skip(f"{case_id} is not in this fixture set")
    return cases[case_id]


@pytest.mark.parametrize("case_id", manifest_ids("delay.proc."))
def test_processor_ids_match_upstream(case_id, cases, goldens, loaded, model_dir):
    require(case_id, cases)
    prompt = build_case(case_id, cases, loaded.processor, goldens)
    assert torch.equal(prompt.input_ids, goldens[f"{case_id}.input_ids"])
    assert torch.equal(prompt.attention_mask, goldens[f"{case_id}.attention_mask"])
    contents = json.loads((model_dir / "cases.json").read_text())["processor_contents"][case_id]
    call = cases[case_id]["inputs"]["call"]
    if "conversations" not in call:
        built = [m.content for m in conversation_for(cases[case_id], loaded.processor, goldens)]
        assert built == contents[0]


@pytest.mark.parametrize("case_id", manifest_ids("delay.teacher_forced."))
def test_teacher_forced_matches_upstream(case_id, cases, goldens, loaded):
    case = require(case_id, cases)
    tol = case["tolerance"]
    ids = goldens[golden_key(case["inputs"]["input_ids"])]
    mask = goldens[golden_key(case["inputs"]["attention_mask"])]
    with torch.no_grad():
        hidden = loaded.model(ids, mask)
        text = loaded.model.text_logits(hidden[:, -1])
        audio = loaded.model.audio_logits(hidden[:, -1])
    prefix = case_id
    torch.testing.assert_close(
        hidden, goldens[f"{prefix}.last_hidden_state"], atol=tol["last_hidden_state_atol"], rtol=0
    )
    expected_audio = goldens[f"{prefix}.audio_logits_last"]
    finite = torch.isfinite(expected_audio)
    assert torch.equal(torch.isfinite(audio), finite)
    torch.testing.assert_close(audio[finite], expected_audio[finite], atol=tol["logits_atol"], rtol=0)
    if f"{prefix}.text_logits_last" in goldens:
        torch.testing.assert_close(
            text, goldens[f"{prefix}.text_logits_last"], atol=tol["logits_atol"], rtol=0
        )
    else:
        index = goldens[f"{prefix}.text_logits_last_top64_idx"]
        torch.testing.assert_close(
            text.gather(1, index),
            goldens[f"{prefix}.text_logits_last_top64"],
            atol=tol["logits_atol"],
            rtol=0,
        )
        torch.testing.assert_close(
            text.logsumexp(-1),
            goldens[f"{prefix}.text_logits_last_logsumexp"],
            atol=tol["logits_atol"],
            rtol=0,
        )


def test_loaded_checkpoint_facts(loaded, model_dir):
    assert loaded.architecture == "delay" and loaded.processor.delayed
    assert loaded.config.n_vq == loaded.model.n_vq
    processor_config = json.loads((model_dir / "checkpoint" / "processor_config.json").read_text())
    assert loaded.codec_name_or_path == processor_config["audio_tokenizer_name_or_path"]
