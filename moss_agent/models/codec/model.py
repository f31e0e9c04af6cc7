"""MOSS-Audio-Tokenizer: 24 kHz mono <-> 12.5 Hz residual codes, offline and batched streaming.

Architecture and length rules follow /shared/reference/audio-tokenizer.md (upstream
OpenMOSS/MOSS-Audio-Tokenizer); the multi-stream state API is our own.
"""

from __future__ import annotations

import torch
from torch import nn

from moss_agent.errors import ConfigError
from moss_agent.models.codec.chunked import ChunkPlan, plan_chunks, resolve_chunk_frames
from moss_agent.models.codec.config import CodecConfig, PatchConfig
from moss_agent.models.codec.quantizer import ResidualQuantizer
from moss_agent.models.codec.streaming import CodecStreamState, StageCache
from moss_agent.models.codec.transformer import ProjectedTransformer, patch, unpatch


class Patch(nn.Module):
    """Parameterless patch (encoder) or un-patch (decoder) step; it keeps the stage indices of the keys."""

    def __init__(self, size: int, downsample: bool) -> None:
        super().__init__()
        self.size = size
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch(x, self.size) if self.downsample else unpatch(x, self.size)


def _build_stages(config: CodecConfig, encoder: bool) -> nn.ModuleList:
    stages = config.encoder if encoder else config.decoder
    return nn.ModuleList(
        Patch(s.patch_size, downsample=encoder) if isinstance(s, PatchConfig) else ProjectedTransformer(s)
        for s in stages
    )


class MossAudioTokenizer(nn.Module):
    """The codec. Build it with :func:`moss_agent.models.codec.load_codec`.

    Offline calls (``encode`` / ``decode``) use causal sliding-window attention from position 0.
    Streaming calls (``encode_step`` / ``decode_step``) carry a :class:`CodecStreamState` with one
    independent stream per batch row; they reproduce upstream streaming (ring caches of capacity =
    window, written before attending), which differs from offline once a stage's window fills.
    """

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _build_stages(config, encoder=True)
        self.quantizer = ResidualQuantizer(config.quantizer)
        self.decoder = _build_stages(config, encoder=False)
        self._encoder_tokens = self._tokens_per_frame(self.encoder, config.frame_size, encoder=True)
        self._decoder_tokens = self._tokens_per_frame(self.decoder, 1, encoder=False)

    @staticmethod
    def _tokens_per_frame(stages: nn.ModuleList, tokens: int, encoder: bool) -> list[int]:
        """Tokens one codec frame becomes at each transformer stage (8/4/2/1 and 1/2/4/8 for the real chain)."""
        counts = []
        for stage in stages:
            if isinstance(stage, Patch):
                tokens = tokens // stage.size if encoder else tokens * stage.size
            else:
                counts.append(tokens)
        return counts

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920 = 80 ms at 24 kHz)."""
        return self.config.frame_size

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def num_quantizers(self) -> int:
        return self.config.quantizer.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the transformers (the quantizer always runs in float32)."""
        return self._transformers(self.decoder)[0].transformer.layers[0].norm1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quantizer.quantizers[0].codebook.weight.device

    @staticmethod
    def _transformers(stages: nn.ModuleList) -> list[ProjectedTransformer]:
        return [s for s in stages if isinstance(s, ProjectedTransformer)]

    # -- input checks -----------------------------------------------------------------------------

    @staticmethod
    def _wave_rows(wav: torch.Tensor) -> torch.Tensor:
        """[B, T] or [B, 1, T] float -> a [B, T] view, left where and as it is."""
        if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
            raise ConfigError("wav must be a float tensor of shape [B, T] or [B, 1, T]")
        if wav.dim() == 3:
            if wav.shape[1] != 1:
                raise ConfigError(f"the codec is mono; wav has {wav.shape[1]} channels (shape {tuple(wav.shape)})")
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ConfigError(f"wav must have shape [B, T] or [B, 1, T], got {tuple(wav.shape)}")
        return wav

    def _wave_batch(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, T] or [B, 1, T] float -> [B, T] on the codec's device (compute dtype)."""
        return self._wave_rows(wav).to(device=self.device, dtype=self.dtype)

    def _lengths(self, lengths: torch.Tensor | list[int] | None, batch: int, full: int) -> torch.Tensor:
        if lengths is None:
            return torch.full((batch,), full, dtype=torch.long, device=self.device)
        lengths = torch.as_tensor(lengths, dtype=torch.long).to(self.device)
        if lengths.shape != (batch,):
            raise ConfigError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
        if bool((lengths < 0).any()) or bool((lengths > full).any()):
            raise ConfigError(f"lengths must lie in [0, {full}], got {lengths.tolist()}")
        return lengths

    def _quantizer_count(self, num_quantizers: int | None) -> int:
        if num_quantizers is None:
            return self.num_quantizers
        if not 1 <= num_quantizers <= self.num_quantizers:
            raise ConfigError(f"num_quantizers must be in [1, {self.num_quantizers}], got {num_quantizers}")
        return num_quantizers

    def _check_codes(self, codes: torch.Tensor, check_values: bool) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dim() != 3:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ConfigError(f"codes must be an integer tensor [nq, B, N], got {shape}")
        if not 1 <= codes.shape[0] <= self.num_quantizers:
            raise ConfigError(f"codes have {codes.shape[0]} codebooks; this codec has {self.num_quantizers}")
        codes = codes.to(device=self.device, dtype=torch.long)
        if check_values and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ConfigError(f"codes must lie in [0, {self.codebook_size}); got values outside it")
        return codes

    # -- offline ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(
        self, wav: torch.Tensor, lengths: torch.Tensor | list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wav [B, T] or [B, 1, T] -> (latents [B, C, ceil(T/frame)] float32, frame lengths [B] = floor(len/frame)).

        The input is zero-padded to whole frames; the floor lengths drop a trailing partial frame,
        exactly as upstream (the padded frame is still present in the tensor).
        """
        samples = self._wave_batch(wav)
        batch, total = samples.shape
        if total == 0:
            raise ConfigError("wav holds no samples")
        lengths = self._lengths(lengths, batch, total)
        padding = -total % self.frame_size
        if padding:
            samples = torch.nn.functional.pad(samples, (0, padding))
        hidden = samples[:, :, None]
        for stage in self.encoder:
            hidden = stage(hidden)
        return hidden.float().transpose(1, 2), lengths // self.frame_size

    @torch.no_grad()
    def encode(
        self,
        wav: torch.Tensor,
        lengths: torch.Tensor | list[int] | None = None,
        num_quantizers: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wav [B, T] or [B, 1, T] (lengths [B] samples) -> (codes [nq, B, ceil(T/frame)], code_lengths [B])."""
        count = self._quantizer_count(num_quantizers)
        latents, code_lengths = self.encode_latents(wav, lengths)
        return self.quantizer.encode(latents.transpose(1, 2), code_lengths, count), code_lengths

    @torch.no_grad()
    def decode(
        self, codes: torch.Tensor, lengths: torch.Tensor | list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [nq, B, N] (any prefix of the codebooks) -> (wav [B, 1, N*frame] float32, wav_lengths [B]).

        ``lengths`` are valid frames per row; the transformers are causal, so padding after a row's
        end never changes its valid samples.
        """
        if isinstance(codes, torch.Tensor) and codes.dim() == 2:
            codes = codes[:, None]
        codes = self._check_codes(codes, check_values=True)
        _, batch, frames = codes.shape
        if frames == 0:
            raise ConfigError("codes hold no frames")
        lengths = self._lengths(lengths, batch, frames)
        hidden = self.quantizer.decode(codes).to(self.dtype)
        for stage in self.decoder:
            hidden = stage(hidden)
        return hidden.float().transpose(1, 2), lengths * self.frame_size

    # -- chunked offline (bounded memory) ---------------------------------------------------------

    def max_chunk_frames(self, kind: str) -> int:
        """Largest chunk, in frames, that fits every attention window of the ``"encode"`` or ``"decode"`` side."""
        if kind not in ("encode", "decode"):
            raise ConfigError(f"kind must be 'encode' or 'decode', got {kind!r}")
        stages = self._transformers(self.encoder if kind == "encode" else self.decoder)
        tokens = self._encoder_tokens if kind == "encode" else self._decoder_tokens
        return min(stage.capacity // per_frame for stage, per_frame in zip(stages, tokens, strict=True))

    def _chunk_plan(
        self, kind: str, fed: list[int], kept: list[int], chunk_frames: int | None, chunk_duration: float | None
    ) -> ChunkPlan:
        chunk = resolve_chunk_frames(chunk_frames, chunk_duration, frame_size=self.frame_size,
                                     sample_rate=self.sample_rate, limit=self.max_chunk_frames(kind))
        return plan_chunks(fed, kept, chunk)

    def _latent_channels(self) -> int:
        channels = 1
        for stage in self.encoder:
            if isinstance(stage, Patch):
                channels *= stage.size
            elif isinstance(stage, ProjectedTransformer):
                channels = stage.config.output_dim
        return channels

    def _samples_span(
        self, samples: torch.Tensor, lengths: torch.Tensor, start: int, size: int, rows: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """samples[rows, start:start+size] in the compute dtype, zero past each row's length and past the end.

        samples: [B, T] anywhere; lengths: [B] (or [len(rows)]) on the codec's device -> [B or len(rows), size].
        """
        piece = samples[:, start : start + size]
        if rows is not None:
            piece = piece[list(rows)]
        piece = piece.to(device=self.device, dtype=self.dtype)
        if piece.shape[1] < size:
            piece = torch.nn.functional.pad(piece, (0, size - piece.shape[1]))
        positions = torch.arange(start, start + size, device=self.device)
        return torch.where(positions[None] < lengths[:, None], piece, 0.0)

    @torch.no_grad()
    def encode_chunked(
        self,
        wav: torch.Tensor,
        lengths: torch.Tensor | list[int] | None = None,
        *,
        chunk_frames: int | None = None,
        chunk_duration: float | None = None,
        num_quantizers: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunked encode with bounded memory: upstream ``encode(..., chunk_duration=...)`` for every row.

        wav [B, T] or [B, 1, T] (lengths [B] samples; may stay on the CPU or in another float dtype:
        each chunk is moved and converted on its own) -> (codes [nq, B, N] int64, code_lengths [B] =
        floor(len/frame), latents [B, C, N] float32, the pre-quantizer encoder output).

        Give the chunk as ``chunk_frames`` or ``chunk_duration`` seconds (whole frames, at most
        :meth:`max_chunk_frames`); the default is half the window. A row longer than one chunk streams
        through ring caches, one chunk per call, and keeps floor(len/frame) frames; a shorter row is
        encoded offline and keeps ceil(len/frame) frames, as upstream. N is the longest row's count;
        frames past a row's count are 0. Streamed codes differ from :meth:`encode` once a window fills
        (upstream behaviour). Activations never exceed one chunk; the only full-length tensors are
        the input and the outputs.
        """
        samples = self._wave_rows(wav)
        batch, total = samples.shape
        if total == 0:
            raise ConfigError("wav holds no samples")
        lengths = self._lengths(lengths, batch, total)
        count = self._quantizer_count(num_quantizers)
        frame = self.frame_size
        fed = [-(-n // frame) for n in lengths.tolist()]
        kept = [n // frame for n in lengths.tolist()]
        plan = self._chunk_plan("encode", fed, kept, chunk_frames, chunk_duration)
        width = max([fed[row] for row in plan.offline] + [kept[row] for step in plan.steps for row in step.rows],
                    default=0)
        codes = torch.zeros(count, batch, width, dtype=torch.long, device=self.device)
        latents = torch.zeros(batch, self._latent_channels(), width, dtype=torch.float32, device=self.device)
        if plan.offline:
            rows = torch.tensor(plan.offline, device=self.device)
            span = max(fed[row] for row in plan.offline)
            piece = self._samples_span(samples, lengths[rows], 0, span * frame, plan.offline)
            hidden, row_kept = self.encode_latents(piece, lengths[rows])
            row_codes = self.quantizer.encode(hidden.transpose(1, 2), row_kept, count)
            for index, row in enumerate(plan.offline):
                codes[:, row, : fed[row]] = row_codes[:, index, : fed[row]]
                latents[row, :, : fed[row]] = hidden[index, :, : fed[row]]
        if plan.steps:
            state = self.init_encode_state(batch)
            for step in plan.steps:
                active = state.slot_mask(list(step.rows))
                piece = self._samples_span(samples, lengths, step.start * frame, step.frames * frame)
                hidden = self.encode_latents_step(piece[:, None], state, active)
                rows = torch.tensor(step.rows, device=self.device)
                step_codes = self.quantizer.encode(hidden[rows].transpose(1, 2), None, count)
                for index, (row, keep) in enumerate(zip(step.rows, step.kept, strict=True)):
                    codes[:, row, step.start : step.start + keep] = step_codes[:, index, :keep]
                    latents[row, :, step.start : step.start + keep] = hidden[row, :, :keep]
        return codes, lengths // frame, latents

    @torch.no_grad()
    def decode_chunked(
        self,
        codes: torch.Tensor,
        lengths: torch.Tensor | list[int] | None = None,
        *,
        chunk_frames: int | None = None,
        chunk_duration: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked decode with bounded memory: upstream ``decode(..., chunk_duration=...)`` for every row.

        codes [nq, B, N] or [nq, N] (any prefix of the codebooks; lengths [B] valid frames) ->
        (wav [B, 1, max(lengths)*frame] float32, zero past each row's end; wav_lengths [B]).
        The chunk is given as in :meth:`encode_chunked`. A row no longer than one chunk is decoded
        offline; a longer one streams through ring caches, one chunk per call, so its audio departs
        from :meth:`decode` once a window fills (upstream behaviour). Activations never exceed one chunk.
        """
        if isinstance(codes, torch.Tensor) and codes.dim() == 2:
            codes = codes[:, None]
        codes = self._check_codes(codes, check_values=True)
        _, batch, frames = codes.shape
        if frames == 0:
            raise ConfigError("codes hold no frames")
        lengths = self._lengths(lengths, batch, frames)
        counts = lengths.tolist()
        plan = self._chunk_plan("decode", counts, counts, chunk_frames, chunk_duration)
        frame = self.frame_size
        wav = torch.zeros(batch, 1, max(counts) * frame, dtype=torch.float32, device=self.device)
        if plan.offline:
            rows = torch.tensor(plan.offline, device=self.device)
            span = max(counts[row] for row in plan.offline)
            audio, audio_lengths = self.decode(codes[:, rows, :span], lengths[rows])
            positions = torch.arange(span * frame, device=self.device)
            wav[rows, :, : span * frame] = torch.where(positions < audio_lengths[:, None, None], audio, 0.0)
        if plan.steps:
            state = self.init_decode_state(batch)
            for step in plan.steps:
                active = state.slot_mask(list(step.rows))
                audio = self.decode_step(codes[:, :, step.start : step.start + step.frames], state, active)
                for row in step.rows:
                    wav[row, :, step.start * frame : (step.start + step.frames) * frame] = audio[row]
        return wav, lengths * frame

    # -- streaming --------------------------------------------------------------------------------

    def _init_state(self, kind: str, batch_size: int, device: torch.device | str | None) -> CodecStreamState:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        device = self.device if device is None else torch.device(device)
        stages = self.encoder if kind == "encode" else self.decoder
        tokens = self._encoder_tokens if kind == "encode" else self._decoder_tokens
        caches = []
        for stage, per_frame in zip(self._transformers(stages), tokens, strict=True):
            config = stage.config
            caches.append(StageCache.allocate(
                config.num_layers, batch_size, config.num_heads, stage.capacity, config.head_dim, per_frame,
                self.dtype, device,
            ))
        return CodecStreamState(kind, torch.zeros(batch_size, dtype=torch.long, device=device), caches)

    def init_decode_state(self, batch_size: int, device: torch.device | str | None = None) -> CodecStreamState:
        """Preallocated streaming state for ``batch_size`` independent decode streams (all at position 0)."""
        return self._init_state("decode", batch_size, device)

    def init_encode_state(self, batch_size: int, device: torch.device | str | None = None) -> CodecStreamState:
        """Preallocated streaming state for ``batch_size`` independent encode streams."""
        return self._init_state("encode", batch_size, device)

    def _check_step(self, state: CodecStreamState, kind: str, batch: int, frames: int) -> None:
        if not isinstance(state, CodecStreamState) or state.kind != kind:
            raise ConfigError(f"{kind}_step needs the state from init_{kind}_state")
        if batch != state.batch_size:
            raise ConfigError(f"the state holds {state.batch_size} slots but the input has batch {batch}")
        stages = self._transformers(self.encoder if kind == "encode" else self.decoder)
        if [(c.capacity, c.num_heads) for c in state.stages] != [(s.capacity, s.config.num_heads) for s in stages]:
            raise ConfigError(f"this state was made by a codec with another architecture; use init_{kind}_state")
        for cache, stage in zip(state.stages, stages, strict=True):
            if frames * cache.tokens_per_frame > stage.capacity:
                raise ConfigError(
                    f"{frames} frames per step exceed a {stage.capacity}-token attention window; "
                    f"feed at most {stage.capacity // cache.tokens_per_frame} frames per step"
                )

    @staticmethod
    def _active(active: torch.Tensor | None, state: CodecStreamState) -> torch.Tensor | None:
        if active is None:
            return None
        active = torch.as_tensor(active, dtype=torch.bool, device=state.device)
        if active.shape != (state.batch_size,):
            raise ConfigError(f"active must be a bool mask of shape ({state.batch_size},), got {tuple(active.shape)}")
        return active

    def _run_step(
        self,
        stages: nn.ModuleList,
        hidden: torch.Tensor,
        state: CodecStreamState,
        active: torch.Tensor | None,
        frames: int,
    ) -> torch.Tensor:
        caches = iter(state.stages)
        for stage in stages:
            if isinstance(stage, Patch):
                hidden = stage(hidden)
                continue
            cache = next(caches)
            hidden = stage.step(hidden, state.frames * cache.tokens_per_frame, cache.key_rows, cache.value_rows,
                                active)
        if active is None:
            state.frames.add_(frames)
        else:
            state.frames.add_(active.long() * frames)
        return hidden

    @torch.no_grad()
    def decode_step(
        self, codes: torch.Tensor, state: CodecStreamState, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """codes [nq, B, T] -> wav [B, 1, T*frame] float32; continues every active slot's stream.

        Inactive slots (``active[b]`` False) keep their state bit-identical and get zeros; their codes
        are ignored, so padding ids may sit there. Active codes are not range-checked here (that would
        synchronise); out-of-range codes fail inside the gather.
        """
        codes = self._check_codes(codes, check_values=False)
        _, batch, frames = codes.shape
        self._check_step(state, "decode", batch, frames)
        active = self._active(active, state)
        if active is not None:
            codes = torch.where(active[None, :, None], codes, 0)
        hidden = self.quantizer.decode(codes).to(self.dtype)
        wav = self._run_step(self.decoder, hidden, state, active, frames).float().transpose(1, 2)
        if active is not None:
            wav = torch.where(active[:, None, None], wav, 0.0)
        return wav

    @torch.no_grad()
    def encode_latents_step(
        self, wav: torch.Tensor, state: CodecStreamState, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """wav [B, 1, T*frame] (whole frames) -> latents [B, C, T] float32; see :meth:`encode_step`."""
        samples = self._wave_batch(wav)
        batch, total = samples.shape
        if total == 0 or total % self.frame_size:
            raise ConfigError(
                f"encode_step needs whole frames of {self.frame_size} samples, got {total}; "
                "buffer partial audio with SampleFramer"
            )
        frames = total // self.frame_size
        self._check_step(state, "encode", batch, frames)
        active = self._active(active, state)
        hidden = self._run_step(self.encoder, samples[:, :, None], state, active, frames)
        return hidden.float().transpose(1, 2)

    @torch.no_grad()
    def encode_step(
        self,
        wav: torch.Tensor,
        state: CodecStreamState,
        active: torch.Tensor | None = None,
        num_quantizers: int | None = None,
    ) -> torch.Tensor:
        """wav [B, 1, T*frame] whole frames -> codes [nq, B, T]; inactive slots are untouched (codes 0)."""
        count = self._quantizer_count(num_quantizers)
        latents = self.encode_latents_step(wav, state, active)
        codes = self.quantizer.encode(latents.transpose(1, 2), None, count)
        active = self._active(active, state)
        if active is not None:
            codes = torch.where(active[None, :, None], codes, 0)
        return codes
