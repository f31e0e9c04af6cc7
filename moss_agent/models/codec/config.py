"""MOSS-Audio-Tokenizer configuration: parses the official ``config.json`` layout into frozen dataclasses.

Field names and the context rule follow the published checkpoint (OpenMOSS/MOSS-Audio-Tokenizer
``config.json``); see /shared/reference/audio-tokenizer.md sections 1 and 8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moss_agent.errors import ConfigError

_TRANSFORMER = "Transformer"
_PATCH = "PatchedPretransform"
_LFQ_TYPES = {"rlfq", "random_prefix_rlfq"}
_VQ_TYPES = {"rvq", "spec_rvq"}


@dataclass(frozen=True, slots=True)
class PatchConfig:
    """A parameterless (un)patching step: ``patch_size`` time steps <-> channels."""

    patch_size: int


@dataclass(frozen=True, slots=True)
class TransformerConfig:
    """One projected causal transformer stage; ``context`` is its sliding window in tokens."""

    input_dim: int
    output_dim: int
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: int
    layer_scale: float | None
    max_period: float

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


StageConfig = PatchConfig | TransformerConfig


@dataclass(frozen=True, slots=True)
class QuantizerConfig:
    input_dim: int
    rvq_dim: int
    output_dim: int
    num_quantizers: int
    codebook_size: int
    codebook_dim: int
    normalize: bool  # True for LFQ (cosine nearest code), False for plain residual VQ


@dataclass(frozen=True, slots=True)
class CodecConfig:
    sample_rate: int
    frame_size: int
    context_duration: float
    encoder: tuple[StageConfig, ...]
    decoder: tuple[StageConfig, ...]
    quantizer: QuantizerConfig

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CodecConfig:
        """Parse a ``config.json`` dict; raises ConfigError naming the offending field."""
        sample_rate = int(_get(raw, "sampling_rate", raw.get("sample_rate", 24000)))
        frame_size = int(_get(raw, "downsample_rate", None))
        context_duration = float(_get(raw, "causal_transformer_context_duration", None))
        if "decoder_kwargs" not in raw:
            # The upstream class default decoder is wrong (x3840 upsampling); never fall back to it.
            raise ConfigError("config has no decoder_kwargs; the codec needs the explicit decoder list")
        quantizer = _parse_quantizer(raw)

        rate = float(sample_rate)
        encoder = []
        for index, entry in enumerate(_module_list(raw, "encoder_kwargs")):
            stage = _parse_stage(entry, rate, context_duration, f"encoder_kwargs[{index}]")
            encoder.append(stage)
            if isinstance(stage, PatchConfig):
                rate /= stage.patch_size
        decoder = []
        for index, entry in enumerate(_module_list(raw, "decoder_kwargs")):
            stage = _parse_stage(entry, rate, context_duration, f"decoder_kwargs[{index}]")
            decoder.append(stage)
            if isinstance(stage, PatchConfig):
                rate *= stage.patch_size
        config = cls(sample_rate, frame_size, context_duration, tuple(encoder), tuple(decoder), quantizer)
        config._validate()
        return config

    def _validate(self) -> None:
        for name, stages in (("encoder", self.encoder), ("decoder", self.decoder)):
            product = 1
            for stage in stages:
                if isinstance(stage, PatchConfig):
                    product *= stage.patch_size
            if product != self.frame_size:
                raise ConfigError(
                    f"{name} patch sizes multiply to {product} but downsample_rate is {self.frame_size}"
                )
        channels = 1
        for index, stage in enumerate(self.encoder):
            if isinstance(stage, PatchConfig):
                channels *= stage.patch_size
                continue
            if stage.input_dim != channels:
                raise ConfigError(
                    f"encoder_kwargs[{index}] input_dimension is {stage.input_dim} but {channels} channels arrive"
                )
            channels = stage.output_dim
        if channels != self.quantizer.input_dim:
            raise ConfigError(f"encoder ends with {channels} channels but quantizer input_dim is "
                              f"{self.quantizer.input_dim}")
        channels = self.quantizer.output_dim
        for index, stage in enumerate(self.decoder):
            if isinstance(stage, PatchConfig):
                if channels % stage.patch_size:
                    raise ConfigError(f"decoder_kwargs[{index}] cannot un-patch {channels} channels by "
                                      f"{stage.patch_size}")
                channels //= stage.patch_size
                continue
            if stage.input_dim != channels:
                raise ConfigError(
                    f"decoder_kwargs[{index}] input_dimension is {stage.input_dim} but {channels} channels arrive"
                )
            channels = stage.output_dim
        if channels != 1:
            raise ConfigError(f"decoder ends with {channels} channels; the codec is mono")


def _get(raw: Mapping[str, Any], key: str, default: Any) -> Any:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"codec config is missing {key!r}")
    return value


def _module_list(raw: Mapping[str, Any], key: str) -> Sequence[Mapping[str, Any]]:
    value = raw.get(key)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"codec config {key!r} must be a non-empty list of modules")
    return value


def _parse_stage(entry: Mapping[str, Any], rate: float, duration: float, where: str) -> StageConfig:
    kind = entry.get("module_type")
    if kind == _PATCH:
        size = int(entry.get("patch_size", 0))
        if size < 1:
            raise ConfigError(f"{where}: patch_size must be a positive integer")
        return PatchConfig(size)
    if kind != _TRANSFORMER:
        raise ConfigError(f"{where}: unknown module_type {kind!r} (expected Transformer or PatchedPretransform)")
    unsupported = {
        "causal": (entry.get("causal", True), True),
        "norm": (entry.get("norm", "layer_norm"), "layer_norm"),
        "gating": (entry.get("gating", "none"), "none"),
        "positional_embedding": (entry.get("positional_embedding", "rope"), "rope"),
        "weights_per_step": (entry.get("weights_per_step", 0) or 0, 0),
    }
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise ConfigError(f"{where}: {field}={value!r} is not supported (only {supported!r})")
    try:
        d_model = int(entry["d_model"])
        num_heads = int(entry["num_heads"])
        stage = TransformerConfig(
            input_dim=int(entry["input_dimension"]),
            output_dim=int(entry["output_dimension"]),
            d_model=d_model,
            num_heads=num_heads,
            num_layers=int(entry["num_layers"]),
            dim_feedforward=int(entry.get("dim_feedforward", 2048)),
            # Per-stage durations exist in newer codecs; int() truncates exactly as upstream does.
            context=int(rate * float(entry.get("context_duration", duration))),
            layer_scale=None if entry.get("layer_scale") is None else float(entry["layer_scale"]),
            max_period=float(entry.get("max_period", 10000)),
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: missing field {exc.args[0]!r}") from exc
    if d_model % num_heads or (d_model // num_heads) % 2:
        raise ConfigError(f"{where}: d_model/num_heads must be an even integer for RoPE ({d_model}/{num_heads})")
    if stage.context < 1:
        raise ConfigError(f"{where}: the attention window is {stage.context} tokens; raise the context duration")
    return stage


def _parse_quantizer(raw: Mapping[str, Any]) -> QuantizerConfig:
    kwargs = raw.get("quantizer_kwargs")
    if not isinstance(kwargs, Mapping):
        raise ConfigError("codec config has no quantizer_kwargs")
    kind = kwargs.get("quantizer_type", raw.get("quantizer_type", "rvq"))
    if kind not in _LFQ_TYPES | _VQ_TYPES:
        raise ConfigError(f"quantizer_type {kind!r} is not supported (use rlfq or rvq)")
    input_dim = int(kwargs.get("input_dim", 1024))
    quantizer = QuantizerConfig(
        input_dim=input_dim,
        rvq_dim=int(kwargs.get("rvq_dim") or input_dim),
        output_dim=int(kwargs.get("output_dim") or input_dim),
        num_quantizers=int(kwargs.get("num_quantizers", 32)),
        codebook_size=int(kwargs.get("codebook_size", 1024)),
        codebook_dim=int(kwargs.get("codebook_dim", 8)),
        normalize=kind in _LFQ_TYPES,
    )
    if quantizer.num_quantizers < 1 or quantizer.codebook_size < 2:
        raise ConfigError("quantizer needs at least one quantizer and two codes per codebook")
    return quantizer


def make_config_dict(
    *,
    d_model: int = 32,
    num_heads: int = 4,
    num_layers: int = 2,
    dim_feedforward: int = 64,
    big_d_model: int = 48,
    big_num_heads: int = 4,
    big_num_layers: int = 2,
    big_dim_feedforward: int = 64,
    stage_outputs: tuple[int, int, int] = (16, 16, 24),
    latent_dim: int = 32,
    num_quantizers: int = 4,
    codebook_size: int = 16,
    codebook_dim: int = 4,
    rvq_dim: int = 16,
    context_duration: float = 0.32,
    layer_scale: float = 0.01,
) -> dict[str, Any]:
    """A ``config.json`` dict in the official layout with the real 240/2/2/2 patch chain.

    Defaults give the tiny test codec of the reference notes; ``published_config_dict`` gives the
    released 1.77B model. The decoder mirrors the encoder exactly as the published file does.
    """

    def transformer(input_dim: int, output_dim: int, big: bool = False) -> dict[str, Any]:
        return {
            "causal": True, "conv_layout": True, "gating": "none", "layer_scale": layer_scale,
            "max_period": 10000, "module_type": _TRANSFORMER, "norm": "layer_norm",
            "positional_embedding": "rope", "input_dimension": input_dim, "output_dimension": output_dim,
            "d_model": big_d_model if big else d_model,
            "num_heads": big_num_heads if big else num_heads,
            "num_layers": big_num_layers if big else num_layers,
            "dim_feedforward": big_dim_feedforward if big else dim_feedforward,
        }

    def patch(size: int) -> dict[str, Any]:
        return {"module_type": _PATCH, "patch_size": size}

    out1, out2, out3 = stage_outputs
    encoder = [
        patch(240), transformer(240, out1), patch(2), transformer(2 * out1, out2), patch(2),
        transformer(2 * out2, out3), patch(2), transformer(2 * out3, latent_dim, big=True),
    ]
    decoder = [
        transformer(latent_dim, big_d_model, big=True), patch(2), transformer(big_d_model // 2, d_model),
        patch(2), transformer(d_model // 2, d_model), patch(2), transformer(d_model // 2, 240), patch(240),
    ]
    return {
        "architectures": ["MossAudioTokenizerModel"],
        "auto_map": {
            "AutoConfig": "configuration_moss_audio_tokenizer.MossAudioTokenizerConfig",
            "AutoModel": "modeling_moss_audio_tokenizer.MossAudioTokenizerModel",
        },
        "causal_transformer_context_duration": context_duration,
        "code_dim": latent_dim,
        "decoder_kwargs": decoder,
        "downsample_rate": 1920,
        "dtype": "float32",
        "encoder_kwargs": encoder,
        "model_type": "speech_tokenizer",
        "quantizer_kwargs": {
            "codebook_dim": codebook_dim, "codebook_size": codebook_size, "input_dim": latent_dim,
            "num_quantizers": num_quantizers, "output_dim": latent_dim, "quantizer_type": "rlfq",
            "rvq_dim": rvq_dim,
        },
        "quantizer_type": "rlfq",
        "sample_rate": 24000,
        "sampling_rate": 24000,
        "version": "4.26.1.a",
    }


def published_config_dict() -> dict[str, Any]:
    """The shapes of the released ``OpenMOSS-Team/MOSS-Audio-Tokenizer`` (1.77B parameters)."""
    return make_config_dict(
        d_model=768, num_heads=12, num_layers=12, dim_feedforward=3072,
        big_d_model=1280, big_num_heads=20, big_num_layers=32, big_dim_feedforward=5120,
        stage_outputs=(384, 384, 640), latent_dim=768, num_quantizers=32, codebook_size=1024,
        codebook_dim=8, rvq_dim=512, context_duration=10, layer_scale=0.01,
    )
