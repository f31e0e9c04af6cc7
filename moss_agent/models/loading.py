"""Checkpoint folder or hub id -> config dict + state dict, with errors that list what is wrong."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from moss_agent.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
# Seconds to wait for the hub's first answer: an offline machine fails in that time, not after the
# operating system's TCP timeout (minutes: the hub library sets no timeout on that request).
HUB_TIMEOUT_S = 5.0
_LOCAL_FOLDER = "pass {DIR}, a folder that holds config.json"
# config.json model_type -> the checkpoint, so an error can say what a wrong folder holds.
_MODEL_NAMES = {
    "moss_tts_realtime": "MOSS-TTS-Realtime",
    "speech_tokenizer": "MOSS-Audio-Tokenizer (the codec)",
    "moss-audio-tokenizer": "MOSS-Audio-Tokenizer (the codec)",
    "moss_tts_delay": "a MOSS-TTS batch model (TTS, TTSD, VoiceGenerator or SoundEffect)",
    "moss_tts_local": "MOSS-TTS Local v1.5 (model_type 'moss_tts_local', not supported yet)",
}


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """Return a local folder for ``path_or_id``: an existing folder, or a hub id downloaded to the cache.

    A string that looks like a filesystem path (absolute, relative with ``./``, ``~``, or a folder
    that exists here followed by a name) is never sent to the hub, so a typo in a local path gives a
    clear error instead of a download failure. Offline (no connection, or ``HF_HUB_OFFLINE=1``), a hub
    id already in the cache loads from it; otherwise CheckpointError says how to get the folder.
    """
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{text} is a file, not a checkpoint folder", source=text, remedy=_LOCAL_FOLDER)
    looks_local = (
        text.startswith(("/", ".", "~"))
        or text.count("/") != 1
        or isinstance(path_or_id, Path)
        or path.parent.is_dir()
    )
    if looks_local:
        raise CheckpointError(f"checkpoint folder {text} does not exist", source=text, remedy=_LOCAL_FOLDER)
    return _download(text)


def _download(repo_id: str) -> Path:
    """The hub snapshot of ``repo_id`` (weights and configs only), from the cache when the hub is out of reach."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    started = time.monotonic()
    try:
        # Asked first, with a timeout; the download then skips this request (a commit is given).
        revision = HfApi().repo_info(repo_id, timeout=HUB_TIMEOUT_S).sha
    except RepositoryNotFoundError as exc:  # also gated and private models
        raise _hub_error(repo_id, exc, time.monotonic() - started) from exc
    except Exception as exc:  # no answer (offline, DNS, timeout, HF_HUB_OFFLINE) or the hub failed
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS, local_files_only=True))
        except Exception:
            raise _hub_error(repo_id, exc, time.monotonic() - started) from exc
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as exc:
        raise _hub_error(repo_id, exc, 0.0) from exc


def _hub_error(repo_id: str, exc: Exception, waited_s: float) -> CheckpointError:
    """One line for what went wrong with the hub, instead of the hub library's paragraphs."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    fetch = f"download it where there is network (hf download {repo_id} --local-dir DIR) and pass {{DIR}}"
    if isinstance(exc, GatedRepoError):
        problem = (
            f"{repo_id} is gated on the Hugging Face hub: accept its terms at "
            f"https://huggingface.co/{repo_id} and log in with: hf auth login"
        )
        return CheckpointError(problem, source=repo_id, remedy="or pass {DIR}, a copy of it")
    if isinstance(exc, RepositoryNotFoundError):
        problem = (
            f"{repo_id} is neither a folder here nor a model on the Hugging Face hub "
            "(a private one needs: hf auth login)"
        )
        return CheckpointError(problem, source=repo_id, remedy=f"check the id, or {_LOCAL_FOLDER}")
    if isinstance(exc, OfflineModeIsEnabled):
        reason = "offline mode is on (HF_HUB_OFFLINE) and it is not in the cache"
    elif isinstance(exc, HfHubHTTPError):
        reason = f"the Hugging Face hub answered HTTP {getattr(exc.response, 'status_code', '?')}"
    elif waited_s >= HUB_TIMEOUT_S:
        reason = f"the Hugging Face hub did not answer within {HUB_TIMEOUT_S:g} s (offline?)"
    elif type(exc).__name__ in ("ConnectError", "ConnectionError"):  # httpx / requests, by hub version
        reason = "no connection to the Hugging Face hub (offline?)"
    else:  # disk full, an interrupted transfer...
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return CheckpointError(f"could not download {repo_id}: {reason}", source=repo_id, remedy=fetch)


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json, so it is not a checkpoint folder",
            source=folder,
            remedy=_LOCAL_FOLDER,
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc


def check_model_type(raw: Mapping[str, object], folder: Path, expected: tuple[str, ...], name: str) -> None:
    """Raise CheckpointError naming the model ``folder`` holds when its config.json's model_type is
    not one of ``expected`` (a folder without model_type passes: exporters drop it)."""
    found = raw.get("model_type")
    if found is None or found in expected:
        return
    holds = _MODEL_NAMES.get(str(found), f"a model of model_type {found!r}")
    raise CheckpointError(
        f"{folder} holds {holds}, not {name}", source=folder, remedy=f"pass {{DIR}}, the folder of {name}"
    )


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
