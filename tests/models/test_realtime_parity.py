"""MOSS-TTS-Realtime against the upstream goldens in ../shared/parity (realtime.* cases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moss_agent.models.realtime import RealtimeGenerator, SamplingConfig, load_realtime
from moss_agent.models.realtime.prompt import PromptBuilder
from moss_agent.models.realtime.text import UpstreamSegmentTokenizer
from tests.conftest import parity_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY_UPSTREAM = SamplingConfig(greedy=True, mask_special_codes=False)
FRAME_CAP = 20  # the fixture driver's cap


@pytest.fixture(scope="module")
def realtime_dir(parity_dir: Path) -> Path:
    return parity_model_dir(parity_dir, "realtime")


@pytest.fixture(scope="module")
def goldens(realtime_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(realtime_dir / "goldens.safetensors"))


@pytest.fixture(scope="module")
def cases(parity_dir: Path) -> dict[str, dict]:
    manifest = json.loads((parity_dir / "manifest.json").read_text())
    return {case["id"]: case for case in manifest["cases"] if case["id"].startswith("realtime.")}


@pytest.fixture(scope="module")
def loaded(realtime_dir: Path):
    return load_realtime(realtime_dir / "checkpoint", device="cpu", dtype="float32")


def test_checkpoint_keys_match_the_listing(realtime_dir: Path, loaded) -> None:
    model, _ = loaded
    listing = json.loads((realtime_dir / "state_dict_keys.json").read_text())["keys"]
    ours = model.state_dict()
    for entry in listing:
        if entry["key"] == "language_model.embed_tokens.weight":
            continue  # unused upstream; loading tolerates it and does not keep it
        assert tuple(ours[entry["key"]].shape) == tuple(entry["shape"])
    assert len(ours) == len(listing) - 1


def test_teacher_forced(loaded, goldens, cases) -> None:
    model, _ = loaded
    tol = cases["realtime.teacher_forced"]["tolerance"]
    ids = goldens["a.input_ids"]
    with torch.inference_mode():
        hidden = model(ids, torch.ones(ids.shape[:2], dtype=torch.bool))
        cache = model.new_backbone_cache(2, ids.shape[1] + 8)
        cached = model.prefill(cache, 1, ids[0], 0)
        last = hidden[:, -1]
        stepwise = model.local_transformer.teacher_forced_logits(last, goldens["a.frame_codes"])
        full = model.local_transformer.full_pass_logits(last, goldens["a.frame_codes"])
    expected = goldens["a.last_hidden_state"]
    assert (hidden - expected).abs().max() <= tol["last_hidden_state_atol"]
    assert (cached - expected[0]).abs().max() <= tol["last_hidden_state_atol"]
    assert (stepwise - goldens["a.local_logits_stepwise"]).abs().max() <= tol["logits_atol"]
    assert (full - goldens["a.local_logits_fullpass"]).abs().max() <= tol["logits_atol"]


def test_prompt_rows(loaded, goldens, cases) -> None:
    model, tokenizer = loaded
    prompts = PromptBuilder(tokenizer, model.config)
    b1 = torch.cat([prompts.system_rows(), prompts.user_rows(None, None)])
    assert torch.equal(b1, goldens["b1.turn_input_ids"])
    user_text = cases["realtime.stream_voice_prompt_user_turn"]["inputs"]["user_text"]
    voice = goldens["b2.voice_prompt_codes"].T  # stored [32, T]: ours takes [frames, codebooks]
    b2 = torch.cat(
        [prompts.system_rows(None, voice), prompts.user_rows(user_text, goldens["b2.user_audio_codes"])]
    )
    assert torch.equal(b2, goldens["b2.turn_input_ids"])
    second = cases["realtime.stream_second_turn_kv_reuse"]["inputs"]["user_text"]
    assert torch.equal(
        prompts.user_rows(second, goldens["c.user_audio_codes"].T), goldens["c.turn_input_ids"]
    )


def test_upstream_segmentation_matches_push_log(loaded, cases) -> None:
    _, tokenizer = loaded
    log = cases["realtime.stream_second_turn_kv_reuse"]["facts"]["push_log"]
    segmenter = UpstreamSegmentTokenizer(tokenizer)
    pending: list[int] = []
    for entry in log:
        if entry["push"] != "text":
            continue
        pending += segmenter.push(entry["payload"])
        if entry["frames_emitted"] == 0:  # nothing consumed yet: the pending list is comparable
            assert pending == entry["pending_after"]


class _Driver:
    """Replays the fixture driver on one slot of a batched generator: pushes, end_text, drain."""

    def __init__(self, gen: RealtimeGenerator, slot: int) -> None:
        self.gen = gen
        self.slot = slot
        self.frames: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []

    def drain(self) -> None:
        while self.gen.has_work() and len(self.frames) < FRAME_CAP:
            out = self.gen.step()
            if out.produced[self.slot]:
                self.frames.append(out.frames[self.slot])
                assert self.gen.last_hidden is not None
                self.hidden.append(self.gen.last_hidden[self.slot].clone())

    def run(self, pushes: list[tuple[str, object]]) -> tuple[torch.Tensor, torch.Tensor]:
        for kind, payload in pushes:
            if len(self.frames) >= FRAME_CAP:
                break
            if kind == "tokens":
                self.gen.push_tokens(self.slot, payload)  # type: ignore[arg-type]
            else:
                self.gen.push_text(self.slot, payload)  # type: ignore[arg-type]
            self.drain()
        if len(self.frames) < FRAME_CAP:
            self.gen.end_text(self.slot)
            self.drain()
        return torch.stack(self.frames), torch.stack(self.hidden)


def _check_stream(gen, slot, prefix, frames, hidden, goldens, tol, context_before: int) -> None:
    assert torch.equal(frames, goldens[f"{prefix}.frames"])
    assert (hidden - goldens[f"{prefix}.step_hidden"]).abs().max() <= tol["step_hidden_atol"]
    rows = gen.context_rows(slot)
    fed = goldens[f"{prefix}.fed_rows"]
    assert torch.equal(rows[context_before:], fed)
    prefill = goldens[f"{prefix}.prefill_input_ids"]
    assert torch.equal(rows[context_before : context_before + prefill.shape[0]], prefill)
    calls = goldens[f"{prefix}.call_lengths"]
    assert int(calls.sum()) == fed.shape[0] and bool((calls[1:] == 1).all())
    mask = goldens[f"{prefix}.final_attention_mask"]
    assert mask.shape[0] == gen.context_length(slot) and bool(mask.all())


@pytest.mark.parametrize("slot", [0, 2])
def test_streams_greedy(loaded, goldens, cases, slot: int) -> None:
    """All three stream cases, on one slot of a 3-slot generator while another slot runs b1."""
    model, tokenizer = loaded
    gen = RealtimeGenerator(model, tokenizer, num_slots=3, max_context=320, upstream_compat=True)
    other = 1
    b1 = cases["realtime.stream_no_voice_prompt"]
    gen.start_conversation(other)
    gen.start_turn(other, sampling=GREEDY_UPSTREAM, max_frames=FRAME_CAP)
    ids = b1["inputs"]["text_token_ids"]
    frames, hidden = _Driver(gen, other).run([("tokens", ids[i : i + 5]) for i in range(0, len(ids), 5)])
    _check_stream(gen, other, "b1", frames, hidden, goldens, b1["tolerance"], 0)

    b2 = cases["realtime.stream_voice_prompt_user_turn"]
    gen.start_conversation(slot, voice_codes=goldens["b2.voice_prompt_codes"].T)
    gen.start_turn(
        slot,
        b2["inputs"]["user_text"],
        goldens["b2.user_audio_codes"],
        sampling=GREEDY_UPSTREAM,
        max_frames=FRAME_CAP,
    )
    ids = b2["inputs"]["text_token_ids"]
    frames, hidden = _Driver(gen, slot).run([("tokens", ids[i : i + 4]) for i in range(0, len(ids), 4)])
    _check_stream(gen, slot, "b2", frames, hidden, goldens, b2["tolerance"], 0)

    c = cases["realtime.stream_second_turn_kv_reuse"]
    before = gen.context_length(slot)
    gen.start_turn(
        slot,
        c["inputs"]["user_text"],
        goldens["c.user_audio_codes"].T,
        sampling=GREEDY_UPSTREAM,
        max_frames=FRAME_CAP,
    )
    frames, hidden = _Driver(gen, slot).run([("text", delta) for delta in c["inputs"]["text_deltas"]])
    _check_stream(gen, slot, "c", frames, hidden, goldens, c["tolerance"], before)
    assert gen.context_length(slot) == c["facts"]["kv_cache_len_at_end"]
