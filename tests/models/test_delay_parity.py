"""Parity of the Delay processor and model with upstream goldens (../shared/parity/delay).

Cases, their inputs and the tensors they name come from the manifest, so another fixture set of the
same format runs unchanged; a delay case of a kind no test here knows fails loudly.
"""

from __future__ import annotations

import json

import pytest
import torch

from moss_agent.models.delay.processor import Message, TTSProcessor
from tests.models.manifest import (
    case_kind,
    compare_gathered,
    frames_first,
    golden_key,
    json_field,
    manifest_ids,
    require,
)

PARITY_MODEL = "delay"
KNOWN_KINDS = {"proc", "teacher_forced", "generate"}


def named_codes(spec: str | None, case: dict, goldens: dict[str, torch.Tensor], n_vq: int):
    """One audio entry of a processor call as [frames, n_vq]: a golden name ("codes.ref1" or a full
    reference), ``cat(a, b)`` (joined in time), or None (an absent speaker, kept as None)."""
    if spec is None:
        return None
    if spec.startswith("cat(") and spec.endswith(")"):
        return torch.cat([named_codes(n.strip(), case, goldens, n_vq) for n in spec[4:-1].split(",")])
    key = golden_key(spec) if ":" in spec else spec
    # The case's "codes" note states the stored layout, e.g. "...:codes.<name>  [T, n_vq] int64".
    return frames_first(goldens[key], case["inputs"].get("codes", key), n_vq)


def conversation_for(case: dict, proc: TTSProcessor, goldens: dict[str, torch.Tensor]) -> list[Message]:
    """The messages a processor case describes: a user message, then an assistant message when the
    call has one (several audio blocks allowed; ``content`` as stated, else one placeholder each)."""
    n_vq = proc.config.n_vq
    call = case["inputs"]["call"]
    user = dict(call["build_user_message"])
    if user.get("reference") is not None:
        user["reference"] = [named_codes(name, case, goldens, n_vq) for name in user["reference"]]
    messages = [proc.user_message(**user)]
    if "build_assistant_message" in call:
        spec = call["build_assistant_message"]
        audio = [named_codes(name, case, goldens, n_vq) for name in spec["audio_codes_list"]]
        if "content" in spec:
            messages.append(proc.assistant_message(audio, spec["content"]))
        else:
            messages.append(proc.assistant_message(audio))
    return messages


def build_case(case_id: str, cases: dict, proc: TTSProcessor, goldens: dict):
    """The prompt a processor case builds; a batch case names the cases it batches."""
    case = cases[case_id]
    call = case["inputs"]["call"]
    if "conversations" in call:
        convs = [conversation_for(cases[c], proc, goldens) for c in call["conversations"]]
        modes = [cases[c]["inputs"]["mode"] for c in call["conversations"]]
        return proc(convs, modes)
    return proc([conversation_for(case, proc, goldens)], case["inputs"]["mode"])


def check_processor_case(case_id: str, cases: dict, goldens: dict, proc: TTSProcessor) -> None:
    """input_ids and attention_mask equal the goldens the case's outputs name."""
    outputs = cases[case_id]["outputs"]
    prompt = build_case(case_id, cases, proc, goldens)
    assert torch.equal(prompt.input_ids, goldens[golden_key(outputs["input_ids"])])
    assert torch.equal(prompt.attention_mask, goldens[golden_key(outputs["attention_mask"])])


@pytest.mark.parametrize("case_id", manifest_ids(PARITY_MODEL))
def test_every_case_has_a_known_kind(case_id, cases):
    kind = case_kind(require(case_id, cases))
    assert kind in KNOWN_KINDS, f"{case_id}: no parity test handles a delay case of kind {kind!r}"


@pytest.mark.parametrize("case_id", manifest_ids(PARITY_MODEL, "proc"))
def test_processor_ids_match_upstream(case_id, cases, goldens, loaded, model_dir):
    case = require(case_id, cases)
    check_processor_case(case_id, cases, goldens, loaded.processor)
    if "message_contents" not in case["outputs"] or "conversations" in case["inputs"]["call"]:
        return
    section, key = json_field(case["outputs"]["message_contents"])
    contents = json.loads((model_dir / "cases.json").read_text())[section][key]
    built = [m.content for m in conversation_for(case, loaded.processor, goldens)]
    assert built == contents[0]


@pytest.mark.parametrize("case_id", manifest_ids(PARITY_MODEL, "teacher_forced"))
def test_teacher_forced_matches_upstream(case_id, cases, goldens, loaded):
    case = require(case_id, cases)
    tol, outputs = case["tolerance"], case["outputs"]
    ids = goldens[golden_key(case["inputs"]["input_ids"])]
    mask = goldens[golden_key(case["inputs"]["attention_mask"])]
    with torch.no_grad():
        hidden = loaded.model(ids, mask)
        text = loaded.model.text_logits(hidden[:, -1])
        audio = loaded.model.audio_logits(hidden[:, -1])
    torch.testing.assert_close(
        hidden, goldens[golden_key(outputs["last_hidden_state"])], atol=tol["last_hidden_state_atol"], rtol=0
    )
    expected_audio = goldens[golden_key(outputs["audio_logits_last"])]
    finite = torch.isfinite(expected_audio)
    assert torch.equal(torch.isfinite(audio), finite)
    torch.testing.assert_close(audio[finite], expected_audio[finite], atol=tol["logits_atol"], rtol=0)
    text_key = golden_key(outputs["text_logits_last"])
    if text_key in goldens:
        torch.testing.assert_close(text, goldens[text_key], atol=tol["logits_atol"], rtol=0)
    else:  # only parts of the vector are stored: "<base>_top64(_idx)", "<base>_logsumexp", ...
        base = text_key.split("_top")[0].split("_sample")[0].split("_logsumexp")[0]
        assert compare_gathered(text, goldens, base, tol["logits_atol"]), f"no text logits under {base}"


def test_loaded_checkpoint_facts(loaded, model_dir):
    assert loaded.architecture == "delay" and loaded.processor.delayed
    assert loaded.config.n_vq == loaded.model.n_vq
    processor_config = json.loads((model_dir / "checkpoint" / "processor_config.json").read_text())
    assert loaded.codec_name_or_path == processor_config["audio_tokenizer_name_or_path"]
