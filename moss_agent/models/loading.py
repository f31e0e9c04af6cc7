"""Checkpoint folder or hub id -> config dict + state dict, with errors that list what is wrong."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from moss_agent.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """Return a local folder for ``path_or_id``: an existing folder, or a hub id downloaded to the cache.

    A string that looks like a filesystem path (absolute, relative with ``./``, ``~``) is never sent
    to the hub, so a typo in a local path gives a clear error instead of a confusing download failure.
    """
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{text} is a file; pass the checkpoint folder that holds config.json")
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") != 1 or isinstance(path_or_id, Path)
    if looks_local:
        raise CheckpointError(f"checkpoint folder {text} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as exc:  # the hub raises many types: offline, 404, gated, auth
        raise CheckpointError(
            f"could not fetch {text} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "check the id and your network, or download it and pass the local folder"
        ) from exc


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is this a checkpoint folder?")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a single-file or sharded safetensors checkpoint on the CPU."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight shard {file} listed in the index is missing")
        try:
            tensors.update(load_file(str(file), device="cpu"))
        except Exception as exc:
            raise CheckpointError(f"could not read {file}: {exc}") from exc
    return tensors


def check_state_dict(
    expected: Mapping[str, torch.Size],
    found: Mapping[str, torch.Tensor],
    *,
    source: str,
    ignored: Iterable[str] = (),
) -> None:
    """Raise CheckpointError listing missing, unexpected and wrongly shaped keys, if any."""
    ignored_set = set(ignored)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ignored_set)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    problems = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if keys:
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
            problems.append(f"{title} keys: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model architecture; " + "; ".join(problems))


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA by default, fp32 on the CPU; strings like 'bfloat16' or 'fp16' accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(dtype, dtype)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value
