"""Load a MOSS batch TTS checkpoint (Delay or Local v1) with its processor, picking the class from config.json."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moss_agent.errors import CheckpointError, ConfigError
from moss_agent.models.batch_sampling import SamplingParams, preset
from moss_agent.models.delay.config import ARCH_DELAY, ARCH_LOCAL, TTSModelConfig
from moss_agent.models.delay.generation import GeneratedSample, StepCallback, generate_delay
from moss_agent.models.delay.model import MossTTSDelayModel
from moss_agent.models.delay.processor import BatchPrompt, TTSProcessor
from moss_agent.models.delay.requests import Request, prepare_batch
from moss_agent.models.loading import (
    check_model_type,
    check_state_dict,
    load_safetensors,
    pick_device,
    pick_dtype,
    read_config,
    resolve_checkpoint,
)
from moss_agent.models.local.generation import generate_local
from moss_agent.models.local.model import MossTTSLocalModel

log = logging.getLogger(__name__)

TTSModel = MossTTSDelayModel | MossTTSLocalModel


@dataclass
class LoadedTTS:
    """A batch TTS model, its processor and config. ``architecture`` is ``"delay"`` or ``"local"``."""

    model: TTSModel
    processor: TTSProcessor
    config: TTSModelConfig
    folder: Path
    codec_name_or_path: str | None = None  # processor_config.json's audio tokenizer (the shared codec)

    @property
    def architecture(self) -> str:
        return self.config.architecture

    def prepare(self, requests: Sequence[Request]) -> BatchPrompt:
        """Validated requests -> left-padded prompt batch."""
        return prepare_batch(self.processor, requests)

    def generate(
        self,
        prompt: BatchPrompt | Sequence[Request],
        *,
        params: SamplingParams | None = None,
        max_new_tokens: int = 2000,
        generator: torch.Generator | None = None,
        upstream_compatible: bool = False,
        n_vq_for_inference: int | None = None,
        static_cache: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[GeneratedSample]:
        """Generate for a prompt batch (or requests); one GeneratedSample per item, in order.

        ``params`` defaults to the architecture's recommended preset ("moss-tts" / "moss-tts-local").
        ``static_cache`` (Delay) preallocates the KV cache; ``on_step(step, rows)`` may return False to stop.
        """
        if not isinstance(prompt, BatchPrompt):
            prompt = self.prepare(prompt)
        if isinstance(self.model, MossTTSLocalModel):
            return generate_local(
                self.model,
                prompt.input_ids,
                prompt.attention_mask,
                params=params or preset("moss-tts-local"),
                max_new_tokens=max_new_tokens,
                n_vq_for_inference=n_vq_for_inference,
                generator=generator,
                upstream_compatible=upstream_compatible,
                on_step=on_step,
            )
        if n_vq_for_inference is not None:
            raise ConfigError("n_vq_for_inference is a Local model option; Delay models use all codebooks")
        return generate_delay(
            self.model,
            prompt.input_ids,
            prompt.attention_mask,
            params=params or preset("moss-tts"),
            max_new_tokens=max_new_tokens,
            generator=generator,
            upstream_compatible=upstream_compatible,
            static_cache=static_cache,
            on_step=on_step,
        )


def model_class(config: TTSModelConfig) -> type[TTSModel]:
    return MossTTSLocalModel if config.architecture == ARCH_LOCAL else MossTTSDelayModel


def build_model(
    config: TTSModelConfig,
    state_dict: dict[str, torch.Tensor] | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    source: str = "checkpoint",
) -> TTSModel:
    """Build on the meta device and assign the (cast) weights, so no memory is spent on a random init.

    ``state_dict=None`` draws random weights instead (benchmarks with full-size shapes).
    """
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if state_dict is None:
        state_dict = _random_state_dict(expected, device=device, dtype=dtype)
    check_state_dict(expected, state_dict, source=source)
    cast = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in state_dict.items()
    }
    model.load_state_dict(cast, strict=True, assign=True)
    _rebuild_buffers(model, device)
    model.eval().requires_grad_(False)
    model.prepare_for_inference()
    return model


def _random_state_dict(
    shapes: dict[str, torch.Size], *, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            out[key] = torch.ones(shape, device=device, dtype=dtype)
        else:
            out[key] = torch.randn(shape, device=device, dtype=dtype) * shape[-1] ** -0.5
    return out


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (RoPE inv_freq) are not in the checkpoint: recreate them off the meta device."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Qwen3RotaryEmbedding):
                setattr(module, name, Qwen3RotaryEmbedding(child.config).to(device))
    leftovers = [n for n, b in model.named_buffers() if b.is_meta]
    if leftovers:
        raise CheckpointError(f"internal error: buffers left uninitialised: {leftovers}")


def load_tts(
    path_or_id: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedTTS:
    """Load an official MOSS-TTS / TTSD / VoiceGenerator / SoundEffect (Delay) or Local v1 checkpoint.

    bf16 files load as fp32 (or any dtype); the default is bf16 on CUDA and fp32 on the CPU.
    """
    folder = resolve_checkpoint(path_or_id)
    raw = read_config(folder)
    check_model_type(raw, folder, ("moss_tts_delay",), "a MOSS-TTS batch model (Delay or Local v1)")
    config = TTSModelConfig.from_dict(raw, source=str(folder / "config.json"))
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    weights = load_safetensors(folder)
    model = build_model(config, weights, device=torch_device, dtype=torch_dtype, source=str(folder))
    processor = TTSProcessor.from_folder(folder, config)
    codec = None
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        try:
            codec = json.loads(processor_config.read_text()).get("audio_tokenizer_name_or_path")
        except json.JSONDecodeError:
            log.warning("unreadable processor_config.json", extra={"folder": str(folder)})
    log.info(
        "loaded batch TTS model",
        extra={"folder": str(folder), "architecture": config.architecture, "n_vq": config.n_vq},
    )
    return LoadedTTS(model=model, processor=processor, config=config, folder=folder, codec_name_or_path=codec)


__all__ = ["ARCH_DELAY", "ARCH_LOCAL", "LoadedTTS", "TTSModel", "build_model", "load_tts", "model_class"]
