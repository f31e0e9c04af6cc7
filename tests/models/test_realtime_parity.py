"""MOSS-TTS-Realtime against the upstream goldens in ../shared/parity (realtime.* cases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moss_agent.models.realtime import RealtimeGenerator, SamplingConfig, load_realtime
from moss_agent.models.realtime.prompt import PromptBuilder
from moss_agent.models.realtime.text import UpstreamSegmentTokenizer
from tests.models.manifest import (
    case_kind,
    frames_first,
    golden_key,
    manifest_ids,
    model_info,
    require,
    stated_or,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PARITY_MODEL = "realtime"
KNOWN_KINDS = {"teacher_forced", "stream"}
STREAM_IDS = manifest_ids(PARITY_MODEL, "stream")


def pushes_text(case: dict) -> bool:
    return any(entry["push"] == "text" for entry in case.get("facts", {}).get("push_log", []))


TEXT_STREAM_IDS = manifest_ids(PARITY_MODEL, "stream", where=pushes_text)  # cases that push token ids have no text to split


@pytest.fixture(scope="module")
def driver(parity_dir: Path) -> dict:
    """The fixture driver's settings (``models.realtime.sampling``: do_sample, penalty, window, cap)."""
    return model_info(parity_dir, PARITY_MODEL).get("sampling", {})


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    return load_realtime(model_dir / "checkpoint", device="cpu", dtype="float32")


def frame_cap(case: dict, driver: dict, goldens: dict) -> int:
    """``max_frames`` as the case or the driver states it (the cap belongs to the fixture driver;
    upstream drains until EOS). Unstated: the golden frame count when ``facts.stop`` says the cap
    ended the turn, else one frame more, so a turn that should have ended at EOS but runs on shows up
    as a frame mismatch."""
    frames = goldens[golden_key(case["outputs"]["frames"])].shape[0]
    default = frames if case.get("facts", {}).get("stop") == "frame_cap" else frames + 1
    return int(stated_or(case, "max_frames", default, driver))  # type: ignore[call-overload]


def upstream_sampling(case: dict, driver: dict, cap: int) -> SamplingConfig:
    """Greedy decoding with the stated repetition penalty and window, masking nothing (as upstream).
    Unstated values take upstream's streaming defaults (penalty 1.1, window 50). A window of None or
    <= 0 means the whole turn upstream; here that is a window as long as the frame cap."""
    do_sample = stated_or(case, "do_sample", False, driver)
    assert not do_sample, f"{case['id']}: sampled goldens depend on upstream's RNG and cannot be replayed"
    penalty = float(stated_or(case, "repetition_penalty", 1.1, driver))  # type: ignore[arg-type]
    window = stated_or(case, "repetition_window", 50, driver)
    if window is None or int(window) <= 0:  # type: ignore[call-overload]
        window = cap
    return SamplingConfig(
        greedy=True, mask_special_codes=False, repetition_penalty=penalty, repetition_window=int(window)
    )


def chain_of(case_id: str, cases: dict[str, dict]) -> list[dict]:
    """The case and the cases whose end state it starts from (``inputs.previous_state`` names one),
    oldest first."""
    chain = [cases[case_id]]
    while "previous_state" in chain[0]["inputs"]:
        note = chain[0]["inputs"]["previous_state"]
        named = [i for i in cases if i in note and i != chain[0]["id"]]
        assert named, f"{chain[0]['id']}: previous_state names no case of this set: {note!r}"
        chain.insert(0, cases[max(named, key=len)])
    return chain


def codes_input(case: dict, name: str, goldens: dict, rvq: int) -> torch.Tensor | None:
    """Input codes as [frames, codebooks] (the manifest's shape note says how they are stored)."""
    reference = case["inputs"].get(name)
    if reference is None:
        return None
    return frames_first(goldens[golden_key(reference)], reference, rvq)


def pushes_of(case: dict) -> list[tuple[str, object]]:
    """What the driver pushed: string deltas, or the token ids in chunks of ``push_chunk`` (else the
    payloads of the recorded push log)."""
    inputs = case["inputs"]
    if "text_deltas" in inputs:
        return [("text", delta) for delta in inputs["text_deltas"]]
    ids = inputs["text_token_ids"]
    if "push_chunk" in inputs:
        chunk = int(inputs["push_chunk"])
        return [("tokens", ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    log = case.get("facts", {}).get("push_log")
    assert log, f"{case['id']}: states neither push_chunk nor a push_log"
    return [(entry["push"], entry["payload"]) for entry in log if entry["push"] in ("tokens", "text")]


@pytest.mark.parametrize("case_id", manifest_ids(PARITY_MODEL))
def test_every_case_has_a_known_kind(case_id, cases) -> None:
    kind = case_kind(require(case_id, cases))
    assert kind in KNOWN_KINDS, f"{case_id}: no parity test handles a realtime case of kind {kind!r}"


def test_checkpoint_keys_match_the_listing(model_dir: Path, loaded) -> None:
    model, _ = loaded
    listing = json.loads((model_dir / "state_dict_keys.json").read_text())["keys"]
    ours = model.state_dict()
    for entry in listing:
        if entry["key"] == "language_model.embed_tokens.weight":
            continue  # unused upstream; loading tolerates it and does not keep it
        assert tuple(ours[entry["key"]].shape) == tuple(entry["shape"])
    assert len(ours) == len(listing) - 1


@pytest.mark.parametrize("case_id", manifest_ids(PARITY_MODEL, "teacher_forced"))
def test_teacher_forced(case_id, loaded, goldens, cases) -> None:
    case = require(case_id, cases)
    model, _ = loaded
    tol, inputs, outputs = case["tolerance"], case["inputs"], case["outputs"]
    ids = goldens[golden_key(inputs["input_ids"])]
    codes = goldens[golden_key(inputs["frame_codes"])]
    with torch.inference_mode():
        hidden = model(ids, torch.ones(ids.shape[:2], dtype=torch.bool))
        cache = model.new_backbone_cache(2, ids.shape[1] + 8)
        cached = model.prefill(cache, 1, ids[0], 0)
        last = hidden[:, -1]
        stepwise = model.local_transformer.teacher_forced_logits(last, codes)
        full = model.local_transformer.full_pass_logits(last, codes)
    expected = goldens[golden_key(outputs["last_hidden_state"])]
    assert (hidden - expected).abs().max() <= tol["last_hidden_state_atol"]
    assert (cached - expected[0]).abs().max() <= tol["last_hidden_state_atol"]
    assert (stepwise - goldens[golden_key(outputs["local_logits_stepwise"])]).abs().max() <= tol[
        "logits_atol"
    ]
    assert (full - goldens[golden_key(outputs["local_logits_fullpass"])]).abs().max() <= tol["logits_atol"]


@pytest.mark.parametrize("case_id", STREAM_IDS)
def test_turn_rows(case_id, loaded, goldens, cases) -> None:
    """The rows a turn feeds: system block (and voice prompt) on a fresh session, then the user turn."""
    case = require(case_id, cases)
    model, tokenizer = loaded
    prompts = PromptBuilder(tokenizer, model.config)
    rvq = model.config.rvq
    user_rows = prompts.user_rows(
        case["inputs"].get("user_text"), codes_input(case, "user_audio_codes", goldens, rvq)
    )
    if "previous_state" not in case["inputs"]:
        voice = codes_input(case, "voice_prompt_codes", goldens, rvq)
        user_rows = torch.cat([prompts.system_rows(case["inputs"].get("system_prompt"), voice), user_rows])
    assert torch.equal(user_rows, goldens[golden_key(case["outputs"]["turn_input_ids"])])


@pytest.mark.parametrize("case_id", TEXT_STREAM_IDS)
def test_upstream_segmentation_matches_push_log(case_id, loaded, cases) -> None:
    case = require(case_id, cases)
    _, tokenizer = loaded
    log = case["facts"]["push_log"]
    segmenter = UpstreamSegmentTokenizer(tokenizer)
    pending: list[int] = []
    for entry in log:
        if entry["push"] != "text":
            continue
        pending += segmenter.push(entry["payload"])
        if entry["frames_emitted"] == 0:  # nothing consumed yet: the pending list is comparable
            assert pending == entry["pending_after"]


class _Driver:
    """Replays the fixture driver on one slot of a batched generator: pushes, end_text, drain,
    stopping at the frame cap as the driver did."""

    def __init__(self, gen: RealtimeGenerator, slot: int, cap: int) -> None:
        self.gen = gen
        self.slot = slot
        self.cap = cap
        self.frames: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []

    def drain(self) -> None:
        while self.gen.has_work() and len(self.frames) < self.cap:
            out = self.gen.step()
            if out.produced[self.slot]:
                self.frames.append(out.frames[self.slot])
                assert self.gen.last_hidden is not None
                self.hidden.append(self.gen.last_hidden[self.slot].clone())

    def run(self, pushes: list[tuple[str, object]]) -> tuple[torch.Tensor, torch.Tensor]:
        for kind, payload in pushes:
            if len(self.frames) >= self.cap:
                break
            if kind == "tokens":
                self.gen.push_tokens(self.slot, payload)  # type: ignore[arg-type]
            else:
                self.gen.push_text(self.slot, payload)  # type: ignore[arg-type]
            self.drain()
        if len(self.frames) < self.cap:
            self.gen.end_text(self.slot)
            self.drain()
        return torch.stack(self.frames), torch.stack(self.hidden)


def replay(
    gen: RealtimeGenerator,
    slot: int,
    case: dict,
    goldens: dict,
    driver: dict,
    hidden_atol: float | None = None,
) -> None:
    """One stream case on ``slot`` (a fresh conversation unless it continues from a previous state),
    checked against every golden it names; ``hidden_atol`` replaces the case's (other devices)."""
    inputs, outputs, rvq = case["inputs"], case["outputs"], gen.model.config.rvq
    if "previous_state" not in inputs:
        gen.start_conversation(
            slot, inputs.get("system_prompt"), codes_input(case, "voice_prompt_codes", goldens, rvq)
        )
    before = gen.context_length(slot) if "previous_state" in inputs else 0
    cap = frame_cap(case, driver, goldens)
    sampling = upstream_sampling(case, driver, cap)
    user_codes = codes_input(case, "user_audio_codes", goldens, rvq)
    gen.start_turn(slot, inputs.get("user_text"), user_codes, sampling=sampling, max_frames=cap)
    frames, hidden = _Driver(gen, slot, cap).run(pushes_of(case))
    where = f"{case['id']} (max_frames={cap}, penalty={sampling.repetition_penalty}, window={sampling.repetition_window})"
    assert torch.equal(frames, goldens[golden_key(outputs["frames"])]), where
    step_hidden = goldens[golden_key(outputs["step_hidden"])]
    atol = case["tolerance"]["step_hidden_atol"] if hidden_atol is None else hidden_atol
    assert (hidden - step_hidden).abs().max() <= atol, where
    rows = gen.context_rows(slot)
    fed = goldens[golden_key(outputs["fed_rows"])]
    assert torch.equal(rows[before:], fed), where
    prefill = goldens[golden_key(outputs["prefill_input_ids"])]
    assert torch.equal(rows[before : before + prefill.shape[0]], prefill), where
    calls = goldens[golden_key(outputs["call_lengths"])]
    assert int(calls.sum()) == fed.shape[0] and bool((calls[1:] == 1).all()), where
    mask = goldens[golden_key(outputs["final_attention_mask"])]
    assert mask.shape[0] == gen.context_length(slot) and bool(mask.all()), where
    facts = case.get("facts", {})
    if "kv_cache_len_at_end" in facts:
        assert gen.context_length(slot) == facts["kv_cache_len_at_end"], where


def stream_generator(loaded, cases: dict, goldens: dict, driver: dict, num_slots: int) -> RealtimeGenerator:
    """A generator sized for every stream case of the set: context for the longest session (its
    final attention mask covers the whole cache) plus headroom, the widest stated penalty window."""
    model, tokenizer = loaded
    stream = [c for c in cases.values() if case_kind(c) == "stream"]
    longest = max(goldens[golden_key(c["outputs"]["final_attention_mask"])].shape[0] for c in stream)
    windows = [upstream_sampling(c, driver, frame_cap(c, driver, goldens)).repetition_window for c in stream]
    return RealtimeGenerator(
        model,
        tokenizer,
        num_slots=num_slots,
        max_context=longest + 64,
        max_repetition_window=max(windows),
        upstream_compat=True,
    )


@pytest.mark.parametrize("slot", [0, 2])
@pytest.mark.parametrize("case_id", STREAM_IDS)
def test_stream_greedy(case_id, slot, loaded, goldens, cases, driver) -> None:
    """A stream case (after the cases it continues from) on one slot of a 3-slot generator, while
    slot 1 holds another session of the set, which is checked too."""
    require(case_id, cases)
    chain = chain_of(case_id, cases)
    gen = stream_generator(loaded, cases, goldens, driver, num_slots=3)
    heads = [c for c in cases.values() if case_kind(c) == "stream" and "previous_state" not in c["inputs"]]
    others = [c for c in heads if c["id"] != chain[0]["id"]]
    if others:
        replay(gen, 1, others[0], goldens, driver)
    for case in chain:
        replay(gen, slot, case, goldens, driver)
