"""ModelRegistry: a realtime engine and a batch engine built together hold the codec once."""

from __future__ import annotations

import pytest
import torch

from moss_agent.engine.registry import ModelRegistry
from moss_agent.models.delay.tiny import save_tiny_delay


@pytest.fixture(scope="module")
def delay_dir(tmp_path_factory):
    return save_tiny_delay(tmp_path_factory.mktemp("delay16"), n_vq=16, seed=2, scripted_frames=6)


def storages(module: torch.nn.Module) -> dict[int, int]:
    """Distinct parameter/buffer storages of a module: data_ptr -> bytes."""
    out = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


def test_realtime_and_batch_engines_share_one_codec(tiny_codec_dir, tiny_realtime_dir, delay_dir):
    registry = ModelRegistry(device="cpu", dtype="float32")
    realtime = registry.realtime_engine(tiny_realtime_dir, tiny_codec_dir)
    batch = registry.batch_engine(
        delay_dir, str(tiny_codec_dir) + "/."
    )  # another spelling of the same folder
    assert realtime.codec is batch.codec
    assert registry.codec(tiny_codec_dir) is batch.codec
    codec_storages = storages(batch.codec)
    assert storages(realtime.codec) == codec_storages
    # Everything the two engines hold: the codec's bytes count once.
    held: dict[int, int] = {}
    for module in (realtime.generator.model, realtime.codec, batch.tts.model, batch.codec):
        held.update(storages(module))
    model_bytes = sum(storages(realtime.generator.model).values()) + sum(storages(batch.tts.model).values())
    assert sum(held.values()) == model_bytes + sum(codec_storages.values())
    assert len(registry.loaded()["codec"]) == 1
    assert registry.tts(delay_dir) is batch.tts


def test_another_dtype_is_another_codec(tiny_codec_dir):
    registry = ModelRegistry(device="cpu")
    fp32 = registry.codec(tiny_codec_dir, dtype="float32")
    bf16 = registry.codec(tiny_codec_dir, dtype="bfloat16")
    assert fp32 is not bf16
    assert registry.codec(tiny_codec_dir) is fp32  # CPU default dtype is float32
    assert len(registry.loaded()["codec"]) == 2
