"""The realtime engine: many conversations on one device, one batched forward per tick.

One ``DeviceThread`` owns the MOSS-TTS-Realtime generator (``num_slots`` fixed slots with their own
KV caches) and a batched streaming codec state with the same slots. Each tick advances every ready
slot by one frame in one forward, decodes the new frames of all slots in one codec step, and hands
each stream its 80 ms chunk on the event loop with ``call_soon_threadsafe``.

Generation runs ahead of playback by at most ``max_ahead_s`` per stream: a slot whose listener is
that far behind is held (skipped by the tick) until the listener catches up, so a slow consumer
costs no memory and its compute goes to the other slots.

The asyncio side implements ``moss_agent.streaming.tts``: ``RealtimeEngine`` is a SpeechBackend,
each conversation owns one slot, each agent turn is an ``EngineStream``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moss_agent.audio import resample
from moss_agent.engine.device import DeviceThread, DeviceWorker
from moss_agent.engine.health import EngineHealth, FailureCallback, bounded
from moss_agent.errors import ConfigError, EngineError, MossError, OverloadError, SessionClosedError
from moss_agent.events import AudioChunk, FloatArray
from moss_agent.model_ids import CODEC_MODEL_ID, REALTIME_MODEL_ID
from moss_agent.models.codec import MossAudioTokenizer
from moss_agent.models.compiling import compile_step
from moss_agent.models.realtime import EncodedTurn, RealtimeGenerator, SamplingConfig, StepOutput
from moss_agent.models.realtime.config import DELAY_TOKENS
from moss_agent.models.realtime.text import GrowingTextTokenizer, TextTokenizer, UpstreamSegmentTokenizer
from moss_agent.streaming.tts import HeardResult, PastTurn, UserTurn, check_history

log = logging.getLogger(__name__)

_END = object()  # end-of-turn marker in a stream's queue


@dataclass(frozen=True)
class RealtimeEngineConfig:
    """Capacity and behaviour of one realtime engine.

    ``num_slots``: conversations served at once (each holds ``max_context`` rows of KV cache).
    ``max_waiting``: conversations that may wait for a slot; one more gets OverloadError.
    ``max_frames_per_turn``: hard cap (80 ms each), so a missing EOS cannot run forever.
    ``max_ahead_s``: how far generation may run ahead of what the listener consumed.
    ``call_timeout_s``: longest wait for one request to the device thread (open a conversation,
    start or cut a turn); beyond it the request fails with EngineError instead of hanging.
    ``text_buffer_chars``: text a stream may hold that its model has not read yet; ``push_text``
    waits beyond it, so a fast LLM is paced by speech (see ``moss_agent.streaming.tts``).
    """

    num_slots: int = 8
    max_waiting: int = 32
    max_context: int = 4096
    max_frames_per_turn: int = 1500
    max_ahead_s: float = 4.0
    call_timeout_s: float = 30.0
    text_buffer_chars: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    cuda_graph: bool = True  # replay each tick from a CUDA graph on CUDA devices (ignored on CPU)
    compile: bool = False  # torch.compile the tick (about 2x faster on CPU; first tick compiles)
    # Intra-op CPU threads of the device thread. One by default: once another thread (say the one
    # that loaded the weights) has its own OpenMP team, multi-threaded ops on the device thread ran
    # 2-4x slower (measured on 2 cores), while one thread was within 7% of two even at 16 slots.
    cpu_threads: int = 1

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ConfigError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_ahead_s <= 0:
            raise ConfigError(f"max_ahead_s must be > 0, got {self.max_ahead_s}")
        if not self.call_timeout_s > 0:
            raise ConfigError(f"call_timeout_s must be > 0 seconds, got {self.call_timeout_s}")
        if self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.text_buffer_chars < 1:
            raise ConfigError(f"text_buffer_chars must be >= 1, got {self.text_buffer_chars}")


@dataclass
class EngineStats:
    """Counters of the device loop, for benchmarks and the CLI."""

    ticks: int = 0
    frames: int = 0
    tick_seconds: float = 0.0
    decode_seconds: float = 0.0
    failed_ticks: int = 0


class RealtimeEngine:
    """A SpeechBackend on one device. Use ``async with RealtimeEngine.load(...) as engine``.

    ``device_thread``: the thread that owns this device's models, shared with other engines on it
    (``ModelRegistry`` passes one per device); by default the engine makes and owns its own.

    Failure: a failed tick ends the turns in it with EngineError and the engine goes on if the
    device still works. Anything worse (the device broken, a rollback or bookkeeping failing)
    fails the engine for good: every open stream and pending request ends with an EngineError that
    says what happened, new conversations are refused, ``healthy`` turns False and the callbacks
    of ``on_failure`` run, so the host can exit and be restarted.
    """

    def __init__(
        self,
        generator: RealtimeGenerator,
        codec: MossAudioTokenizer,
        config: RealtimeEngineConfig | None = None,
        *,
        device_thread: DeviceThread | None = None,
    ) -> None:
        self.config = config or RealtimeEngineConfig()
        if generator.num_slots != self.config.num_slots:
            raise ConfigError(
                f"the generator has {generator.num_slots} slots but the config asks for {self.config.num_slots}"
            )
        generator.check_sampling(self.config.sampling)  # at construction, not at the first turn
        self.generator = generator
        self.codec = codec
        self.sample_rate = codec.sample_rate
        self.frame_s = codec.frame_size / codec.sample_rate
        self.rvq = generator.config.rvq
        self.stats = EngineStats()
        self._ahead_frames = max(1, math.ceil(self.config.max_ahead_s / self.frame_s))
        self._decode_state = codec.init_decode_state(self.config.num_slots)
        self._decode_step = compile_step(codec.decode_step) if self.config.compile else codec.decode_step
        self._streams: list[EngineStream | None] = [None] * self.config.num_slots
        self._turn_serial = [0] * self.config.num_slots
        # Rows a turn may add; before each turn the generator drops the oldest turns to leave them.
        self.turn_reserve_rows = min(self.config.max_frames_per_turn + 256, self.config.max_context // 2)
        self._free_slots = deque(range(self.config.num_slots))
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._hold = torch.zeros(self.config.num_slots, dtype=torch.bool)
        # A slot whose tick failed keeps its turn, held, until interrupt(heard_s) cuts it to what was heard.
        self._failed_serial = [-1] * self.config.num_slots
        self._health = EngineHealth()
        self._owns_device = device_thread is None
        self._device = device_thread or DeviceThread("moss-realtime-engine")
        self._worker = DeviceWorker(
            "realtime", self._tick, self._has_work, self._tick_failed, self._device_failed
        )

    @classmethod
    def load(
        cls,
        model: str | Path = REALTIME_MODEL_ID,
        codec: str | Path | MossAudioTokenizer = CODEC_MODEL_ID,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        codec_dtype: str | torch.dtype | None = None,
        config: RealtimeEngineConfig | None = None,
        attn_implementation: str | None = None,
        device_thread: DeviceThread | None = None,
    ) -> RealtimeEngine:
        """Load the model (and the codec, unless an already loaded one is passed to share it: then
        pass the ``device_thread`` its other users run on too)."""
        from moss_agent.models.codec import load_codec
        from moss_agent.models.realtime import load_realtime

        config = config or RealtimeEngineConfig()
        rt_model, tokenizer = load_realtime(model, device=device, dtype=dtype, attn_implementation=attn_implementation)
        if not isinstance(codec, MossAudioTokenizer):
            codec = load_codec(codec, device=rt_model.device, dtype=codec_dtype)
        generator = RealtimeGenerator(
            rt_model,
            tokenizer,
            config.num_slots,
            config.max_context,
            max_frames_per_turn=config.max_frames_per_turn,
            max_top_k=max(64, config.sampling.top_k or 0),
            max_repetition_window=max(64, config.sampling.repetition_window),
            seed=config.seed,
            cuda_graph=config.cuda_graph,
            compile=config.compile,
        )
        return cls(generator, codec, config, device_thread=device_thread)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> RealtimeEngine:
        """Start the device thread and warm it up: compile or capture the tick and the codec step
        now (with ``compile`` on a CPU, the first start compiles for a minute; later starts read
        the compiled code from torch's disk cache), so no conversation waits for it."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._device.start()
            try:
                self._device.attach(self._worker)
                await asyncio.wrap_future(self._device.submit(self._warm_up))
            except Exception as exc:
                await self.aclose()
                if not self.config.compile:
                    raise
                raise EngineError(
                    f"compiling the model step failed: {type(exc).__name__}: {str(exc)[:300]}. On a CPU "
                    "torch.compile needs a C++ compiler (g++); or start the engine without compile"
                ) from exc
        return self

    def _warm_up(self) -> None:
        began = time.perf_counter()
        torch.set_num_threads(self.config.cpu_threads)  # the first call on the device thread
        self.generator.warm_up()
        slots, device = self.config.num_slots, self.codec.device
        idle = torch.zeros(slots, dtype=torch.bool, device=device)
        codes = torch.zeros(self.rvq, slots, 1, dtype=torch.long, device=device)
        # Idle slots: the state stays bit-identical. The eager call first builds the codec's lookup
        # tables, which a compiled step reads but does not build.
        self.codec.decode_step(codes, self._decode_state, idle)
        if self._decode_step is not self.codec.decode_step:
            self._decode_step(codes, self._decode_state, idle)
        log.info("realtime engine warmed up", extra={"seconds": round(time.perf_counter() - began, 2)})

    async def aclose(self) -> None:
        """Stop the device thread; open streams end and waiting conversations get an error."""
        if self._closed:
            return
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(SessionClosedError("the engine was closed"))
        for stream in self._streams:
            if stream is not None:
                stream._finish(EngineError("the engine was closed"))
        if not self._device.alive:
            return
        if self._owns_device:
            await asyncio.to_thread(self._device.stop)
        else:  # others use the thread: stop ticking between two ticks
            await asyncio.to_thread(self._device.detach, self._worker)

    async def __aenter__(self) -> RealtimeEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def healthy(self) -> bool:
        """False once the engine failed for good (see ``failure``) or was closed."""
        return self._health.healthy and not self._closed

    @property
    def failure(self) -> EngineError | None:
        """Why the engine stopped serving, or None."""
        return self._health.failure

    def on_failure(self, callback: FailureCallback) -> None:
        """Call ``callback(error)`` on the event loop when the engine fails for good (at once if it has)."""
        self._health.add_callback(callback)

    @property
    def device_thread(self) -> DeviceThread:
        """The thread that owns this device's models: give it to other engines that share the codec
        (``BatchEngine(tts, engine.codec, device_thread=engine.device_thread)``)."""
        return self._device

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)

    # -- SpeechBackend ---------------------------------------------------------------------------

    async def open_conversation(
        self, *, system_prompt: str | None = None, voice_prompt: FloatArray | None = None,
        voice_sample_rate: int | None = None, history: Sequence[PastTurn] | None = None,
    ) -> EngineConversation:
        """Claim a slot (waiting in a bounded queue when all are busy) and set up its context.

        ``voice_prompt``: reference speech (float32 mono, at ``voice_sample_rate``, default the
        codec rate) whose voice the agent should use.

        ``history``: earlier turns, oldest first (``moss_agent.streaming.tts.check_history``). Their
        audio is encoded by the codec and the turns are fed now, laid out as live turns leave
        them (``PromptBuilder.assistant_rows``), so the first turn continues as after them. A history
        that does not fit ``max_context`` less the room a turn reserves (``turn_reserve_rows``)
        raises ConfigError: it is refused, not trimmed, so the context never silently loses turns
        the caller's LLM history still holds.
        """
        turns = check_history(history)
        if self._closed:
            raise SessionClosedError("the engine is closed")
        self._health.check()
        await self.start()
        slot = await self._claim_slot()
        try:
            rate = voice_sample_rate or self.sample_rate
            await self._call(self._open_slot, slot, system_prompt, voice_prompt, rate, turns)
        except BaseException:
            self._release_slot(slot)
            raise
        return EngineConversation(self, slot)

    async def _claim_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.popleft()
        if self.waiting >= self.config.max_waiting:
            raise OverloadError(
                f"all {self.config.num_slots} slots are busy and {self.config.max_waiting} conversations "
                "are already waiting; retry later or start another engine"
            )
        assert self._loop is not None
        waiter: asyncio.Future[int] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_slot(waiter.result())  # handed a slot just as we were cancelled
            raise

    def _release_slot(self, slot: int) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free_slots.append(slot)

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise SessionClosedError("the engine is closed")
        if self._health.failure is not None:
            if fn == self._release:  # nothing is left to free on a failed device: closing succeeds
                return None
            raise self._health.failure
        what = getattr(fn, "__name__", "a request").lstrip("_").replace("_", " ")
        return await bounded(self._device.submit(fn, *args), self.config.call_timeout_s, what)

    # -- device-thread work ----------------------------------------------------------------------

    def _encode(self, audio: FloatArray, sample_rate: int) -> torch.Tensor:
        """Speech -> codes [frames, rvq] for the prompt (runs on the device thread)."""
        pcm = np.asarray(audio, dtype=np.float32).reshape(-1)
        if sample_rate != self.sample_rate:
            pcm = resample(pcm, sample_rate, self.sample_rate)
        if pcm.size < self.codec.frame_size:
            return torch.zeros(0, self.rvq, dtype=torch.long)
        wav = torch.from_numpy(pcm).to(self.codec.device)[None, None]
        codes, lengths = self.codec.encode(wav, num_quantizers=self.rvq)
        return codes[:, 0, : int(lengths[0])].T.cpu()

    def _open_slot(
        self, slot: int, system_prompt: str | None, voice: FloatArray | None, rate: int,
        history: list[PastTurn],
    ) -> None:
        voice_codes = None if voice is None else self._encode(voice, rate)
        if voice_codes is not None and voice_codes.shape[0] == 0:
            raise ConfigError("the voice prompt is shorter than one codec frame (80 ms)")
        encoded = []
        for index, turn in enumerate(history):
            codes = self._encode(turn.audio, turn.sample_rate) if turn.has_audio else None  # type: ignore[arg-type]
            if codes is not None and codes.shape[0] == 0:
                if turn.role == "assistant":
                    raise ConfigError(f"history[{index}]: the assistant audio is shorter than one codec frame (80 ms)")
                codes = None  # as a user turn's audio is at start_turn
            encoded.append(EncodedTurn(turn.role, turn.text, codes))
        self.generator.start_conversation(
            slot, system_prompt, voice_codes, encoded, budget_rows=self.config.max_context - self.turn_reserve_rows
        )

    def _start_turn(self, slot: int, stream: EngineStream, user: UserTurn | None) -> None:
        codes = None
        if user is not None and user.audio is not None and len(user.audio):
            codes = self._encode(user.audio, user.sample_rate)
            codes = codes if codes.shape[0] else None
        self.generator.trim_context(slot, self.config.max_context - self.turn_reserve_rows)
        self.generator.start_turn(
            slot,
            user_text=None if user is None else user.text,
            user_codes=codes,
            sampling=self.config.sampling,
            max_frames=self.config.max_frames_per_turn,
        )
        self._decode_state.reset(slot)
        self._turn_serial[slot] += 1
        stream.serial = self._turn_serial[slot]
        self._streams[slot] = stream

    def _text_ledger(self, stream: EngineStream) -> _TextLedger:
        if stream.text_ledger is None:
            tokenizer: TextTokenizer = (
                UpstreamSegmentTokenizer(self.generator.tokenizer)
                if self.generator.upstream_compat
                else GrowingTextTokenizer(self.generator.tokenizer)
            )
            stream.text_ledger = _TextLedger(tokenizer)
        return stream.text_ledger

    def _push_text(self, slot: int, stream: EngineStream, delta: str) -> None:
        # The engine tokenizes (as the generator would) to count the stream's unread text.
        ledger = self._text_ledger(stream)
        if self._streams[slot] is stream and self.generator.turn_running(slot):
            try:
                self.generator.push_tokens(slot, ledger.push(delta))
            except MossError as exc:
                self._end_stream_from_device(slot, exc)
        else:
            ledger.drop(delta)  # the turn has ended: never spoken, never waited for
        self._report_text(stream)

    def _end_text(self, slot: int, stream: EngineStream) -> None:
        if self._streams[slot] is stream and self.generator.turn_running(slot):
            self.generator.push_tokens(slot, self._text_ledger(stream).finish())
            self.generator.end_text(slot)
            self._report_text(stream)

    def _report_text(self, stream: EngineStream) -> None:
        """Publish the stream's text counts (one tuple: read whole by the event loop) and wake its producer."""
        ledger = stream.text_ledger
        assert ledger is not None
        stream.text_counts = (ledger.chars, ledger.unread_chars())
        if self._loop is not None:
            self._loop.call_soon_threadsafe(stream._text_progress)

    def _rollback(self, slot: int, stream: EngineStream, heard_s: float | None) -> HeardResult:
        if stream.serial != self._turn_serial[slot]:
            raise EngineError(
                f"turn {stream.turn_id} was followed by another turn; settle a turn (interrupt) before the next starts"
            )
        generated = self.generator.frames_generated(slot)
        if heard_s is None:
            frames = generated
        else:  # a frame the listener started hearing counts as heard
            frames = min(generated, math.ceil(max(0.0, heard_s) / self.frame_s - 1e-6))
        try:
            text = self.generator.rollback(slot, frames)
        except MossError:
            raise
        except Exception as exc:  # the context is half cut: nothing on this device can be trusted
            raise self._device.fail(exc) from exc
        if self._streams[slot] is stream:
            self._streams[slot] = None
        return HeardResult(frames=frames, text=text, audio_s=frames * self.frame_s)

    def _release(self, slot: int) -> None:
        self._streams[slot] = None
        self._turn_serial[slot] += 1
        try:
            self.generator.release(slot)
            self._decode_state.reset(slot)
        except MossError:
            raise
        except Exception as exc:  # slot bookkeeping on the device failed: its state is unknown
            raise self._device.fail(exc) from exc

    def _held(self) -> torch.Tensor:
        held = torch.zeros(self.config.num_slots, dtype=torch.bool)
        for slot, stream in enumerate(self._streams):
            if stream is not None and stream.produced_frames - stream.consumed_frames >= self._ahead_frames:
                held[slot] = True
            if self._failed_serial[slot] == self._turn_serial[slot]:
                held[slot] = True
        return held

    def _has_work(self) -> bool:
        # The device loop asks this right before every tick; the tick reuses the mask.
        self._hold = self._held()
        return self.generator.has_work(hold=self._hold)

    def _tick(self) -> None:
        started = time.perf_counter()
        out = self.generator.step(hold=self._hold)
        stepped = time.perf_counter()
        deliveries = self._decode(out)
        done = time.perf_counter()
        self.stats.ticks += 1
        self.stats.frames += int(out.produced.sum())
        self.stats.tick_seconds += done - started
        self.stats.decode_seconds += done - stepped
        if deliveries and self._loop is not None:
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _decode(self, out: StepOutput) -> list[tuple[EngineStream, Any]]:
        """Decode this tick's frames of every slot in one codec step -> per-stream deliveries."""
        audible = out.produced & ~out.eos & (out.frames < self.codec.codebook_size).all(dim=-1)
        wav = None
        if bool(audible.any()):
            # idle slots carry pad/EOS ids the codebooks do not have; they are masked, but must index
            codes = torch.where(audible[:, None], out.frames, 0).T[:, :, None].to(self.codec.device)  # [rvq, S, 1]
            wav = self._decode_step(codes, self._decode_state, audible.to(self.codec.device))
            wav = wav[:, 0].cpu().numpy()
        deliveries: list[tuple[EngineStream, Any]] = []
        for slot in (out.produced | out.finished).nonzero().flatten().tolist():
            stream = self._streams[slot]
            if stream is None:
                continue
            if stream.text_ledger is not None and bool(out.produced[slot]):
                stream.text_ledger.read(int(out.text_position[slot]))
                stream.text_counts = (stream.text_ledger.chars, stream.text_ledger.unread_chars())
            if wav is not None and bool(audible[slot]):
                stream.produced_frames += 1
                chunk = AudioChunk(wav[slot].copy(), self.sample_rate, stream.turn_id, int(out.frame_index[slot]))
                deliveries.append((stream, chunk))
            if bool(out.finished[slot]):
                stream.stopped_by_model = not bool(out.capped[slot])
                deliveries.append((stream, _END))
                self._streams[slot] = None
        return deliveries

    def _end_stream_from_device(self, slot: int, exc: BaseException | None) -> None:
        stream = self._streams[slot]
        self._streams[slot] = None
        if stream is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(stream._finish, exc)

    def _tick_failed(self, exc: Exception) -> None:
        """A failed forward ends every turn in it with the error; the engine goes on if the device works.

        Each turn keeps the frames it made: its slot is held (never stepped again) until
        ``interrupt(heard_s)`` cuts the context to what the listener heard, or the next turn keeps
        them all. Raising here (the device is broken) fails the engine for good.
        """
        self.stats.failed_ticks += 1
        # A CUDA device-side assert makes every later op raise: probe before trusting the device.
        float((torch.ones(1, device=self.codec.device) + 1).sum().cpu())
        error = EngineError(
            f"generation failed on the device ({type(exc).__name__}: {exc}); this turn ended, the engine goes on"
        )
        for slot, stream in enumerate(self._streams):
            if stream is not None:
                self._failed_serial[slot] = self._turn_serial[slot]
                self._end_stream_from_device(slot, error)

    def _device_failed(self, error: EngineError) -> None:
        """The device thread failed for good (on that thread): end every stream and tell the host."""
        streams = [stream for stream in self._streams if stream is not None]
        self._streams = [None] * self.config.num_slots
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._failed_on_loop, streams, error)

    def _failed_on_loop(self, streams: list[EngineStream], error: EngineError) -> None:
        self._health.failed(error)
        for stream in streams:
            stream._finish(error)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


def _deliver(items: list[tuple[EngineStream, Any]]) -> None:
    for stream, item in items:
        stream._receive(item)


class _TextLedger:
    """One turn's text as the device thread fed it: characters taken, tokens pushed, tokens read.

    Written on the device thread only. Unread characters are counted per pushed delta: a delta
    counts as read once the model has read every token it completed (coarse, never drifting).
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.chars = 0  # characters taken (pushed or dropped)
        self.tokens = 0  # tokens pushed to the generator
        self.read_tokens = 0
        self.read_chars = 0
        self._marks: deque[tuple[int, int]] = deque()  # (tokens, chars) after each delta

    def push(self, delta: str) -> list[int]:
        ids = self.tokenizer.push(delta)
        self._advance(len(ids), len(delta))
        return ids

    def finish(self) -> list[int]:
        ids = self.tokenizer.finish()
        self._advance(len(ids), 0)
        return ids

    def drop(self, delta: str) -> None:
        self.chars += len(delta)
        self.read_chars += len(delta)

    def _advance(self, tokens: int, chars: int) -> None:
        self.tokens += tokens
        self.chars += chars
        self._marks.append((self.tokens, self.chars))

    def read(self, tokens_read: int) -> None:
        """The model has read ``tokens_read`` tokens of this turn (``StepOutput.text_position``)."""
        self.read_tokens = tokens_read
        while self._marks and self._marks[0][0] <= tokens_read:
            self.read_chars = max(self.read_chars, self._marks.popleft()[1])

    def unread_chars(self) -> int:
        """Characters the model has not read; 0 while it holds less than a prefill's worth of unread
        tokens, so a producer never waits on a model that is itself waiting for text."""
        if self.tokens - self.read_tokens < DELAY_TOKENS:
            return 0
        return self.chars - self.read_chars


class EngineConversation:
    """One slot: a conversation whose context persists across turns. Implements ``Conversation``."""

    def __init__(self, engine: RealtimeEngine, slot: int) -> None:
        self.engine = engine
        self.slot = slot
        self.sample_rate = engine.sample_rate
        self._stream: EngineStream | None = None
        self._closed = False

    async def start_turn(self, user: UserTurn | None, turn_id: int) -> EngineStream:
        if self._closed:
            raise SessionClosedError("the conversation is closed")
        if self._stream is not None and not self._stream.done:
            raise EngineError(
                f"turn {self._stream.turn_id} is still open on this conversation; "
                "interrupt() or aclose() it before starting another"
            )
        stream = EngineStream(self, turn_id)
        await self.engine._call(self.engine._start_turn, self.slot, stream, user)
        self._stream = stream
        return stream

    def context_length(self) -> int:
        """Rows of model context this conversation holds (read between ticks; for diagnostics)."""
        return self.engine.generator.context_length(self.slot)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None and not self._stream.done:
            self._stream._finish(None)
        try:
            await self.engine._call(self.engine._release, self.slot)
        except SessionClosedError:
            pass
        finally:
            self.engine._release_slot(self.slot)


class EngineStream:
    """One agent turn. Implements ``SpeechStream`` and its contract (``moss_agent.streaming.tts``)."""

    def __init__(self, conversation: EngineConversation, turn_id: int) -> None:
        self.conversation = conversation
        self.turn_id = turn_id
        self.serial = -1  # the slot's turn number, set on the device thread when the turn starts
        self.produced_frames = 0  # written by the device thread
        self.consumed_frames = 0  # written by the event loop; read by the device thread
        self.text_ledger: _TextLedger | None = None  # the device thread's
        self.text_counts = (0, 0)  # (characters taken, of them unread): written by the device thread
        self._posted_chars = 0
        self._queue: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._text_room = asyncio.Event()
        self._settling = asyncio.Lock()
        self._error: BaseException | None = None
        self._input_closed = False  # end_input() or aclose() was called
        self._speech_over = False  # generation ended (last frame made, failure, or cut)
        self._heard: HeardResult | None = None
        self.done = False  # no more audio will be delivered
        self.completed = False  # the model finished the turn by itself (EOS or frame cap)
        self.stopped_by_model = False  # it ended at the model's own stop (all its text spoken), not a cap

    @property
    def _engine(self) -> RealtimeEngine:
        return self.conversation.engine

    def _unread_chars(self) -> int:
        taken, unread = self.text_counts
        return self._posted_chars - taken + unread

    async def push_text(self, delta: str) -> None:
        if self._input_closed:
            raise SessionClosedError(f"push_text after end_input() or aclose() on turn {self.turn_id}")
        if self._speech_over or not delta:
            return
        engine = self._engine
        self._posted_chars += len(delta)
        engine._device.post(engine._push_text, self.conversation.slot, self, delta)
        while self._unread_chars() > engine.config.text_buffer_chars and not self._speech_over:
            self._text_room.clear()
            await self._text_room.wait()

    async def end_input(self) -> None:
        if self._input_closed:
            return
        self._input_closed = True
        if not self._speech_over:
            self._engine._device.post(self._engine._end_text, self.conversation.slot, self)

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> AudioChunk:
        while not self._queue:
            if self.done:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        item = self._queue.popleft()
        if item is _END:
            self.completed = True
            self.done = True
            raise StopAsyncIteration
        self.consumed_frames += 1
        if self.produced_frames - self.consumed_frames == self._engine._ahead_frames - 1:
            self._engine._device.wake()  # the device may have held this slot
        return item  # type: ignore[no-any-return]

    async def interrupt(self, heard_s: float | None = None) -> HeardResult:
        """Stop generating, drop unplayed audio, cut the context to ``heard_s`` (None: all generated).

        Also valid after the model finished the turn, while its audio is still playing: the context
        is then cut to what was heard. A second call returns the first result.
        """
        async with self._settling:
            if self._heard is None:
                self._finish(None)
                engine = self._engine
                self._heard = await engine._call(engine._rollback, self.conversation.slot, self, heard_s)
        return self._heard

    async def aclose(self) -> None:
        """Release the stream; a turn still running is stopped and kept as generated so far."""
        self._input_closed = True
        if not self.done:
            await self.interrupt(None)
        self._finish(None)

    def _receive(self, item: Any) -> None:
        if not self.done:
            self._queue.append(item)
            self._ready.set()
            if item is _END:
                self._speech_over = True
            self._text_room.set()  # a frame was made: the model read text

    def _text_progress(self) -> None:
        self._text_room.set()

    def _finish(self, error: BaseException | None) -> None:
        """End the stream now: queued audio is dropped (stale after an interrupt)."""
        if self.done:
            return
        self.done = True
        self._speech_over = True
        self._error = error
        self._queue.clear()
        self._ready.set()
        self._text_room.set()
