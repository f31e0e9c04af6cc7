"""Full-size Delay (8B) and Local v1 (1.7B) built on the meta device have the upstream key names and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moss_agent.models.delay.config import TTSModelConfig
from moss_agent.models.delay.tiny import delay_config_dict
from moss_agent.models.tts_loading import model_class

SHAPES = {
    "delay": dict(n_vq=32, hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=12288),
    "local": dict(n_vq=32, hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=6144),
}
LOCAL_DEFAULTS = dict(
    local_hidden_size=1536,
    local_ffn_hidden_size=8960,
    local_num_layers=4,
    additional_mlp_ffn_hidden_size=2048,
)


@pytest.mark.parametrize("arch", ["delay", "local"])
def test_fullsize_state_dict_matches_upstream(parity_dir: Path, arch: str):
    expected = json.loads((parity_dir / "fullsize_state_dict_keys.json").read_text())[arch]["keys"]
    raw = delay_config_dict(**SHAPES[arch])
    if arch == "local":
        raw.update(LOCAL_DEFAULTS)
    config = TTSModelConfig.from_dict(raw)
    with torch.device("meta"):
        model = model_class(config)(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == dict(expected)
