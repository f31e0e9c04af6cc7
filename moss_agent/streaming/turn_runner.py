"""One agent turn, from the queue to its result: the turn's lifecycle and the task that runs it.

A turn moves through one ``TurnPhase``::

    QUEUED -> STARTING -> SPEAKING -> FINISHING ----> DONE
       |          |           |                        ^
       |          +-----------+---> INTERRUPTING ------+
       +-----------------------------------------------+  (dropped before it started)

SPEAKING runs two pumps: text (the LLM or the caller's tokens into the speech stream, which blocks
the producer when the stream's text budget is full) and audio (the stream's chunks to the output or
to event subscribers). The turn ends when its speech ends: when the audio pump has played the last
frame (the model's stop or the frame cap) the text pump is cancelled, which closes the LLM stream.
Every ending settles the stream at what was heard (``SpeechStream.interrupt(heard_s)``), so the
history and the model context hold only the text the played frames covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from moss_agent.config import SessionConfig
from moss_agent.errors import EngineError, MossError, TransportError
from moss_agent.events import (
    AudioChunk,
    ErrorEvent,
    Interrupted,
    Metrics,
    TextDelta,
    TurnEnded,
    TurnStarted,
    WordTimes,
)
from moss_agent.limiter import LimiterStats, PeakLimiter, log_limited
from moss_agent.streaming.clock import Clock
from moss_agent.streaming.fanout import EventHub, EventStream
from moss_agent.streaming.history import History
from moss_agent.streaming.llm import LLM
from moss_agent.streaming.metrics import SessionSummary, TurnTimeline
from moss_agent.streaming.tts import Conversation, HeardResult, SpeechStream, UserTurn
from moss_agent.streaming.word_timing import WordTimer
from moss_agent.transports.base import AudioOutput

log = logging.getLogger(__name__)

TokenSource = AsyncIterable[str] | Iterable[str]


class TurnPhase(Enum):
    QUEUED = "queued"  # waiting behind the turn that speaks
    STARTING = "starting"  # the speech stream is being opened
    SPEAKING = "speaking"  # text and audio pumps run
    FINISHING = "finishing"  # the speech ended on its own (or the start failed): settling
    INTERRUPTING = "interrupting"  # cut by the user, the caller or a failure: settling at the cut
    DONE = "done"  # the result is set


@dataclass(frozen=True, slots=True)
class TurnResult:
    """How an agent turn ended. ``text`` was sent to the speech engine; ``heard_text`` is what the
    played frames covered (the history keeps it)."""

    turn_id: int
    text: str
    heard_text: str
    heard_s: float
    audio_s: float
    interrupted: bool
    error: str | None = None
    metrics: Metrics | None = None


@dataclass(eq=False)
class Turn:
    """One agent turn: what it says (``tokens``; None: the LLM on the history) and where it is."""

    id: int
    events: EventStream  # what ``async for event in handle`` reads
    tokens: TokenSource | None = None
    user: UserTurn | None = None
    phase: TurnPhase = TurnPhase.QUEUED
    cut_at_s: float = 0.0  # the playback position when it was interrupted
    settled_at_s: float = 0.0  # the playback position the stream was settled at
    parts: list[str] = field(default_factory=list)  # text sent to the speech stream
    error: str | None = None  # the first failure; later ones are only logged
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    words: WordTimer | None = None  # when each word is spoken, from the text sent and the audio played
    timeline: TurnTimeline = field(init=False)
    future: asyncio.Future[TurnResult] = field(init=False)

    def __post_init__(self) -> None:
        self.timeline = TurnTimeline(self.id)
        self.future = asyncio.get_running_loop().create_future()

    @property
    def interruptible(self) -> bool:
        return self.phase in (TurnPhase.STARTING, TurnPhase.SPEAKING)


class _StreamFailed(Exception):
    """The speech stream (not the output) raised while audio was being read from it."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[str]) -> AsyncGenerator[AsyncIterator[str], None]:
    """Close an async iterator on exit when it can be closed (async generators, HTTP streams)."""
    try:
        yield iterator
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


class TurnRunner:
    """Runs a session's turns, one at a time, on its conversation."""

    def __init__(
        self,
        conversation: Conversation,
        *,
        config: SessionConfig,
        clock: Clock,
        hub: EventHub,
        history: History,
        summary: SessionSummary,
        llm: LLM | None,
        output: AudioOutput | None,
        far_end: Callable[[AudioChunk], None] | None,
        name: str,
    ) -> None:
        """``far_end``: gets every chunk played (the echo canceller's reference)."""
        self.conversation = conversation
        self.config = config
        self.clock = clock
        self.hub = hub
        self.history = history
        self.summary = summary
        self.llm = llm
        self.output = output
        self.far_end = far_end
        self.name = name
        self.stale_chunks_dropped = 0
        self.limiter_stats = LimiterStats()  # the output limiter's work over every turn

    # ------------------------------------------------------------------ queries

    def played_s(self, turn: Turn) -> float:
        """Seconds of ``turn`` the user has heard (the output's playback position)."""
        if self.output is not None:
            return self.output.played_s(turn.id)
        return turn.timeline.audio_s

    @staticmethod
    def speaking(turn: Turn | None) -> bool:
        """Whether the agent's audio of ``turn`` is playing now."""
        return turn is not None and turn.phase is TurnPhase.SPEAKING and turn.timeline.first_audio is not None

    # ------------------------------------------------------------------ one turn

    async def run(self, turn: Turn, user: UserTurn | None) -> None:
        turn.phase = TurnPhase.STARTING
        self.hub.emit(TurnStarted(turn.id))
        stream: SpeechStream | None = None
        heard: HeardResult | None = None
        try:
            try:
                async with asyncio.timeout(self.config.audio_stall_timeout_s):
                    stream = await self.conversation.start_turn(user, turn.id)
            except Exception as exc:
                self._record_error(turn, exc, "could not start the speech turn")
                if turn.phase is TurnPhase.STARTING:
                    turn.phase = TurnPhase.FINISHING
                return
            if turn.phase is TurnPhase.STARTING:
                turn.phase = TurnPhase.SPEAKING
                turn.words = WordTimer(self.conversation.sample_rate)
                async with asyncio.TaskGroup() as tg:
                    turn.pumps = [
                        tg.create_task(self._pump_text(turn, stream), name=f"{self.name}-turn{turn.id}-text"),
                        tg.create_task(self._pump_audio(turn, stream), name=f"{self.name}-turn{turn.id}-audio"),
                    ]
            heard = await self._settle(turn, stream)
        except Exception as exc:
            self._record_error(turn, exc, "speech turn failed")
        finally:
            if stream is not None:
                try:
                    await stream.aclose()
                except Exception:
                    log.warning("closing a speech stream failed", extra={"turn_id": turn.id}, exc_info=True)
            self._finish(turn, heard)

    def interrupt(self, turn: Turn) -> None:
        """Cut ``turn`` now: stop its pumps and the output; it settles at what was played."""
        if not turn.interruptible:
            return
        # Read the playback position before clearing, so it is exactly what left the speaker.
        turn.cut_at_s = self.played_s(turn)
        turn.phase = TurnPhase.INTERRUPTING
        if self.output is not None:
            self.output.clear()
        self._cancel_pumps(turn)

    def finish_unstarted(self, turn: Turn) -> None:
        """A queued turn dropped before it reached the engine."""
        turn.phase = TurnPhase.DONE
        self.hub.end_turn(turn.id)
        if not turn.future.done():
            turn.future.set_result(TurnResult(turn.id, "", "", 0.0, 0.0, interrupted=True))

    async def _settle(self, turn: Turn, stream: SpeechStream) -> HeardResult:
        """Cut the stream to what was heard, for every ending (the engine reports the text covered)."""
        heard_s = turn.cut_at_s if turn.phase is TurnPhase.INTERRUPTING else self.played_s(turn)
        turn.settled_at_s = heard_s
        try:
            async with asyncio.timeout(self.config.audio_stall_timeout_s):
                return await stream.interrupt(heard_s)
        except Exception as exc:  # the engine cannot say which words were heard: claim none
            if turn.error is None:
                self._record_error(turn, exc, "could not settle what was heard")
            else:  # the failure that ended the turn was reported; this one follows from it
                log.warning("settling a failed turn failed", extra={"turn_id": turn.id}, exc_info=exc)
            return HeardResult(0, "", heard_s)

    def _finish(self, turn: Turn, heard: HeardResult | None) -> None:
        tl = turn.timeline
        tl.end = self.clock.now()
        text = "".join(turn.parts)
        interrupted = turn.phase is TurnPhase.INTERRUPTING
        heard_text = self._heard_words(turn, heard, text, interrupted)
        heard_s = heard.audio_s if heard is not None else 0.0
        if interrupted:
            tl.interrupted = True
            self.hub.emit(Interrupted(turn.id, heard_s, heard_text))
        else:
            self.hub.emit(TurnEnded(turn.id, text, tl.audio_s))
        tl.heard_s = heard_s
        self.history.add("assistant", heard_text)
        metrics = tl.event()
        self.summary.add(metrics)
        if turn.error:
            self.summary.errors += 1
        self.hub.emit(metrics)
        turn.phase = TurnPhase.DONE
        self.hub.end_turn(turn.id)
        if not turn.future.done():
            turn.future.set_result(
                TurnResult(turn.id, text, heard_text, heard_s, tl.audio_s, interrupted, turn.error, metrics)
            )

    def _heard_words(self, turn: Turn, heard: HeardResult | None, text: str, interrupted: bool) -> str:
        """The text of the words the listener heard, from the word timings and where playback was
        settled; never more than the engine says its kept frames covered. Emits the final timings."""
        model_text = heard.text if heard is not None else ""
        words = turn.words
        if words is None:
            return model_text
        spoke_everything = (
            not interrupted and turn.error is None and "".join(model_text.split()) == "".join(text.split())
        )
        if spoke_everything:  # the model's own stop: all the text was spoken, so the fit is exact
            words.finish()
        timings = words.words if spoke_everything else words.heard_words(turn.settled_at_s, within=model_text)
        if timings:
            self.hub.emit(WordTimes(turn.id, tuple(timings), final=True))
        return words.heard_text(turn.settled_at_s, within=model_text)

    # ------------------------------------------------------------------ failures

    def _record_error(self, turn: Turn, exc: BaseException, what: str, kind: str | None = None) -> None:
        """Keep the turn's first error and tell subscribers once."""
        turn.error = turn.error or str(exc)
        kind = kind or type(exc).__name__
        if isinstance(exc, MossError):
            log.warning(what, extra={"turn_id": turn.id, "kind": kind})
        else:  # not one of ours: a bug somewhere below, keep the traceback
            log.error(what, extra={"turn_id": turn.id}, exc_info=exc)
        self.hub.emit(ErrorEvent(f"turn {turn.id}: {what}: {exc}", turn.id, detail={"kind": kind}))

    def _fail(self, turn: Turn, exc: Exception, what: str) -> None:
        """The engine or the output failed mid-turn: keep what was heard, stop the rest."""
        self._record_error(turn, exc, what)
        self.interrupt(turn)

    def _cancel_pumps(self, turn: Turn) -> None:
        current = asyncio.current_task()
        for pump in turn.pumps:
            if pump is not current:
                pump.cancel()

    # ------------------------------------------------------------------ text

    async def _text_source(self, turn: Turn) -> AsyncGenerator[str, None]:
        if turn.tokens is not None:
            if isinstance(turn.tokens, AsyncIterable):
                async with _closing(aiter(turn.tokens)) as deltas:  # the caller's stream ends with the turn
                    async for delta in deltas:
                        yield delta
            else:
                for delta in turn.tokens:
                    yield delta
            return
        assert self.llm is not None
        turn.timeline.llm_request = self.clock.now()
        # aclosing: an interrupt or the end of speech closes the LLM's HTTP stream at once
        async with _closing(self.llm.stream(self.history.messages())) as deltas:
            async for delta in deltas:
                if turn.timeline.llm_first_token is None:
                    turn.timeline.llm_first_token = self.clock.now()
                yield delta

    async def _pump_text(self, turn: Turn, stream: SpeechStream) -> None:
        try:
            async with contextlib.aclosing(self._text_source(turn)) as deltas:
                async for delta in deltas:
                    if not delta:
                        continue
                    if turn.timeline.tts_first_text is None:
                        turn.timeline.tts_first_text = self.clock.now()
                    turn.parts.append(delta)
                    if turn.words is not None:
                        turn.words.push_text(delta)
                    self.hub.emit(TextDelta(delta, turn.id))
                    await stream.push_text(delta)  # waits while the stream's text budget is full
        except Exception as exc:  # LLM, user token source or engine: end the turn with what was spoken
            self._record_error(turn, exc, "text failed", kind=getattr(exc, "kind", None))
        self.hub.emit(TextDelta("", turn.id, final=True))
        if turn.words is not None:
            turn.words.end_text()
        try:
            await stream.end_input()
        except Exception as exc:
            self._fail(turn, exc, "ending the text failed")

    # ------------------------------------------------------------------ audio

    async def _pump_audio(self, turn: Turn, stream: SpeechStream) -> None:
        try:
            await self._play(turn, stream)
        except _StreamFailed as failed:
            # The engine broke, but the audio it made is good: let the listener hear it, then stop.
            self._record_error(turn, failed.error, "speech failed")
            self._cancel_pumps(turn)
            try:
                if self.output is not None:
                    await self._output_step(self.output.flush(), "flush")
            except Exception as exc:
                self._fail(turn, exc, "the audio output failed")
            else:
                self.interrupt(turn)
        except Exception as exc:  # the output failed: this turn ends, the session goes on
            self._fail(turn, exc, "the audio output failed")
        else:
            if turn.phase is TurnPhase.SPEAKING:  # the speech ended: so does the turn, and its text
                turn.phase = TurnPhase.FINISHING
                self._cancel_pumps(turn)

    async def _play(self, turn: Turn, stream: SpeechStream) -> None:
        tl = turn.timeline
        previous_frame, frame_span = -1, 1
        # Every output (speaker, WebRTC, MQTT, event subscribers, the echo reference) gets the turn's
        # audio through this one limiter; it holds back its 2 ms look-ahead until the speech ends.
        limiter: PeakLimiter | None = None
        try:
            try:
                async for chunk in self._watched(stream):
                    if chunk.turn_id != turn.id or turn.phase is not TurnPhase.SPEAKING:
                        self.stale_chunks_dropped += 1
                        continue
                    now = self.clock.now()
                    if tl.first_audio is None:
                        tl.first_audio = now
                    tl.last_audio = now
                    tl.audio_s += chunk.duration_s
                    if chunk.frame_index >= 0:
                        if previous_frame >= 0:
                            frame_span = max(1, chunk.frame_index - previous_frame)
                        previous_frame = chunk.frame_index
                        tl.frames = chunk.frame_index + frame_span
                    if limiter is None:
                        limiter = PeakLimiter(chunk.sample_rate)
                    await self._send(turn, replace(chunk, pcm=limiter.process(chunk.pcm)))
            except _StreamFailed:  # the audio made before the failure is played to its end
                await self._send_tail(turn, limiter)
                raise
            await self._send_tail(turn, limiter)
        finally:
            if limiter is not None:
                self.limiter_stats.add(limiter.stats)
                log_limited(log, limiter.stats, f"turn {turn.id}")
        if self.output is not None:
            await self._output_step(self.output.flush(), "flush")

    async def _send(self, turn: Turn, chunk: AudioChunk) -> None:
        """One limited chunk to the echo reference and the output (or, without one, the subscribers)."""
        if not len(chunk.pcm):
            return
        if self.far_end is not None:
            self.far_end(chunk)
        if self.output is not None:
            await self._output_step(self.output.write(chunk), "write")
        else:
            await self.hub.emit_audio(chunk)
        if turn.timeline.first_output is None:
            turn.timeline.first_output = self.clock.now()
        if turn.words is not None:
            settled = turn.words.push_audio(chunk.pcm)
            if settled:
                self.hub.emit(WordTimes(turn.id, tuple(settled)))

    async def _send_tail(self, turn: Turn, limiter: PeakLimiter | None) -> None:
        """The limiter's held look-ahead, once the turn's speech has ended (not after a cut)."""
        if limiter is None:
            return
        tail = limiter.flush()
        if turn.phase is TurnPhase.SPEAKING:
            last_frame = turn.timeline.frames - 1 if turn.timeline.frames > 0 else -1
            await self._send(turn, AudioChunk(tail, round(limiter.sample_rate), turn.id, last_frame))

    async def _watched(self, stream: SpeechStream) -> AsyncIterator[AudioChunk]:
        """The stream's chunks; raises _StreamFailed when the next one does not come in time.

        With :meth:`_output_step` this is the watchdog against a turn stuck "speaking" in silence.
        """
        limit = self.config.audio_stall_timeout_s
        iterator = stream.__aiter__()
        while True:
            try:
                async with asyncio.timeout(limit):
                    chunk = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                stalled = EngineError(
                    f"turn {stream.turn_id}: no audio for {limit} s; the engine or output is stuck "
                    "(raise SessionConfig.audio_stall_timeout_s if this is expected)"
                )
                raise _StreamFailed(stalled) from None
            except Exception as exc:
                raise _StreamFailed(exc) from exc
            yield chunk

    async def _output_step(self, step: Coroutine[Any, Any, None], what: str) -> None:
        """An output write/flush; a sink that stops taking audio ends the turn with TransportError."""
        limit = self.config.audio_stall_timeout_s
        try:
            async with asyncio.timeout(limit):
                await step
        except TimeoutError:
            raise TransportError(
                f"the audio output did not {what} for {limit} s; is its clock (device, peer) still running?"
            ) from None
