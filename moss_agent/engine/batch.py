"""Offline batch generation: requests in, 24 kHz waveforms out, on one batch TTS model and the shared codec.

    engine = BatchEngine(load_tts("OpenMOSS-Team/MOSS-TTS"), load_codec("OpenMOSS-Team/MOSS-Audio-Tokenizer"))
    results = engine.generate([{"text": "Hello.", "reference": "voice.wav"}, TTSRequest("Bonjour.")])
    for result in engine.stream(requests):          # each result as soon as its request is done
        write_wav(f"{result.index}.wav", result.pcm, result.sample_rate)

Requests are the model-level types (TTSRequest, DialogueRequest, VoiceDesignRequest,
SoundEffectRequest, whose audio fields hold codec codes) or dicts in the JSONL form
(``{"kind": "tts", "text": ..., "reference": "voice.wav"}``) whose audio fields may be paths,
``Waveform``s or arrays at 24 kHz; the engine encodes those with the shared codec. Long texts are
split at sentence ends into pieces of at most ``max_chars`` characters, the pieces of all
requests are generated in batches (longest first, so a batch holds similar lengths), and each
request's pieces are decoded and joined with a short crossfade.

Every use of the models and the codec runs on the device's one thread (``DeviceThread``): a job is
batch work of low priority there, taking one model step (or one decode group) at a time and
letting the realtime ticks that came due run in between, so a long job beside live conversations
delays them by at most one step. ``ModelRegistry`` hands the engines of one device the same thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from moss_agent.engine.device import Checkpoint, DeviceThread
from moss_agent.engine.stitch import split_dialogue, split_text, stitch
from moss_agent.errors import ConfigError, EngineError, MossError
from moss_agent.models.batch_sampling import SamplingParams, preset
from moss_agent.models.codec import MossAudioTokenizer
from moss_agent.models.delay.dialogue import normalize_dialogue
from moss_agent.models.delay.generation import GeneratedSample
from moss_agent.models.delay.requests import (
    DialogueRequest,
    Request,
    SoundEffectRequest,
    TTSRequest,
    VoiceDesignRequest,
    prepare_batch,
)
from moss_agent.models.tts_loading import LoadedTTS

log = logging.getLogger(__name__)

T = TypeVar("T")

KINDS: dict[str, type[Request]] = {
    "tts": TTSRequest,
    "dialogue": DialogueRequest,
    "voice_design": VoiceDesignRequest,
    "sfx": SoundEffectRequest,
}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}
# Audio fields per kind: one clip, or (dialogue) a list of clips with None for speakers not cloned.
_AUDIO_FIELDS = {"tts": ("reference", "continuation"), "dialogue": ("references",)}
_PRESETS = {"dialogue": "moss-ttsd", "voice_design": "voice-generator", "sfx": "sound-effect"}
# Rows budget per character of text: Chinese speech runs about 3.1 frames per character (upstream
# app heuristic), so this covers every language with room to spare; plus the flush and end rows.
_ROWS_PER_CHAR = 3.5
_ROWS_SLACK = 60
# Padded frames the codec decodes between two checkpoints of a job: one decode call is one step
# realtime ticks wait behind (8 x 100 frames at once took 530 ms on a CPU, one 100-frame row 64 ms).
_DECODE_FRAMES_PER_STEP = 128


@dataclass(frozen=True)
class Waveform:
    """Audio samples [T] (float, mono) at ``sample_rate``; resampled to the codec rate when encoded."""

    samples: np.ndarray
    sample_rate: int


AudioLike = str | Path | Waveform | np.ndarray | torch.Tensor


@dataclass
class AudioResult:
    """One request's audio.

    pcm: float32 [samples] at ``sample_rate``. frames: 12.5 Hz codec frames generated (continuation
    prompts excluded). pieces: how many text pieces the request was split into. finished: every
    piece ended on its own end token (False: a piece hit the row budget and was cut).
    """

    index: int
    kind: str
    text: str
    pcm: np.ndarray
    sample_rate: int
    frames: int
    pieces: int
    finished: bool

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


@dataclass
class _Job:
    index: int
    kind: str
    text: str
    pieces: list[Request]
    params: SamplingParams
    audio: list[np.ndarray | None] = field(default_factory=list)
    frames: int = 0
    finished: bool = True

    def done(self) -> bool:
        return all(a is not None for a in self.audio)


class BatchEngine:
    """Batched offline generation on ``tts`` with the (shared) ``codec``.

    max_chars: longest text piece (longer texts are split at sentence ends). max_new_tokens: row
    cap per piece (12.5 rows per second of audio; the budget otherwise follows the text length or
    the requested ``tokens`` / duration). crossfade_s: overlap when joining pieces.
    device_thread: the thread that owns the device's models (pass the one the codec's other users
    run on; ``ModelRegistry`` does); by default the engine makes its own, ended by ``close()``.
    Calls may come from any thread but the device thread; jobs run one at a time, in order.
    """

    def __init__(
        self,
        tts: LoadedTTS,
        codec: MossAudioTokenizer,
        *,
        max_chars: int = 300,
        max_new_tokens: int = 4096,
        crossfade_s: float = 0.02,
        device_thread: DeviceThread | None = None,
    ) -> None:
        n_vq = tts.config.n_vq
        if n_vq > codec.num_quantizers:
            raise ConfigError(
                f"the model predicts {n_vq} codebooks but the codec has only {codec.num_quantizers}"
            )
        if tts.config.audio_vocab_size != codec.codebook_size:
            raise ConfigError(
                f"the model's codebooks hold {tts.config.audio_vocab_size} codes but the codec's {codec.codebook_size}; "
                "pass the codec the model was trained with"
            )
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.tts = tts
        self.codec = codec
        self.n_vq = n_vq
        self.sample_rate = codec.sample_rate
        self.max_chars = max_chars
        self.max_new_tokens = max_new_tokens
        self.crossfade_s = crossfade_s
        self._owns_device = device_thread is None
        self._device = device_thread or DeviceThread("moss-batch-engine")

    def close(self) -> None:
        """End the device thread if this engine made it (a shared one belongs to its registry)."""
        if self._owns_device:
            self._device.stop()

    def _on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the device thread (inline when already there) and wait for it."""
        if self._device.is_current():
            return fn(*args)
        self._device.start()
        return self._device.submit(fn, *args).result()

    # -- requests --------------------------------------------------------------------------------

    def encode_audio(self, audio: AudioLike) -> torch.Tensor:
        """A clip (path, Waveform, float array / tensor at the codec rate, or codes) -> codes [T, n_vq] (CPU, long).

        Waveforms are mixed to mono, loudness-normalised as upstream does for references (towards
        -20 dBFS, at most 3 dB either way) and encoded with the model's first ``n_vq`` codebooks.
        """
        return self._on_device(self._encode_audio, audio)

    def _encode_audio(self, audio: AudioLike) -> torch.Tensor:
        if isinstance(audio, torch.Tensor) and not audio.is_floating_point():
            return self._check_codes(audio)
        samples = self._samples(audio)
        if samples.size < self.codec.frame_size:
            raise ConfigError(
                f"reference audio is {samples.size / self.sample_rate * 1000:.0f} ms long; give at least one codec frame "
                f"({self.codec.frame_size / self.sample_rate * 1000:.0f} ms)"
            )
        samples = _loudness_normalize(samples)
        wav = torch.from_numpy(samples)[None, None].to(self.codec.device)
        with torch.inference_mode():
            codes, lengths = self.codec.encode(wav, num_quantizers=self.n_vq)  # [n_vq, 1, N], [1]
        return codes[:, 0, : int(lengths[0])].T.contiguous().cpu()

    def _samples(self, audio: AudioLike) -> np.ndarray:
        from moss_agent.audio import load_audio, resample

        if isinstance(audio, str | Path):
            return load_audio(audio, self.sample_rate)
        if isinstance(audio, Waveform):
            return resample(np.asarray(audio.samples, dtype=np.float32), audio.sample_rate, self.sample_rate)
        array = audio.detach().float().cpu().numpy() if isinstance(audio, torch.Tensor) else audio
        if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating):
            if array.ndim == 2:  # channels first or last: the shorter axis is the channels
                array = array.mean(axis=0 if array.shape[0] < array.shape[1] else 1)
            return np.ascontiguousarray(array.reshape(-1), dtype=np.float32)
        raise ConfigError(
            f"audio must be a file path, a Waveform, float samples at {self.sample_rate} Hz or codes [T, n_vq]; "
            f"got {type(audio).__name__}"
        )

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 2 or codes.shape[1] < self.n_vq:
            raise ConfigError(f"codes must have shape [T, >= {self.n_vq}], got {tuple(codes.shape)}")
        codes = codes[:, : self.n_vq].long().cpu()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codec.codebook_size):
            raise ConfigError(f"codes must lie in [0, {self.codec.codebook_size})")
        return codes

    def request(self, kind: str = "tts", **fields: Any) -> Request:
        """A model request of ``kind`` (tts, dialogue, voice_design, sfx) from plain fields; audio
        fields (``reference``, ``continuation``, ``references``) may be paths or waveforms."""
        return self._on_device(self._request, kind, fields)

    def _request(self, kind: str, fields: dict[str, Any]) -> Request:
        kind = kind.replace("-", "_")
        if kind not in KINDS:
            raise ConfigError(f"unknown request kind {kind!r}; use one of {', '.join(KINDS)}")
        for name in _AUDIO_FIELDS.get(kind, ()):
            value = fields.get(name)
            if value is None:
                continue
            if name == "references":
                if isinstance(value, str | Path) or not isinstance(value, Sequence):
                    raise ConfigError("references must be a list (one clip or null per speaker)")
                fields[name] = [None if clip is None else self._encode_audio(clip) for clip in value]
            else:
                fields[name] = self._encode_audio(value)
        try:
            return KINDS[kind](**fields)
        except TypeError as exc:
            raise ConfigError(f"bad fields for a {kind} request: {exc}") from exc

    def _job(self, index: int, item: Request | Mapping[str, Any], params: SamplingParams | None) -> _Job:
        try:
            if isinstance(item, Mapping):
                fields = dict(item)
                item = self._request(fields.pop("kind", "tts"), fields)
            kind = _KIND_OF.get(type(item))
            if kind is None:
                raise ConfigError(f"unsupported request type {type(item).__name__}")
            for name in _AUDIO_FIELDS.get(kind, ()):
                value = getattr(item, name)
                if isinstance(value, torch.Tensor):
                    item = replace(item, **{name: self._check_codes(value)})  # type: ignore[arg-type]
                elif isinstance(item, DialogueRequest):
                    item = replace(
                        item, references=[None if c is None else self._check_codes(c) for c in value]
                    )
            pieces = self._split(item)
            prepare_batch(self.tts.processor, pieces[:1])  # surfaces prompt errors now, not mid-run
        except MossError as exc:
            raise ConfigError(f"request {index}: {exc}") from exc
        return _Job(
            index, kind, _describe(item), pieces, params or self.default_params(kind), [None] * len(pieces)
        )

    def _split(self, item: Request) -> list[Request]:
        if isinstance(item, TTSRequest) and item.tokens is None:
            texts = split_text(item.text, self.max_chars)
            # Only the first piece continues the given audio; every piece keeps the voice.
            return [
                replace(item, text=t, continuation=item.continuation if k == 0 else None)
                for k, t in enumerate(texts)
            ]
        if isinstance(item, VoiceDesignRequest):
            return [replace(item, text=t) for t in split_text(item.text, self.max_chars)]
        if isinstance(item, DialogueRequest):
            if item.normalize:
                item = replace(item, script=normalize_dialogue(item.script), normalize=False)
            scripts = split_dialogue(item.script, self.max_chars)
            return [
                replace(item, script=s, continue_from_references=item.continue_from_references and k == 0)
                for k, s in enumerate(scripts)
            ]
        return [item]

    def default_params(self, kind: str) -> SamplingParams:
        name = _PRESETS.get(kind) or ("moss-tts-local" if self.tts.architecture == "local" else "moss-tts")
        # Per-sample repetition history: a request's audio never depends on what it was batched with.
        return replace(preset(name), repetition_scope="sample")

    def _row_budget(self, piece: Request) -> int:
        tokens = getattr(piece, "tokens", None)
        if tokens is not None:
            budget = int(tokens * 1.5) + self.n_vq + _ROWS_SLACK
        else:
            budget = round(len(_describe(piece)) * _ROWS_PER_CHAR) + self.n_vq + _ROWS_SLACK
        return min(budget, self.max_new_tokens)

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[Request | Mapping[str, Any]],
        *,
        batch_size: int = 8,
        progress: bool = True,
        params: SamplingParams | None = None,
        seed: int | None = None,
    ) -> list[AudioResult]:
        """All results, in request order (see ``stream`` for the arguments)."""
        results = list(
            self.stream(requests, batch_size=batch_size, progress=progress, params=params, seed=seed)
        )
        return sorted(results, key=lambda r: r.index)

    async def agenerate(
        self,
        requests: Sequence[Request | Mapping[str, Any]],
        *,
        batch_size: int = 8,
        progress: bool = False,
        params: SamplingParams | None = None,
        seed: int | None = None,
        on_start: Callable[[], object] | None = None,
    ) -> list[AudioResult]:
        """``generate`` for an event loop: the job runs on the device thread, the loop keeps running;
        cancelling the await stops the job at its next step. ``on_start`` is called on the device
        thread when the job leaves the device's queue and begins (for queue figures)."""
        results: list[AudioResult] = []
        stop = threading.Event()
        future = self._submit(requests, batch_size, progress, params, seed, results.append, stop, on_start)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            stop.set()
            raise
        return sorted(results, key=lambda r: r.index)

    def stream(
        self,
        requests: Sequence[Request | Mapping[str, Any]],
        *,
        batch_size: int = 8,
        progress: bool = True,
        params: SamplingParams | None = None,
        seed: int | None = None,
    ) -> Iterator[AudioResult]:
        """Yield each request's AudioResult as soon as its last piece is decoded (completion order).

        params: decoding settings for every request (default: each kind's recommended preset, with
        per-sample repetition history). seed: makes sampling repeatable (batch ``k`` draws from
        ``seed + k``). Every request is validated before any generation; a bad one raises
        ConfigError naming its index.
        """
        done = object()
        results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stop = threading.Event()
        future = self._submit(requests, batch_size, progress, params, seed, results.put, stop)
        future.add_done_callback(lambda _: results.put(done))
        try:
            while (item := results.get()) is not done:
                yield item
            future.result()  # the job's error, if any
        finally:
            stop.set()  # the caller stopped early: the job ends at its next step

    def _submit(
        self,
        requests: Sequence[Request | Mapping[str, Any]],
        batch_size: int,
        progress: bool,
        params: SamplingParams | None,
        seed: int | None,
        emit: Callable[[AudioResult], object],
        stop: threading.Event,
        on_start: Callable[[], object] | None = None,
    ) -> Future[None]:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if self._device.is_current():
            raise EngineError("a batch job cannot wait for itself: call it from another thread than the device's")
        self._device.start()
        requests = list(requests)

        def run(checkpoint: Checkpoint) -> None:
            if on_start is not None:
                on_start()

            def step() -> None:
                checkpoint()
                if stop.is_set():
                    raise EngineError("the batch job was stopped by its caller")

            self._run(requests, batch_size, progress, params, seed, emit, step)

        return self._device.submit_batch(run)

    def _run(
        self,
        requests: list[Request | Mapping[str, Any]],
        batch_size: int,
        progress: bool,
        params: SamplingParams | None,
        seed: int | None,
        emit: Callable[[AudioResult], object],
        step: Checkpoint,
    ) -> None:
        """The job, on the device thread: ``step()`` between model steps and decode groups."""
        jobs = [self._job(index, item, params) for index, item in enumerate(requests)]
        batches = self._plan(jobs, batch_size)
        from tqdm.auto import tqdm

        total = sum(len(job.pieces) for job in jobs)
        with tqdm(total=total, unit="piece", desc="generating", disable=not progress or not total) as bar:
            for number, batch in enumerate(batches):
                generator = None
                if seed is not None:
                    generator = torch.Generator(device=self.tts.model.device).manual_seed(seed + number)
                pieces = [jobs[j].pieces[k] for j, k in batch]
                budget = max(self._row_budget(p) for p in pieces)
                show = _row_counter(bar, f"batch {number + 1}/{len(batches)}", budget) if progress else None

                def on_step(index: int, rows: torch.Tensor, show: Any = show) -> None:
                    step()
                    if show is not None:
                        show(index, rows)

                samples = self.tts.generate(
                    pieces,
                    params=jobs[batch[0][0]].params,
                    max_new_tokens=budget,
                    generator=generator,
                    on_step=on_step,
                )
                decoded = self._decode(samples, _DECODE_FRAMES_PER_STEP, step)
                for (j, k), sample, pcm in zip(batch, samples, decoded, strict=True):
                    job = jobs[j]
                    job.audio[k] = pcm
                    job.frames += sum(len(s) for s in sample.segments) - sample.prompt_frames
                    job.finished &= sample.finished
                    if job.done():
                        emit(self._result(job))
                bar.update(len(batch))

    def _plan(self, jobs: list[_Job], batch_size: int) -> list[list[tuple[int, int]]]:
        """Pieces -> batches of (job, piece) with one SamplingParams each, longest first."""
        groups: dict[SamplingParams, list[tuple[int, int]]] = {}
        for j, job in enumerate(jobs):
            for k in range(len(job.pieces)):
                groups.setdefault(job.params, []).append((j, k))
        batches = []
        for members in groups.values():
            members.sort(key=lambda jk: -self._row_budget(jobs[jk[0]].pieces[jk[1]]))
            batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        return batches

    def _result(self, job: _Job) -> AudioResult:
        audio = [a for a in job.audio if a is not None]
        pcm = stitch(audio, self.sample_rate, crossfade_s=self.crossfade_s) if len(audio) > 1 else audio[0]
        result = AudioResult(
            index=job.index,
            kind=job.kind,
            text=job.text,
            pcm=pcm,
            sample_rate=self.sample_rate,
            frames=job.frames,
            pieces=len(job.pieces),
            finished=job.finished,
        )
        log.info(
            "batch request done",
            extra={"index": job.index, "audio_s": result.duration_s, "pieces": result.pieces},
        )
        job.audio = []  # the stitched copy is the one kept
        return result

    def decode(self, samples: Sequence[GeneratedSample], max_frames: int = 16384) -> list[np.ndarray]:
        """Generated samples -> float32 waveforms [samples] (a sample's segments joined, the
        continuation prompt trimmed). Segments are decoded in batches of at most ``max_frames``
        padded frames; the codec is causal, so padding never changes a segment's samples."""
        return self._on_device(self._decode, samples, max_frames)

    @torch.inference_mode()
    def _decode(
        self, samples: Sequence[GeneratedSample], max_frames: int = 16384, step: Checkpoint | None = None
    ) -> list[np.ndarray]:
        frame = self.codec.frame_size
        segments = [
            (i, s, seg)
            for i, sample in enumerate(samples)
            for s, seg in enumerate(sample.segments)
            if len(seg)
        ]
        segments.sort(key=lambda item: -len(item[2]))
        waves: dict[tuple[int, int], np.ndarray] = {}
        start = 0
        while start < len(segments):
            if step is not None:
                step()
            longest = len(segments[start][2])
            count = max(1, min(len(segments) - start, max_frames // longest))
            group = segments[start : start + count]
            codes = torch.zeros(self.n_vq, len(group), longest, dtype=torch.long)
            for b, (_, _, seg) in enumerate(group):
                codes[:, b, : len(seg)] = seg[:, : self.n_vq].T
            wav, _ = self.codec.decode(codes.to(self.codec.device), [len(seg) for _, _, seg in group])
            decoded = wav[:, 0].float().cpu().numpy()
            for b, (i, s, seg) in enumerate(group):
                waves[(i, s)] = decoded[b, : len(seg) * frame]
            start += count
        out = []
        for i, sample in enumerate(samples):
            parts = [waves[(i, s)] for s in range(len(sample.segments)) if (i, s) in waves]
            if parts and sample.prompt_frames:
                parts[0] = parts[0][sample.prompt_frames * frame :]
            out.append(np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32))
        return out


def _row_counter(bar: Any, label: str, budget: int) -> Any:
    """An on_step callback showing a batch's audio seconds as they grow (a large model's batch runs for minutes)."""

    def show(step: int, rows: torch.Tensor) -> None:
        if step % 25 == 0:
            bar.set_postfix_str(f"{label}: {step / 12.5:.0f}/{budget / 12.5:.0f} s", refresh=True)

    return show


def _describe(item: Request) -> str:
    if isinstance(item, DialogueRequest):
        return item.script
    if isinstance(item, SoundEffectRequest):
        return item.description
    return item.text


def _loudness_normalize(
    samples: np.ndarray, target_dbfs: float = -20.0, max_gain_db: float = 3.0
) -> np.ndarray:
    power = float(np.mean(np.square(samples, dtype=np.float64))) + 1e-9
    gain_db = float(np.clip(target_dbfs - 10.0 * np.log10(power), -max_gain_db, max_gain_db))
    gained: np.ndarray = (samples * 10.0 ** (gain_db / 20.0)).astype(np.float32)
    return gained


__all__ = ["KINDS", "AudioLike", "AudioResult", "BatchEngine", "Waveform"]
