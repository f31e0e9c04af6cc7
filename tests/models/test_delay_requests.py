"""Requests, processor validation, text normaliser and checkpoint loading errors (tiny checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moss_agent.errors import CheckpointError, ConfigError
from moss_agent.models.batch_sampling import PRESETS, SamplingParams, preset, top_k_filter, top_p_filter
from moss_agent.models.delay.dialogue import normalize_dialogue
from moss_agent.models.delay.normalize import normalize_tts_text
from moss_agent.models.delay.pattern import apply_delay, remove_delay, rows_to_segments, split_segments
from moss_agent.models.delay.requests import (
    DialogueRequest,
    SoundEffectRequest,
    TTSRequest,
    VoiceDesignRequest,
    prepare_batch,
)
from moss_agent.models.delay.tiny import save_tiny_delay
from moss_agent.models.local.tiny import save_tiny_local
from moss_agent.models.tts_loading import LoadedTTS, load_tts


@pytest.fixture(scope="module")
def tiny_delay(tmp_path_factory) -> Path:
    return save_tiny_delay(tmp_path_factory.mktemp("tiny_delay"), n_vq=3, hidden=12, head_dim=4, seed=3)


@pytest.fixture(scope="module")
def loaded(tiny_delay: Path) -> LoadedTTS:
    return load_tts(tiny_delay, device="cpu")


# ---------------------------------------------------------------- normaliser


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Wait...   what?!", "Wait。what？！"),
        ("第一句\n第二句", "第一句。第二句"),
        ("我们用Python写 代码", "我们用 Python 写代码"),
        ("版本 v1.2.3 发布了！！！", "版本 v1.2.3 发布了！"),
        ("see https://a.b/c?d=1... ok", "see https://a.b/c?d=1... ok"),
        ("[S1] hi there. [S2] hello {laugh}", "[S1] hi there. [S2] hello {laugh}"),
        ("nin2 hao3，qing3 wen4", "nin2 hao3，qing3 wen4"),
        ("步骤一 -> 步骤二", "步骤一，步骤二"),
        ("【通知】明天放假", "通知。明天放假"),
        ("- item one\n- item two", "item one。item two"),
    ],
)
def test_normaliser(raw, clean):
    assert normalize_tts_text(raw) == clean
    assert normalize_tts_text(clean) == clean


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("[1] Hello: world... [2] 哈哈哈，好的。好。", "[S1]Hello, world。[S2][笑]，好的，好。"),
        (
            "[S1] first turn, [S1] same speaker\n[S2] “quoted” -- text",
            "[S1]first turn.same speaker[S2]quoted  text",
        ),
    ],
)
def test_dialogue_normaliser(raw, clean):
    assert normalize_dialogue(raw) == clean


# ---------------------------------------------------------------- pattern


def test_delay_pattern_round_trip_and_split():
    codes = torch.arange(15).reshape(5, 3)
    delayed = apply_delay(codes, 1024)
    assert delayed.shape == (7, 3)
    assert delayed[0, 1] == 1024 and delayed[1, 1] == codes[0, 1] and delayed[6, 2] == codes[4, 2]
    assert torch.equal(remove_delay(delayed), codes)
    pad = torch.full((2, 3), 1024)
    joined = torch.cat([pad, codes[:2], pad, codes[2:], pad])
    segments = split_segments(joined, 1024)  # upstream crashes on a second segment
    assert [s.tolist() for s in segments] == [codes[:2].tolist(), codes[2:].tolist()]
    rows = torch.cat([torch.zeros(joined.shape[0], 1, dtype=torch.long), joined], dim=1)
    assert len(rows_to_segments(rows, pad_code=1024, delayed=False)) == 2


# ---------------------------------------------------------------- sampling


def test_filters_and_presets():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, True, False, True]]
    kept = top_p_filter(logits, 0.5)
    assert torch.isfinite(kept).sum() == 1  # the top token alone holds more than half the mass
    assert preset("moss-ttsd").audio_repetition_penalty == 1.1
    assert set(PRESETS) >= {"moss-tts", "moss-ttsd", "voice-generator", "sound-effect", "moss-tts-local"}
    with pytest.raises(ConfigError, match="unknown sampling preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(audio_top_p=0.0)


# ---------------------------------------------------------------- requests


def test_requests_build_the_documented_prompts(loaded):
    proc = loaded.processor
    ref = torch.randint(0, 1024, (4, 3))
    prompt = prepare_batch(
        proc,
        [
            TTSRequest("Hello", reference=ref, language="English", tokens=30),
            SoundEffectRequest("rain on a roof", duration_s=3.2),
            VoiceDesignRequest("a calm voice", "Good evening"),
            DialogueRequest("[1] hi [2] hello... [1] bye", references=[None, ref], normalize=True),
            TTSRequest("continue this", continuation=ref),
        ],
    )
    assert prompt.input_ids.shape[0] == 5 and prompt.input_ids.shape[2] == 4
    texts = [
        proc.tokenizer.decode(row[mask, 0].tolist(), skip_special_tokens=False)
        for row, mask in zip(prompt.input_ids, prompt.attention_mask, strict=True)
    ]
    assert (
        "- Tokens:\n30\n" in texts[0]
        and "- Language:\nEnglish\n" in texts[0]
        and "[S1]:\n<|audio_start|>" in texts[0]
    )
    assert "- Tokens:\n40\n" in texts[1] and "- Ambient Sound:\nrain on a roof\n" in texts[1]
    assert "- Text:\nNone\n" in texts[1]
    assert "- Instruction:\na calm voice\n" in texts[2]
    assert "- Text:\n[S1]hi[S2]hello。[S1]bye\n" in texts[3]
    assert "[S2]:\n<|audio_start|>" in texts[3] and "[S1]:" not in texts[3].split("- Instruction")[0]
    assert texts[3].rstrip().endswith("<|audio_assistant_gen_slot|>")  # continuation from the references
    assert texts[4].endswith("<|audio_assistant_gen_slot|>" * 4)
    assert not prompt.attention_mask[:, -1].logical_not().any()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TTSRequest(""), "empty"),
        (lambda: TTSRequest(123), "must be a string"),  # type: ignore[arg-type]
        (lambda: TTSRequest("hi", tokens=0), "positive"),
        (lambda: TTSRequest("hi", reference=[[1, 2]]), "codec codes"),  # type: ignore[arg-type]
        (lambda: DialogueRequest("no tags here"), "speaker tags"),
        (lambda: DialogueRequest("[S7] hi"), r"\[S1\]\.\.\[S5\]"),
        (lambda: SoundEffectRequest("rain", duration_s=-1), "duration_s"),
        (lambda: VoiceDesignRequest("", "text"), "instruction"),
    ],
)
def test_bad_requests_raise_config_error(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.randint(0, 1024, (4, 5)), r"shape \[T, 3\]"),
        (torch.rand(4, 3), "integer"),
        (torch.zeros(0, 3, dtype=torch.long), "empty"),
        (torch.full((2, 3), 1024), "outside"),
    ],
)
def test_bad_codes_raise_config_error(loaded, codes, message):
    with pytest.raises(ConfigError, match=message):
        prepare_batch(loaded.processor, [TTSRequest("hi", reference=codes)])


def test_control_tokens_in_text_are_rejected(loaded):
    with pytest.raises(ConfigError, match="control token"):
        prepare_batch(loaded.processor, [TTSRequest("say <|audio_start|> now")])


def test_processor_mode_errors(loaded):
    proc = loaded.processor
    user = proc.user_message(text="hi")
    with pytest.raises(ConfigError, match="continuation mode"):
        proc([[user]], "continuation")
    with pytest.raises(ConfigError, match="mode must be"):
        proc([[user]], "training")  # type: ignore[arg-type]


def test_generate_through_loaded_model(loaded):
    results = loaded.generate(
        [TTSRequest("Hello there")], params=preset("moss-tts").greedy(), max_new_tokens=12
    )
    (result,) = results
    assert result.rows.shape[1] == 4
    assert all(s.shape[1] == 3 for s in result.segments)
    with pytest.raises(ConfigError, match="Local model option"):
        loaded.generate([TTSRequest("Hello")], max_new_tokens=2, n_vq_for_inference=2)


# ---------------------------------------------------------------- loading


def test_bf16_checkpoint_loads_as_fp32_and_bf16(tiny_delay, loaded):
    assert loaded.model.dtype == torch.float32 and loaded.architecture == "delay"
    stored = load_file(str(tiny_delay / "model.safetensors"))
    assert stored["lm_heads.1.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded.model.lm_heads[1].weight, stored["lm_heads.1.weight"].float())
    half = load_tts(tiny_delay, device="cpu", dtype="bf16")
    assert half.model.dtype == torch.bfloat16


def _copy_checkpoint(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(src / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


def test_missing_and_misshaped_keys_are_listed(tiny_delay, tmp_path):
    broken = _copy_checkpoint(tiny_delay, tmp_path / "missing", lambda w: w.pop("lm_heads.2.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: lm_heads\.2\.weight"):
        load_tts(broken, device="cpu")

    def reshape(w):
        w["emb_ext.0.weight"] = w["emb_ext.0.weight"][:100]

    wrong = _copy_checkpoint(tiny_delay, tmp_path / "shape", reshape)
    with pytest.raises(CheckpointError, match=r"wrong shape.*emb_ext\.0\.weight"):
        load_tts(wrong, device="cpu")


def test_config_errors(tmp_path, tiny_delay):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tts(tmp_path / "nowhere", device="cpu")
    folder = tmp_path / "v15"
    folder.mkdir()
    raw = json.loads((tiny_delay / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "moss_tts_local"}))
    with pytest.raises(CheckpointError, match="model_type"):
        load_tts(folder, device="cpu")


def test_local_tiny_checkpoint_round_trip(tmp_path, tiny_delay):
    folder = save_tiny_local(tmp_path / "local", n_vq=3, tokenizer_source=tiny_delay)
    local = load_tts(folder, device="cpu")
    assert local.architecture == "local" and local.config.n_vq == 3
    pad_row = local.model.model.embedding_list[1].weight[local.config.audio_pad_code]
    assert (pad_row == 0).all()
    (result,) = local.generate([TTSRequest("Hi")], params=SamplingParams().greedy(), max_new_tokens=6)
    assert result.rows[0, 0] == local.config.audio_start_token_id
