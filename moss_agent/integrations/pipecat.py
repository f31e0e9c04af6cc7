"""MOSS-TTS-Realtime as a pipecat TTS service: LLM tokens in as they stream, audio out as it is made.

Put ``MossTTSService`` where any pipecat TTS service goes::

    engine = RealtimeEngine.load(device="cuda")              # or RemoteSpeechBackend(url), FakeSpeechBackend()
    tts = MossTTSService(engine)                             # one engine slot per service instance
    pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts, transport.output(), assistant_agg])

    tts = MossTTSService.from_url("ws://gpu-box:8000", token="...", voice="alice")   # a speech server

What it does, in pipecat's terms:

- **Token streaming.** Text is aggregated per token (``TextAggregationMode.TOKEN``): each LLM token
  goes to the engine at once, no sentence buffering. The engine starts speaking after about a dozen
  text tokens and is paced by its own text budget (``push_text`` waits), so a fast LLM cannot run
  ahead of speech.
- **One pipecat audio context = one engine turn.** The first text of a context starts a turn on the
  service's conversation (``Conversation.start_turn``); the end of the LLM response
  (``flush_audio``) ends its input; a background task pushes each ``AudioChunk`` as a
  ``TTSAudioRawFrame`` (int16 at the engine's rate, 24 kHz) into the context, then a
  ``TTSStoppedFrame``. The base class emits ``TTSStartedFrame`` and measures TTFB (stopped here
  when the first audio arrives).
- **Word timestamps.** A ``WordTimer`` sees the text sent and the audio made; the words it settles go
  to ``add_word_timestamps`` in seconds from the turn's first sample, which is the time base pipecat
  wants (it starts the clock when the context's first audio frame is pushed). Pipecat turns them into
  ``TTSTextFrame``s on the playback clock, so the assistant context holds what was spoken.
- **Interruption.** On an ``InterruptionFrame`` generation stops and the engine is rolled back to
  what the listener heard, estimated as min(audio pushed, wall time since the first audio frame was
  pushed): the transport plays in real time from the first frame on, and cannot have played more
  than it was given. The conversation's next turn continues from there. A turn that finished
  generating stays open until the next one starts, so an interruption during its last buffered
  seconds still cuts it back; otherwise it is closed as heard in full.
- **Conversation lifetime.** Each service instance opens one conversation (one engine slot, whose KV
  cache keeps the model context across turns) on ``StartFrame`` (or on first use) and closes it on
  ``EndFrame`` / ``CancelFrame``. Several pipelines in one process can share one ``RealtimeEngine``:
  their slots are stepped in one batched forward.

Not torch: this module runs in a bot process that talks to a remote engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moss_agent._optional import require
from moss_agent.errors import ConfigError, MossError
from moss_agent.events import FloatArray
from moss_agent.streaming.tts import Conversation, HeardResult, SpeechBackend, SpeechStream, UserTurn
from moss_agent.streaming.word_timing import WordTimer, WordTiming

# The class below subclasses pipecat's, so pipecat is needed at import time; a missing install
# names the extra to add instead of a bare ModuleNotFoundError.
require("pipecat.services.tts_service", "pipecat")

from pipecat.frames.frames import (  # noqa: E402
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseStartFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection  # noqa: E402
from pipecat.services.settings import TTSSettings  # noqa: E402
from pipecat.services.tts_service import TextAggregationMode, TTSService  # noqa: E402

__all__ = ["MossTTSService"]

log = logging.getLogger(__name__)

MODEL_NAME = "MOSS-TTS-Realtime"


def pcm16_bytes(pcm: FloatArray) -> bytes:
    """Float32 mono in [-1, 1] -> little-endian int16 bytes (what TTSAudioRawFrame carries)."""
    scaled = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0
    data: bytes = np.rint(scaled).astype("<i2").tobytes()
    return data


def _role_of(message: Any) -> str | None:
    return message.get("role") if isinstance(message, dict) else None


def _text_of(message: Any) -> str:
    """The text of an OpenAI-style message: a string, or the text parts of a list of parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(str(p).strip() for p in parts if p)
    return ""


@dataclass(eq=False)
class _Turn:
    """One engine turn, bound to the pipecat audio context that plays it."""

    context_id: str
    stream: SpeechStream
    timer: WordTimer
    sample_rate: int
    task: asyncio.Task[None] | None = None
    input_done: asyncio.Event = field(default_factory=asyncio.Event)  # the reply's text is complete
    generated: bool = False  # its audio iteration ended (last frame, failure or cut)
    settled: bool = False  # interrupt() or aclose() was called
    cut: bool = False  # interrupted: nothing more of it goes downstream
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # ... and has returned
    samples_pushed: int = 0  # audio of this turn pushed downstream so far
    first_push_ns: int | None = None  # pipeline clock when its first audio frame was pushed

    def heard_s(self, now_ns: int) -> float:
        """What the listener can have heard: no more than was pushed, no more than real time allows."""
        if self.first_push_ns is None:
            return 0.0
        return max(0.0, min(self.samples_pushed / self.sample_rate, (now_ns - self.first_push_ns) / 1e9))


class MossTTSService(TTSService):
    """A pipecat TTS service on a MOSS-TTS-Realtime ``SpeechBackend``.

    ``backend``: a ``RealtimeEngine`` (in process; share one among pipelines), a
    ``RemoteSpeechBackend`` (a speech server; see ``from_url``) or a ``FakeSpeechBackend``.
    ``context``: the pipeline's ``LLMContext`` (the one its aggregators share), so each turn tells
    the engine what the user said since the last one: MOSS-TTS-Realtime keeps the user's words in its
    context, and speaks better knowing them. Without it the engine hears only its own replies.
    ``system_prompt`` / ``voice_prompt`` (float32 mono at the backend's rate): set when the
    conversation opens. ``voice``: a voice registered on a speech server (``RemoteSpeechBackend``
    only). ``owns_backend``: close the backend with the service (``from_url`` sets it).
    ``text_aggregation_mode``: TOKEN (default) streams each LLM token to the engine; SENTENCE works
    too but only adds latency. Other keyword arguments go to pipecat's ``TTSService`` (its
    ``sample_rate`` is the backend's: the transport resamples if it plays at another rate).
    """

    def __init__(
        self,
        backend: SpeechBackend,
        *,
        context: LLMContext | None = None,
        system_prompt: str | None = None,
        voice_prompt: FloatArray | None = None,
        voice: str | None = None,
        owns_backend: bool = False,
        text_aggregation_mode: TextAggregationMode = TextAggregationMode.TOKEN,
        **kwargs: Any,
    ) -> None:
        if "sample_rate" in kwargs and kwargs["sample_rate"] not in (None, backend.sample_rate):
            raise ConfigError(
                f"MossTTSService speaks at the engine's {backend.sample_rate} Hz; leave sample_rate out "
                "(the output transport resamples to its own rate)"
            )
        kwargs.pop("sample_rate", None)
        settings = kwargs.pop("settings", None) or TTSSettings(model=MODEL_NAME, voice=voice, language=None)
        super().__init__(
            text_aggregation_mode=text_aggregation_mode,
            # Words come from the WordTimer, so pipecat builds TTSTextFrames on the playback clock.
            push_text_frames=False,
            # The base opens each audio context with a TTSStartedFrame and starts TTFB there.
            push_start_frame=True,
            sample_rate=backend.sample_rate,
            settings=settings,
            **kwargs,
        )
        self._backend = backend
        self._rate = backend.sample_rate  # what pipecat was told this service speaks at
        self._context = context
        self._messages_seen = 0  # messages of ``context`` already passed to the engine (or skipped)
        self._system_prompt = system_prompt
        self._voice_prompt = voice_prompt
        self._voice = voice
        self._owns_backend = owns_backend
        self._conversation: Conversation | None = None
        self._opening: asyncio.Lock | None = None
        self._open_task: asyncio.Task[None] | None = None
        self._turn: _Turn | None = None
        self._early: asyncio.Task[SpeechStream] | None = None  # a turn started ahead of its first text
        self._cutting: asyncio.Task[None] | None = None  # an interruption being settled
        self._turn_ids = 0
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        token: str | None = None,
        voice: str | None = None,
        encoding: str = "pcm_s16le",
        **kwargs: Any,
    ) -> MossTTSService:
        """A service on a ``moss-agent speech-server`` at ``url`` (``ws://host:port``): ``token`` is the
        server's bearer token, ``voice`` a voice registered there. The service owns the connection
        and closes it at the end of the pipeline. Needs the ``[service]`` extra (aiohttp), no torch."""
        from moss_agent.client import RemoteSpeechBackend

        backend = RemoteSpeechBackend(url, token=token, voice=voice, encoding=encoding)
        kwargs.setdefault("settings", TTSSettings(model=MODEL_NAME, voice=voice, language=None))
        return cls(backend, owns_backend=True, **kwargs)

    @property
    def backend(self) -> SpeechBackend:
        return self._backend

    @property
    def conversation(self) -> Conversation | None:
        """The engine conversation (one slot) of this service, once opened."""
        return self._conversation

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def supports_processing_metrics(self) -> bool:
        # run_tts hands text off; the audio comes from a background task (TTFB covers latency).
        return False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        # Claiming a slot may wait (all busy): in the background, so the pipeline starts meanwhile
        # and the first reply waits for the same open.
        self._open_task = self.create_task(self._open_early(), "moss-tts-open")

    async def _open_early(self) -> None:
        try:
            await self._ensure_conversation()
        except MossError as exc:
            # Not fatal here: the first reply tries again, and reports the error if it persists.
            await self.push_error(error_msg=f"MOSS-TTS could not open a conversation: {exc}", exception=exc)

    async def stop(self, frame: EndFrame) -> None:
        # The reply in flight is spoken to its end before the pipeline ends: its input is closed
        # here, so the base's playback (which waits for every audio context) does not stall.
        turn = self._turn
        if turn is not None and not turn.input_done.is_set():
            await self._end_input(turn)
        await super().stop(frame)
        await self._cut_done()
        if self._turn is not None:
            await self._retire(self._turn)
        await self._drop_early()
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        turn, self._turn = self._turn, None
        if turn is not None:
            await self._settle(turn, self.get_clock().get_time())
        await self._cut_done()
        await self._drop_early()
        await self._close()

    async def _ensure_conversation(self) -> Conversation:
        if self._conversation is not None:
            return self._conversation
        if self._closed:
            raise ConfigError("this MossTTSService was stopped; build a new one for a new pipeline")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # StartFrame and a first reply may both ask
            if self._conversation is None:
                start = getattr(self._backend, "start", None)
                if self._owns_backend and start is not None:
                    await start()
                kwargs: dict[str, Any] = {"system_prompt": self._system_prompt}
                if self._voice_prompt is not None:
                    kwargs["voice_prompt"] = self._voice_prompt
                elif self._voice is not None:
                    kwargs["voice"] = self._voice
                conversation = await self._backend.open_conversation(**kwargs)
                if conversation.sample_rate != self._rate:
                    await conversation.aclose()
                    raise ConfigError(
                        f"the speech engine speaks at {conversation.sample_rate} Hz, but this service was "
                        f"built for {self._rate} Hz; pass a backend whose sample_rate is the engine's"
                    )
                self._conversation = conversation
        return self._conversation

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._open_task is not None and not self._open_task.done():
            await self.cancel_task(self._open_task)
        conversation, self._conversation = self._conversation, None
        try:
            if conversation is not None:
                await conversation.aclose()
        except MossError as exc:
            log.warning("closing the MOSS-TTS conversation failed", extra={"error": str(exc)})
        if self._owns_backend:
            aclose = getattr(self._backend, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- text in ---------------------------------------------------------------------------------

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Send ``text`` to the engine turn of ``context_id`` (starting it on the context's first
        text); its audio reaches the audio context from the turn's receive task."""
        try:
            turn = await self._turn_for(context_id)
            if not turn.generated:  # text after the turn ended by itself is dropped by the engine too
                turn.timer.push_text(text)
            await turn.stream.push_text(text)
        except MossError as exc:
            yield ErrorFrame(error=f"MOSS-TTS: {exc}")
            return
        yield None  # the audio arrives through the receive task

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The LLM response is complete: the engine speaks the rest of the text and ends the turn."""
        turn = self._turn
        if (
            turn is not None
            and (context_id is None or turn.context_id == context_id)
            and not turn.input_done.is_set()
        ):
            await self._end_input(turn)

    async def _end_input(self, turn: _Turn) -> None:
        turn.input_done.set()
        turn.timer.end_text()
        try:
            await turn.stream.end_input()
        except MossError as exc:
            await self.push_error(error_msg=f"MOSS-TTS: {exc}", exception=exc)

    async def _turn_for(self, context_id: str) -> _Turn:
        turn = self._turn
        if turn is not None and turn.context_id == context_id and not turn.input_done.is_set():
            return turn
        early, self._early = self._early, None
        stream = await (early if early is not None else self._start_stream())
        rate = self._rate
        turn = _Turn(context_id, stream, WordTimer(rate), rate)
        self._turn = turn
        turn.task = self.create_task(self._receive(turn), f"moss-tts-turn-{self._turn_ids}")
        return turn

    async def _start_stream(self) -> SpeechStream:
        """The next engine turn, once the previous one is finished (one open turn per conversation)."""
        if self._turn is not None:
            await self._retire(self._turn)
        await self._cut_done()
        conversation = await self._ensure_conversation()
        self._turn_ids += 1
        return await conversation.start_turn(self._user_turn(), self._turn_ids)

    async def _drop_early(self) -> None:
        """A turn started ahead of text that never came (a cut reply, the end): settle it at nothing
        heard, so it leaves nothing in the context."""
        early, self._early = self._early, None
        await self._settle_unused(early)

    async def _settle_unused(self, early: asyncio.Task[SpeechStream] | None) -> None:
        if early is None:
            return
        try:
            stream = await early  # not cancelled: a start given up half way would leave the slot unsure
            await stream.interrupt(0.0)
        except MossError as exc:
            log.warning("settling an unused MOSS-TTS turn failed", extra={"error": str(exc)})

    def _user_turn(self) -> UserTurn | None:
        """What the user said since the previous turn, from the shared LLM context (text only)."""
        if self._context is None:
            return None
        messages = self._context.get_messages()
        if len(messages) < self._messages_seen:  # the context was rewritten (summarized, reset)
            self._messages_seen = 0
        said = [_text_of(m) for m in messages[self._messages_seen :] if _role_of(m) == "user"]
        self._messages_seen = len(messages)
        text = " ".join(t for t in said if t)
        return UserTurn(text) if text else None

    async def _retire(self, turn: _Turn) -> None:
        """Finish the previous turn before the next starts (one open turn per conversation): its
        text is complete, so it is spoken to the end, and closed as heard in full. Text of a new
        context waits meanwhile; pipecat plays contexts in order anyway."""
        if not turn.input_done.is_set():
            await self._end_input(turn)
        if turn.task is not None:
            # asyncio.wait, not await: an interruption may cancel the task, which is not ours to raise.
            await asyncio.wait({turn.task})
        if self._turn is turn:
            self._turn = None
        if not turn.settled:
            turn.settled = True
            try:
                await turn.stream.aclose()
            finally:
                turn.closed.set()
        # Settled by an interruption meanwhile: the next turn starts once that cut is done.
        await turn.closed.wait()

    # -- audio and words out ---------------------------------------------------------------------

    async def _receive(self, turn: _Turn) -> None:
        """Move one turn's audio and settled words into its audio context, in order."""
        context_id = turn.context_id
        first = True
        try:
            async for chunk in turn.stream:
                if turn.cut:
                    return
                if first:
                    first = False
                    await self.stop_ttfb_metrics()
                frame = TTSAudioRawFrame(pcm16_bytes(chunk.pcm), chunk.sample_rate, 1, context_id=context_id)
                await self.append_to_audio_context(context_id, frame)
                await self._add_words(turn, turn.timer.push_audio(chunk.pcm))
            turn.generated = True
            await self._add_words(turn, turn.timer.finish())
        except MossError as exc:
            turn.generated = True
            # The audio made before the failure plays; pipecat completes the words left untimed.
            await self.push_error(
                error_msg=f"MOSS-TTS turn {turn.stream.turn_id} failed: {exc}", exception=exc
            )
        finally:
            turn.generated = True
        # A turn can end (the model's stop, the frame cap) while the LLM still streams: its context
        # stays open until the reply's end, or the base would open a new audio context for the
        # next token of the same context id, which no audio ever fills (a 3 s stall, then an error).
        await turn.input_done.wait()
        if turn.cut:
            return
        await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
        if self.audio_context_available(context_id):
            await self.remove_audio_context(context_id)

    async def _add_words(self, turn: _Turn, words: list[WordTiming]) -> None:
        if words:
            # Seconds from the turn's first sample: pipecat starts the word clock when the
            # context's first audio frame is pushed, which is that sample.
            await self.add_word_timestamps([(w.word, w.start_s) for w in words], turn.context_id)

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        turn = self._turn
        if (
            isinstance(frame, TTSAudioRawFrame)
            and turn is not None
            and frame.context_id == turn.context_id
            and direction == FrameDirection.DOWNSTREAM
        ):
            # The playback estimate of an interruption: what went downstream, and since when.
            if turn.first_push_ns is None:
                turn.first_push_ns = self.get_clock().get_time()
            turn.samples_pushed += len(frame.audio) // 2
        await super().push_frame(frame, direction)

    # -- interruption ----------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, InterruptionFrame):
            # Measured before the base's handling, which takes time and stops playback.
            now = self.get_clock().get_time()
            turn = self._turn
            if turn is not None and self._interruptible(turn):
                self._turn = None
                turn.cut = True
            else:
                turn = None
            early, self._early = self._early, None
            if turn is not None or early is not None:
                # Settled in the background, so the interruption goes on downstream at once: while
                # the engine is cut back, words already timed could otherwise still be released and
                # overtaken by the interruption further down (ending up in the next reply). The next
                # engine turn waits for this one (_start_stream).
                previous = self._cutting
                self._cutting = self.create_task(self._cut(previous, turn, now, early), "moss-tts-interrupt")
        elif isinstance(frame, LLMFullResponseStartFrame) and self._early is None and not self._closed:
            # A reply begins: start its engine turn now, so the start (the tick in progress, the
            # prompt's prefill) overlaps the LLM's time to first token instead of adding to it.
            self._early = self.create_task(self._start_stream(), f"moss-tts-turn-{self._turn_ids + 1}-start")
        await super().process_frame(frame, direction)

    async def _cut(
        self,
        previous: asyncio.Task[None] | None,
        turn: _Turn | None,
        now_ns: int,
        early: asyncio.Task[SpeechStream] | None,
    ) -> None:
        if previous is not None:
            await asyncio.wait({previous})
        if turn is not None:
            await self._settle(turn, now_ns)
        await self._settle_unused(early)

    async def _cut_done(self) -> None:
        """Wait for an interruption being settled (never cancelling it: a half-settled turn would
        leave the engine's context unsure)."""
        if self._cutting is not None:
            await asyncio.wait({self._cutting})

    def _interruptible(self, turn: _Turn) -> bool:
        """A TTSSpeakFrame(interruptible=False) keeps playing through an interruption; so does its turn."""
        context = self._tts_contexts.get(turn.context_id)
        return context is None or context.interruptible

    async def _settle(self, turn: _Turn, now_ns: int) -> HeardResult | None:
        """Stop the turn and cut the engine's context back to what was heard."""
        if turn.settled:
            return None
        turn.settled = True
        heard_s = turn.heard_s(now_ns)
        if turn.task is not None and not turn.task.done():
            await self.cancel_task(turn.task)
        try:
            heard = await turn.stream.interrupt(heard_s)
        except MossError as exc:
            await self.push_error(error_msg=f"MOSS-TTS could not settle turn: {exc}", exception=exc)
            return None
        finally:
            turn.closed.set()
        log.debug(
            "MOSS-TTS turn interrupted",
            extra={"turn_id": turn.stream.turn_id, "heard_s": heard_s, "frames": heard.frames},
        )
        return heard
