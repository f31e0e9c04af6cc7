"""MossTTSRealtime: 17 summed input embeddings, a transformers Qwen3Model backbone, a local transformer.

Module paths equal the official checkpoint's keys (``embed_tokens.{0..16}``, ``language_model.*``,
``local_transformer.*``), so ``OpenMOSS-Team/MOSS-TTS-Realtime`` loads unchanged. The backbone's own
``embed_tokens`` is never used (inputs are always embeddings) and is not kept in memory.

Two backbone paths share the weights:
- ``forward``: the transformers Qwen3Model forward over whole sequences (teacher forcing, checks);
- ``prefill`` / ``decode``: our own cached path over a preallocated per-slot KV cache
  (``BackboneCache``), one slot's prompt at a time, or one row for every slot in one batched call.

Architecture facts from the upstream MOSS-TTS-Realtime description (reference/realtime-model.md).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from moss_agent.errors import CheckpointError, ConfigError
from moss_agent.models.loading import (
    check_model_type,
    check_state_dict,
    load_safetensors,
    pick_device,
    pick_dtype,
    read_config,
    resolve_checkpoint,
)
from moss_agent.models.realtime.config import RealtimeConfig
from moss_agent.models.realtime.layers import ATTENTION_KINDS, PackedLayer, attend, rms_norm, signed_sin
from moss_agent.models.realtime.local_transformer import LocalTransformer

log = logging.getLogger(__name__)

UNUSED_KEYS = ("language_model.embed_tokens.weight",)


@dataclass
class BackboneCache:
    """Per-slot keys/values: [layers, slots, kv_heads, capacity + 1, head_dim].

    Row ``capacity`` is spare room: a slot that does not advance in a batched step writes its
    throw-away key at its current length, which is free space (or this spare row when full).
    """

    keys: torch.Tensor
    values: torch.Tensor
    cos: torch.Tensor  # [capacity + 1, head_dim] RoPE for every position, model dtype
    sin: torch.Tensor  # the same for sin, first half negated (see layers.signed_sin)
    key_positions: torch.Tensor  # arange(capacity + 1)
    slot_index: torch.Tensor  # arange(num_slots)

    @property
    def num_slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3] - 1


class MossTTSRealtime(nn.Module):
    def __init__(self, config: RealtimeConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if attn_implementation not in ATTENTION_KINDS:
            raise ConfigError(f"attn_implementation {attn_implementation!r}; use one of {ATTENTION_KINDS}")
        self.config = config
        hidden = config.hidden_size
        language = copy.deepcopy(config.language_config)
        text_pad = language.get("pad_token_id")
        self.embed_tokens = nn.ModuleList(
            [nn.Embedding(config.text_vocab_size, hidden, padding_idx=text_pad)]
            + [
                nn.Embedding(config.audio_vocab_size, hidden, padding_idx=config.audio_pad)
                for _ in range(config.rvq)
            ]
        )
        # _from_config mutates the config it is given (attention kind), so give it its own copy.
        self.language_model = Qwen3Model._from_config(
            Qwen3Config(**language), attn_implementation=attn_implementation
        )
        self.language_model.embed_tokens = None  # dead weight upstream: inputs are always embeddings
        self.local_transformer = LocalTransformer(config)
        self.attention_kind = "eager" if attn_implementation == "eager" else "sdpa"
        self.local_transformer.attention_kind = self.attention_kind
        self._packed: list[PackedLayer] = []

    @property
    def device(self) -> torch.device:
        return self.local_transformer.local_lm_heads[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local_transformer.local_lm_heads[0].weight.dtype

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """Rebuild the non-persistent RoPE buffers (after a meta-device build or ``to_empty``)."""
        rotary = Qwen3RotaryEmbedding(config=self.language_model.config)
        self.language_model.rotary_emb = rotary.to(device) if device is not None else rotary
        self.local_transformer.reset_rope(device)
        self._packed = []

    # -- embeddings -------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [..., 1 + rvq] (text id, then codebooks 0..rvq-1) -> summed embeddings [..., hidden]."""
        x = self.embed_tokens[0](ids[..., 0])
        for channel in range(1, self.config.rvq + 1):
            x = x + self.embed_tokens[channel](ids[..., channel])
        return x

    # -- whole-sequence path (transformers Qwen3Model) --------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T, 1 + rvq]; attention_mask: [B, T] -> last hidden state [B, T, hidden] (post-norm)."""
        out = self.language_model(
            inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, use_cache=False
        )
        return out.last_hidden_state

    # -- cached path ---------------------------------------------------------------------------

    def new_backbone_cache(self, num_slots: int, capacity: int) -> BackboneCache:
        cfg = self.language_model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, capacity + 1, head_dim)
        positions = torch.arange(capacity + 1, device=self.device)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.language_model.rotary_emb(probe, positions[None])  # any rope type the config names
        return BackboneCache(
            keys=torch.zeros(shape, dtype=self.dtype, device=self.device),
            values=torch.zeros(shape, dtype=self.dtype, device=self.device),
            cos=cos[0],
            sin=signed_sin(sin[0]),
            key_positions=positions,
            slot_index=torch.arange(num_slots, device=self.device),
        )

    def prepare_inference(self) -> None:
        """Arrange the weights for the cached path now (otherwise done on first use); call again
        after moving or replacing weights (stale arrangements are also detected and rebuilt)."""
        self._layers()
        self.local_transformer.packed()

    def _layers(self) -> list[PackedLayer]:
        # The staleness check reads data pointers, which a traced step cannot; it was done eagerly.
        if not self._packed or (not torch.compiler.is_compiling() and not self._packed[0].is_current()):
            self._packed = [PackedLayer(layer) for layer in self.language_model.layers]
            tables = [self.embed_tokens[c] for c in range(1, self.config.rvq + 1)]
            self._audio_table = _fuse_embeddings(self, tables)
            self._audio_offsets = (
                torch.arange(self.config.rvq, device=self.device) * self.config.audio_vocab_size
            )
        return self._packed

    def _embed_fast(self, ids: torch.Tensor) -> torch.Tensor:
        """Like ``embed`` with one lookup for all audio channels: ids [N, 1 + rvq] -> [N, hidden]."""
        audio = F.embedding(ids[:, 1:] + self._audio_offsets, self._audio_table).sum(dim=1)
        return audio + self.embed_tokens[0](ids[:, 0])

    def prefill(self, cache: BackboneCache, slot: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Feed rows ids [T, 1 + rvq] to one slot at positions start..start+T-1 -> hidden [T, hidden]."""
        layers = self._layers()
        length = ids.shape[0]
        end = start + length
        if end > cache.capacity:
            raise ConfigError(f"prefill would reach row {end}, beyond the cache capacity {cache.capacity}")
        x = self._embed_fast(ids)[None]
        cos = cache.cos[start:end].view(1, length, 1, -1)
        sin = cache.sin[start:end].view(1, length, 1, -1)
        mask = (cache.key_positions[None, :end] <= cache.key_positions[start:end, None])[None, None]
        for index, layer in enumerate(layers):
            q, k, v = layer.project(x, cos, sin)
            keys = cache.keys[index, slot : slot + 1]
            values = cache.values[index, slot : slot + 1]
            keys[:, :, start:end] = k.transpose(1, 2)
            values[:, :, start:end] = v.transpose(1, 2)
            out = attend(q, keys[:, :, :end], values[:, :, :end], mask, self.attention_kind)
            x = layer.finish(x, out)
        return self._final_norm(x[0])

    def decode(
        self,
        cache: BackboneCache,
        ids: torch.Tensor,
        positions: torch.Tensor,
        spans: Sequence[tuple[int, int, int]],
    ) -> torch.Tensor:
        """One row per slot, all slots in one call: ids [S, 1 + rvq], positions [S] -> hidden [S, hidden].

        Slot s writes its row at ``positions[s]`` and attends to its keys 0..positions[s].
        ``spans``: (first slot, end slot, key rows) runs that cover the slots in order; a run's
        attention reads its first ``key rows`` cache rows (more than any of its positions). A
        slot's result depends on its own rows and its run's length only: attention kernels sum
        over the rows they read in an order that may depend on their count, so a slot that must
        not depend on its neighbours gets a length that depends on itself alone.
        """
        layers = self._layers()
        slots = ids.shape[0]
        x = self._embed_fast(ids)[:, None]
        cos = cache.cos[positions].view(slots, 1, 1, -1)
        sin = cache.sin[positions].view(slots, 1, 1, -1)
        widest = max(length for _, _, length in spans)
        mask = (cache.key_positions[None, :widest] <= positions[:, None]).view(slots, 1, 1, widest)
        rows = cache.slot_index
        for index, layer in enumerate(layers):
            q, k, v = layer.project(x, cos, sin)
            keys = cache.keys[index]
            values = cache.values[index]
            keys[rows, :, positions] = k[:, 0]
            values[rows, :, positions] = v[:, 0]
            parts = [
                attend(
                    q[first:end],
                    keys[first:end, :, :length],
                    values[first:end, :, :length],
                    mask[first:end, :, :, :length],
                    self.attention_kind,
                )
                for first, end, length in spans
            ]
            x = layer.finish(x, parts[0] if len(parts) == 1 else torch.cat(parts))
        return self._final_norm(x[:, 0])

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.language_model.norm
        return rms_norm(x, norm.weight, norm.variance_epsilon)


def _fuse_embeddings(owner: nn.Module, tables: list[nn.Embedding]) -> torch.Tensor:
    """One [n * V, hidden] table whose blocks are the given tables (their weights become views)."""
    fused = getattr(owner, "_fused_audio_table", None)
    if isinstance(fused, torch.Tensor) and fused.data_ptr() == tables[0].weight.data_ptr():
        return fused
    fused = torch.cat([table.weight.detach() for table in tables])
    rows = tables[0].weight.shape[0]
    for index, table in enumerate(tables):
        table.weight.data = fused[index * rows : (index + 1) * rows]
    object.__setattr__(owner, "_fused_audio_table", fused)
    return fused


# -- loading -----------------------------------------------------------------------------------


def choose_attention(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """sdpa by default; flash_attention_2 when flash-attn is installed on an Ampere+ GPU in 16-bit."""
    if requested is not None:
        if requested not in ATTENTION_KINDS:
            raise ConfigError(f"attn_implementation {requested!r}; use one of {ATTENTION_KINDS}")
        if requested == "flash_attention_2" and not _flash_attention_usable(device, dtype):
            raise ConfigError(
                "flash_attention_2 needs the flash-attn package, a CUDA GPU of compute capability 8.0+ "
                "and bfloat16/float16 weights; install moss-agent[flash-attn] or use 'sdpa'"
            )
        return requested
    return "flash_attention_2" if _flash_attention_usable(device, dtype) else "sdpa"


def _flash_attention_usable(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def build_realtime(config: RealtimeConfig, attn_implementation: str = "sdpa") -> MossTTSRealtime:
    """A model with freshly initialised weights (for tiny test checkpoints)."""
    return MossTTSRealtime(config, attn_implementation)


def expected_checkpoint_shapes(config: RealtimeConfig) -> dict[str, torch.Size]:
    """Key -> shape of the official checkpoint for this config (includes the unused backbone embedding)."""
    with torch.device("meta"):
        model = MossTTSRealtime(config)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    shapes[UNUSED_KEYS[0]] = torch.Size([config.text_vocab_size, config.hidden_size])
    return shapes


def model_from_state_dict(
    config: RealtimeConfig,
    state: dict[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    source: str = "state dict",
) -> MossTTSRealtime:
    """Build on the meta device, check every key and shape, then materialise only the real weights."""
    with torch.device("meta"):
        model = MossTTSRealtime(config, attn_implementation)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    check_state_dict(expected, state, source=source, ignored=UNUSED_KEYS)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    model.reset_buffers(device)
    model.eval().requires_grad_(False)
    return model


def load_realtime_tokenizer(folder: Path, config: RealtimeConfig) -> Any:
    """The checkpoint's tokenizer; checks that the pad strings map to the ids the model was trained on."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer peeks at config.json, whose model type transformers does not know, and warns
    # about it; the tokenizer files themselves are standard, so that warning is noise here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"could not load the tokenizer from {folder}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    for name, wanted in (("<|text_pad|>", config.text_pad_id), ("<|audio_pad|>", config.audio_pad_text_id)):
        found = tokenizer.convert_tokens_to_ids(name)
        if found != wanted:
            raise CheckpointError(
                f"tokenizer in {folder} maps {name} to {found}, the model expects {wanted}; "
                "use the tokenizer files shipped with the checkpoint"
            )
    return tokenizer


def load_realtime(
    path_or_id: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> tuple[MossTTSRealtime, Any]:
    """Load MOSS-TTS-Realtime from a local folder or hub id -> (model, tokenizer).

    ``device`` defaults to CUDA when available; ``dtype`` to bf16 on CUDA and fp32 on the CPU
    (bf16 files are cast losslessly). ``attn_implementation``: None (auto), sdpa, eager, flash_attention_2.
    """
    folder = resolve_checkpoint(path_or_id)
    raw = read_config(folder)
    check_model_type(raw, folder, ("moss_tts_realtime",), "MOSS-TTS-Realtime")
    config = RealtimeConfig.from_dict(raw)
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    attention = choose_attention(attn_implementation, target, torch_dtype)
    state = load_safetensors(folder)
    model = model_from_state_dict(
        config, state, device=target, dtype=torch_dtype, attn_implementation=attention, source=str(folder)
    )
    del state
    tokenizer = load_realtime_tokenizer(folder, config)
    log.info(
        "loaded MOSS-TTS-Realtime",
        extra={
            "folder": str(folder),
            "device": str(target),
            "dtype": str(torch_dtype),
            "attention": attention,
        },
    )
    return model, tokenizer
