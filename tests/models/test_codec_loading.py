"""Codec checkpoint loading: the official layout and its alternative spellings, sharding, clear errors,
and the full-size architecture built on the meta device against the published key list."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moss_agent.errors import CheckpointError, ConfigError
from moss_agent.models.codec import CodecConfig, MossAudioTokenizer, load_codec, published_config_dict
from moss_agent.models.codec.tiny import save_tiny_codec

pytestmark = pytest.mark.usefixtures("one_thread")

QKV = "decoder.2.transformer.layers.1.self_attn.in_projs.0.weight"
WN_V = "quantizer.quantizers.1.in_proj.parametrizations.weight.original1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_codec(tmp_path_factory.mktemp("tiny"), seed=11)


def _copy_with(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, str(target / "model.safetensors"))
    return target


def _round_trip(codec: MossAudioTokenizer) -> torch.Tensor:
    wav = 0.3 * torch.randn(1, 1, 4 * 1920, generator=torch.Generator().manual_seed(0))
    codes, _ = codec.encode(wav)
    return codec.decode(codes)[0]


def test_tiny_checkpoint_has_the_official_layout(tiny: Path) -> None:
    tensors = load_file(str(tiny / "model.safetensors"))
    assert QKV in tensors and WN_V in tensors
    assert "quantizer.input_proj.parametrizations.weight.original0" in tensors
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "speech_tokenizer" and len(config["decoder_kwargs"]) == 8
    codec = load_codec(tiny, device="cpu")
    assert codec.dtype == torch.float32 and not any(p.requires_grad for p in codec.parameters())
    assert float(_round_trip(codec).abs().max()) > 0


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_weight_mismatch_names_the_keys(tiny: Path, tmp_path: Path, problem: str) -> None:
    tensors = load_file(str(tiny / "model.safetensors"))
    if problem == "missing":
        del tensors[QKV]
    elif problem == "unexpected":
        tensors["decoder.2.transformer.layers.9.norm1.weight"] = torch.ones(32)
    else:
        tensors[QKV] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as error:
        load_codec(_copy_with(tiny, tmp_path / problem, tensors), device="cpu")
    message = str(error.value)
    assert {"missing": "missing keys", "unexpected": "unexpected keys", "shape": "wrong shape"}[problem] in message
    assert (QKV if problem != "unexpected" else "layers.9.norm1.weight") in message


def test_missing_folder_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_codec(tmp_path / "nowhere", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_codec(tmp_path / "empty", device="cpu")


def test_unusable_config_is_a_checkpoint_error(tiny: Path, tmp_path: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    del config["decoder_kwargs"]
    folder = tmp_path / "nodecoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="decoder_kwargs"):
        load_codec(folder, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["decoder_kwargs"].insert(1, {"module_type": "PatchedPretransform", "patch_size": 2}),
         "multiply to 3840"),
        (lambda c: c["encoder_kwargs"][3].update(input_dimension=33), "33"),
        (lambda c: c["encoder_kwargs"][1].update(norm="rms_norm"), "rms_norm"),
        (lambda c: c["quantizer_kwargs"].update(quantizer_type="fsq"), "fsq"),
        (lambda c: c.update(causal_transformer_context_duration=0.001), "window"),
    ],
)
def test_config_validation(tiny: Path, change: object, message: str) -> None:
    config = json.loads((tiny / "config.json").read_text())
    change(config)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        CodecConfig.from_dict(config)


def test_alternative_key_spellings_load_to_the_same_model(tiny: Path, tmp_path: Path) -> None:
    tensors = load_file(str(tiny / "model.safetensors"))
    renamed = {}
    for key, tensor in tensors.items():
        if key == QKV:
            key = key.replace("in_projs.0.weight", "in_proj_weight")
        elif key.startswith("encoder.1.") and key.endswith("self_attn.in_projs.0.weight"):
            key = key.replace("in_projs.0.weight", "in_proj.weight")
        elif key.endswith("self_attn.out_projs.0.weight") and key.startswith("decoder.0."):
            key = key.replace("out_projs.0.weight", "out_proj.weight")
        elif key.startswith("quantizer.quantizers.0.") and ".parametrizations.weight." in key:
            key = key.replace("parametrizations.weight.original0", "weight_g")
            key = key.replace("parametrizations.weight.original1", "weight_v")
        renamed[key] = tensor
    # An export with weight norm removed stores the merged conv weight g * v / ||v||.
    g = renamed.pop("quantizer.output_proj.parametrizations.weight.original0")
    v = renamed.pop("quantizer.output_proj.parametrizations.weight.original1")
    renamed["quantizer.output_proj.weight"] = torch._weight_norm(v, g, 0)
    reference = _round_trip(load_codec(tiny, device="cpu"))
    other = _round_trip(load_codec(_copy_with(tiny, tmp_path / "renamed", renamed), device="cpu"))
    torch.testing.assert_close(other, reference, atol=1e-5, rtol=0)


def test_sharded_checkpoint(tiny: Path, tmp_path: Path) -> None:
    tensors = load_file(str(tiny / "model.safetensors"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((tiny / "config.json").read_text())
    keys = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(_round_trip(load_codec(folder, device="cpu")),
                               _round_trip(load_codec(tiny, device="cpu")), atol=0, rtol=0)


def test_dtype_choice_keeps_the_quantizer_in_float32(tiny: Path) -> None:
    codec = load_codec(tiny, device="cpu", dtype="bf16")
    assert codec.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in codec.quantizer.parameters())
    codec.to(torch.float16)
    assert codec.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in codec.quantizer.parameters())
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_codec(tiny, device="cpu", dtype="float12")


def test_full_size_architecture_matches_the_published_checkpoint(parity_dir: Path) -> None:
    published = json.loads((parity_dir / "fullsize_state_dict_keys.json").read_text())["codec"]
    config = CodecConfig.from_dict(published_config_dict())
    with torch.device("meta"):
        model = MossAudioTokenizer(config)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == published["keys"]
    assert sum(math.prod(s) for s in shapes.values()) == 1_774_566_400
    assert [s.capacity for s in model._transformers(model.decoder)] == [125, 250, 500, 1000]
    assert model.num_quantizers == 32 and model.codebook_size == 1024
