"""One voice conversation: user audio in, LLM text through the speech engine, agent audio out.

Ownership: a session runs one root task holding a TaskGroup; every other task (the turn worker,
the listener, each turn's text and audio pumps, speech recognition) is a named child of it.
Channels: queued turns ``reject`` beyond ``turn_queue_size``; text blocks its producer inside the
SpeechStream; audio is paced by ``AudioOutput.write``; event subscribers drop their oldest events
when they lag. Control (interrupt, close) is a direct call that cancels the pumps, so it never waits
behind queued audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import numpy as np

from moss_agent.audio import StreamResampler
from moss_agent.config import SessionConfig
from moss_agent.errors import ConfigError, EngineError, MossError, SessionClosedError, TransportError
from moss_agent.events import (
    AudioChunk,
    ErrorEvent,
    Event,
    FloatArray,
    Interrupted,
    Metrics,
    TextDelta,
    TurnEnded,
    TurnStarted,
    UserStartedSpeaking,
    UserStoppedSpeaking,
)
from moss_agent.streaming.channels import Channel, ChannelClosedError
from moss_agent.streaming.clock import Clock, MonotonicClock
from moss_agent.streaming.history import ChatMessage, History
from moss_agent.streaming.listen import EchoCanceller, Listener, Transcriber, Utterance, VoiceActivityModel
from moss_agent.streaming.llm import LLM
from moss_agent.streaming.metrics import SessionSummary, TurnTimeline
from moss_agent.streaming.tts import Conversation, HeardResult, SpeechBackend, SpeechStream, UserTurn
from moss_agent.streaming.turns import BargeIn, SpeechEnd, SpeechStart, TurnSignal
from moss_agent.transports.base import AudioInput, AudioOutput

log = logging.getLogger(__name__)


def _follows(turn_id: int | None, event: Event) -> bool:
    """Whether a subscriber that follows ``turn_id`` (None: the whole session) gets ``event``."""
    return turn_id is None or getattr(event, "turn_id", None) == turn_id


TokenSource = AsyncIterable[str] | Iterable[str]


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[str]) -> AsyncGenerator[AsyncIterator[str], None]:
    """Close an async iterator on exit when it can be closed (async generators, HTTP streams)."""
    try:
        yield iterator
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


@dataclass(frozen=True, slots=True)
class TurnResult:
    """How an agent turn ended. ``text`` was sent to the speech engine; ``heard_text`` reached the user."""

    turn_id: int
    text: str
    heard_text: str
    heard_s: float
    audio_s: float
    interrupted: bool
    error: str | None = None
    metrics: Metrics | None = None


class _StreamFailed(Exception):
    """The speech stream (not the output) raised while audio was being read from it."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(eq=False)
class _Turn:
    id: int
    kind: Literal["say", "respond"]
    text: str | None = None
    tokens: TokenSource | None = None
    user: UserTurn | None = None
    timeline: TurnTimeline = field(init=False)
    future: asyncio.Future[TurnResult] = field(init=False)
    state: Literal["queued", "running", "done"] = "queued"
    interrupt_requested: bool = False
    heard_at_interrupt: float = 0.0
    audio_started: bool = False
    playing: bool = False
    parts: list[str] = field(default_factory=list)
    error: str | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    last_frame_span: int = 1
    events: EventStream | None = None  # what ``async for event in handle`` reads

    def __post_init__(self) -> None:
        self.timeline = TurnTimeline(self.id)
        self.future = asyncio.get_running_loop().create_future()


class TurnHandle:
    """A queued or running agent turn.

    ``await handle`` gives its :class:`TurnResult`; ``async for event in handle`` yields this turn's
    events (TurnStarted, TextDelta, AudioChunk, ErrorEvent, TurnEnded or Interrupted, and Metrics
    last) and ends when the turn ends. Events are kept from the moment the turn is queued, so
    iterating later still starts at the beginning (up to ``SessionConfig.event_queue_size`` events;
    older ones are dropped while nobody reads). Once iterated, the turn's audio is paced by the
    reader, as with :meth:`Session.events`; a handle nobody iterates never holds the session back.
    """

    def __init__(self, session: Session, turn: _Turn) -> None:
        self._session = session
        self._turn = turn

    @property
    def id(self) -> int:
        return self._turn.id

    def done(self) -> bool:
        return self._turn.future.done()

    @property
    def heard_s(self) -> float:
        """Seconds of this turn the user has heard so far (from the output's playback position)."""
        return self._session._played_s(self._turn)

    async def interrupt(self) -> TurnResult:
        """Stop this turn now (or drop it if still queued); returns what the user heard."""
        return await self._session._interrupt_turn(self._turn)

    def __await__(self) -> Generator[Any, None, TurnResult]:
        return asyncio.shield(self._turn.future).__await__()

    def __aiter__(self) -> EventStream:
        stream = self._turn.events
        assert stream is not None, "every queued turn has its event stream"
        self._session._unread.discard(stream._channel)
        return stream


class EventStream:
    """Events of one subscriber, from the moment :meth:`Session.events` was called until close."""

    def __init__(self, session: Session, channel: Channel[Event]) -> None:
        self._session = session
        self._channel = channel

    @property
    def dropped(self) -> int:
        return self._channel.dropped

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._channel.get()
        except ChannelClosedError:
            raise StopAsyncIteration from None

    def drain(self) -> list[Event]:
        """The events queued right now, without waiting (for polling loops and tests)."""
        items: list[Event] = []
        while len(self._channel):
            items.append(self._channel.get_nowait())
        return items

    def close(self) -> None:
        self._session._subscribers.pop(self._channel, None)
        self._session._unread.discard(self._channel)
        self._channel.close()


class Session:
    """A voice conversation bound to one engine slot.

    >>> async with Session(backend, llm=OpenAIChatLLM(llm_settings), output=speaker, input=mic,
    ...                    vad=SileroVad(), stt=recognizer, config=cfg) as session:
    ...     await session.say("Hello! How can I help?")
    ...     async for event in session.events(): ...

    Without ``input`` the session is driven by :meth:`say` and :meth:`respond`; without ``output``
    agent audio arrives as ``AudioChunk`` events, paced by the slowest subscriber.
    """

    def __init__(
        self,
        backend: SpeechBackend,
        *,
        llm: LLM | None = None,
        output: AudioOutput | None = None,
        input: AudioInput | None = None,
        vad: VoiceActivityModel | None = None,
        stt: Transcriber | None = None,
        echo_canceller: EchoCanceller | None = None,
        config: SessionConfig | None = None,
        voice_prompt: FloatArray | None = None,
        clock: Clock | None = None,
        name: str = "session",
    ) -> None:
        self.config = config or SessionConfig()
        if input is not None and vad is None:
            raise ConfigError("a Session with an audio input needs a vad (e.g. moss_agent.speech.vad.SileroVad())")
        if self.config.turns.echo_mode == "aec" and input is not None and echo_canceller is None:
            raise ConfigError("echo_mode='aec' needs an echo_canceller; use 'half_duplex' without one")
        self.backend = backend
        self.llm = llm
        self.output = output
        self.input = input
        self.vad = vad
        self.stt = stt
        self.echo_canceller = echo_canceller
        self.voice_prompt = voice_prompt
        self.clock = clock or MonotonicClock()
        self.name = name
        self.summary = SessionSummary()
        self.stale_chunks_dropped = 0
        self._history = History(self.config.system_prompt, self.config.history)
        self._ids = itertools.count(1)
        # Each subscriber's channel and the turn it follows (None: every event of the session).
        self._subscribers: dict[Channel[Event], int | None] = {}
        self._unread: set[Channel[Event]] = set()  # turn streams nobody iterates yet: they never pace audio
        self._conversation: Conversation | None = None
        self._root: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._children: set[asyncio.Task[Any]] = set()
        self._queue: Channel[_Turn] | None = None
        self._current: _Turn | None = None
        self._pending_user: list[Utterance] = []
        self._listener: Listener | None = None
        self._far_resampler = (
            StreamResampler(backend.sample_rate, echo_canceller.sample_rate) if echo_canceller is not None else None
        )
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Claim an engine slot and start the session's tasks."""
        if self._root is not None or self._closed:
            raise SessionClosedError(f"session {self.name!r} was already started")
        if self.output is not None and self.output.sample_rate != self.backend.sample_rate:
            raise ConfigError(
                f"output runs at {self.output.sample_rate} Hz but the speech backend at "
                f"{self.backend.sample_rate} Hz; open the output at the backend's rate (transports resample)"
            )
        self._conversation = await self.backend.open_conversation(
            system_prompt=self.config.speech_system_prompt, voice_prompt=self.voice_prompt
        )
        self._queue = Channel(self.config.turn_queue_size, "reject", name=f"{self.name}-turns")
        if self.input is not None and self.vad is not None:
            try:
                self._listener = Listener(
                    self.input,
                    self.vad,
                    self.config,
                    agent_speaking=self._agent_speaking,
                    on_signal=self._on_signal,
                    echo_canceller=self.echo_canceller,
                )
            except BaseException:
                await self._conversation.aclose()
                self._conversation = None
                raise
        self._root = asyncio.create_task(self._run(), name=f"{self.name}-root")
        await self._ready.wait()

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._spawn(self._turn_worker(), "turns")
                if self._listener is not None:
                    self._spawn(self._listen(self._listener), "listen")
                self._ready.set()
                await self._stop.wait()
                for task in list(self._children):
                    task.cancel()
        except Exception as exc:
            log.exception("session failed", extra={"session": self.name})
            self._emit(ErrorEvent(f"session {self.name!r} failed: {exc}", fatal=True))
            raise
        finally:
            self._tg = None
            self._ready.set()

    async def _listen(self, listener: Listener) -> None:
        try:
            await listener.run()
        except MossError as exc:  # a broken input ends listening; the agent can still speak
            log.warning("listening stopped", extra={"session": self.name, "error": type(exc).__name__})
            self._emit(ErrorEvent(f"listening stopped: {exc}", detail={"kind": "input"}))

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        if self._tg is None:
            coro.close()
            raise SessionClosedError(f"session {self.name!r} is not running")
        task = self._tg.create_task(coro, name=f"{self.name}-{name}")
        self._children.add(task)
        task.add_done_callback(self._children.discard)
        return task

    async def aclose(self) -> None:
        """Stop speaking, drop queued turns, stop every task, free the engine slot. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None:
            self._queue.close()
            while len(self._queue):
                self._finish_unstarted(await self._queue.get())
        if self._current is not None:
            with contextlib.suppress(MossError):
                await self._interrupt_turn(self._current)
        self._stop.set()
        if self._root is not None:
            with contextlib.suppress(Exception):
                await self._root
        if self._conversation is not None:
            try:
                await self._conversation.aclose()
            finally:
                self._conversation = None
        for channel in list(self._subscribers):
            channel.close()
        self._subscribers.clear()
        self._unread.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ public API

    def say(self, text: str) -> TurnHandle:
        """Speak ``text`` as an agent turn (queued behind the current one); it joins the history."""
        if not text.strip():
            raise ConfigError("say() needs non-empty text")
        return self._enqueue(_Turn(next(self._ids), "say", text=text))

    def respond(
        self,
        tokens: TokenSource | None = None,
        *,
        user_text: str | None = None,
        user_audio: FloatArray | None = None,
        user_sample_rate: int = 24000,
    ) -> TurnHandle:
        """Start an agent turn from ``tokens`` (any iterable of text deltas), or from the LLM on the history.

        ``user_text``/``user_audio`` add a user turn first (a typed message, or an utterance the
        caller detected itself); otherwise the user utterances heard since the last turn are used.
        """
        if tokens is None and self.llm is None:
            raise ConfigError("respond() without tokens needs an llm: Session(backend, llm=OpenAIChatLLM(...))")
        user = None
        if user_text is not None or user_audio is not None:
            user = UserTurn(user_text or "", user_audio, user_sample_rate)
        return self._enqueue(_Turn(next(self._ids), "respond", tokens=tokens, user=user))

    async def interrupt(self) -> TurnResult | None:
        """Stop the agent now and drop queued turns; returns the interrupted turn's result, if any."""
        if self._queue is not None:
            while len(self._queue):
                self._finish_unstarted(await self._queue.get())
        current = self._current
        if current is None:
            return None
        return await self._interrupt_turn(current)

    def events(self) -> EventStream:
        """Subscribe to events from now on; iterate with ``async for``; ends when the session closes."""
        return self._subscribe(None, closed=self._closed)

    def _subscribe(self, turn_id: int | None, *, closed: bool) -> EventStream:
        name = f"{self.name}-events" if turn_id is None else f"{self.name}-turn{turn_id}-events"
        channel: Channel[Event] = Channel(self.config.event_queue_size, "drop_oldest", name=name)
        if closed or self._closed:
            channel.close()
        else:
            self._subscribers[channel] = turn_id
        return EventStream(self, channel)

    @property
    def history(self) -> list[ChatMessage]:
        """The messages the LLM gets next (system prompt first, trimmed to the history budget)."""
        return self._history.messages()

    def add_user_message(self, text: str) -> None:
        """Add typed user text to the history without starting a turn."""
        self._history.add("user", text)

    @property
    def conversation(self) -> Conversation | None:
        return self._conversation

    # ------------------------------------------------------------------ events

    def _emit(self, event: Event) -> None:
        for channel, turn_id in list(self._subscribers.items()):
            if not channel.closed and _follows(turn_id, event):
                channel.put_nowait(event)

    async def _emit_audio(self, chunk: AudioChunk) -> None:
        for channel, turn_id in list(self._subscribers.items()):
            if not _follows(turn_id, chunk):
                continue
            if channel not in self._unread:
                await channel.wait_for_room()
            if not channel.closed:
                channel.put_nowait(chunk)

    def _end_turn_streams(self, turn_id: int) -> None:
        """Close the event streams that follow one turn (after its last event, or when it is dropped)."""
        for channel, followed in list(self._subscribers.items()):
            if followed == turn_id:
                self._subscribers.pop(channel, None)
                self._unread.discard(channel)
                channel.close()

    # ------------------------------------------------------------------ turns

    def _enqueue(self, turn: _Turn) -> TurnHandle:
        if self._closed or self._queue is None or self._tg is None:
            turn.future.cancel()
            raise SessionClosedError(f"session {self.name!r} is not running; use 'async with Session(...)'")
        turn.events = self._subscribe(turn.id, closed=False)
        self._unread.add(turn.events._channel)
        try:
            self._queue.put_nowait(turn)
        except MossError:
            self._end_turn_streams(turn.id)
            raise
        return TurnHandle(self, turn)

    def _finish_unstarted(self, turn: _Turn) -> None:
        turn.state = "done"
        self._end_turn_streams(turn.id)
        if not turn.future.done():
            turn.future.set_result(TurnResult(turn.id, "", "", 0.0, 0.0, interrupted=True))

    async def _turn_worker(self) -> None:
        assert self._queue is not None
        async for turn in self._queue:
            if turn.state != "queued":
                continue
            self._current = turn
            try:
                await self._run_turn(turn)
            finally:
                self._current = None

    def _user_turn(self, turn: _Turn) -> UserTurn | None:
        """The explicit user turn, else what the listener heard since the last agent turn."""
        if turn.user is not None:
            if turn.user.text:
                self._history.add("user", turn.user.text)
            self._pending_user.clear()
            return turn.user
        if not self._pending_user:
            return None
        heard, self._pending_user = self._pending_user, []
        audio = np.concatenate([u.audio for u in heard]).astype(np.float32)
        return UserTurn(" ".join(u.text for u in heard if u.text), audio, heard[0].sample_rate)

    async def _run_turn(self, turn: _Turn) -> None:
        assert self._conversation is not None
        turn.state = "running"
        user = self._user_turn(turn)
        self._emit(TurnStarted(turn.id))
        stream: SpeechStream | None = None
        heard: HeardResult | None = None
        try:
            try:
                stream = await self._conversation.start_turn(user, turn.id)
            except Exception as exc:
                log.warning("could not start a speech turn", extra={"turn_id": turn.id}, exc_info=exc)
                turn.error = str(exc)
                self._emit(ErrorEvent(f"could not start the speech turn: {exc}", turn.id))
                return
            if not turn.interrupt_requested:
                async with asyncio.TaskGroup() as tg:
                    turn.pumps = [
                        tg.create_task(self._pump_text(turn, stream), name=f"{self.name}-turn{turn.id}-text"),
                        tg.create_task(self._pump_audio(turn, stream), name=f"{self.name}-turn{turn.id}-audio"),
                    ]
            if turn.interrupt_requested:
                try:
                    heard = await stream.interrupt(turn.heard_at_interrupt)
                except Exception as exc:  # the engine cannot say which words were heard
                    log.warning("interrupting the speech stream failed", extra={"turn_id": turn.id}, exc_info=exc)
                    self._emit(ErrorEvent(f"turn {turn.id}: interrupt failed: {exc}", turn.id))
                    heard = HeardResult(0, "", turn.heard_at_interrupt)
        except Exception as exc:
            log.warning("speech turn failed", extra={"turn_id": turn.id}, exc_info=exc)
            turn.error = str(exc)
            self._emit(ErrorEvent(f"speech turn failed: {exc}", turn.id))
        finally:
            turn.playing = False
            if stream is not None:
                try:
                    await stream.aclose()
                except Exception:
                    log.warning("closing a speech stream failed", extra={"turn_id": turn.id}, exc_info=True)
            self._finish_turn(turn, heard)

    def _finish_turn(self, turn: _Turn, heard: HeardResult | None) -> None:
        tl = turn.timeline
        tl.end = self.clock.now()
        text = "".join(turn.parts)
        if turn.interrupt_requested:
            heard_text = heard.text if heard is not None else ""
            heard_s = heard.audio_s if heard is not None else 0.0
            tl.interrupted = True
            self._emit(Interrupted(turn.id, heard_s, heard_text))
        else:
            heard_text = text
            heard_s = self._played_s(turn)
            self._emit(TurnEnded(turn.id, text, tl.audio_s))
        tl.heard_s = heard_s
        self._history.add("assistant", heard_text)
        metrics = tl.event()
        self.summary.add(metrics)
        if turn.error:
            self.summary.errors += 1
        self._emit(metrics)
        turn.state = "done"
        self._end_turn_streams(turn.id)
        if not turn.future.done():
            turn.future.set_result(
                TurnResult(turn.id, text, heard_text, heard_s, tl.audio_s, turn.interrupt_requested, turn.error, metrics)
            )

    async def _text_source(self, turn: _Turn) -> AsyncGenerator[str, None]:
        if turn.kind == "say":
            assert turn.text is not None
            yield turn.text
            return
        if turn.tokens is not None:
            if isinstance(turn.tokens, AsyncIterable):
                async for delta in turn.tokens:
                    yield delta
            else:
                for delta in turn.tokens:
                    yield delta
            return
        assert self.llm is not None
        turn.timeline.llm_request = self.clock.now()
        # aclosing: an interrupt closes the LLM's HTTP stream at once, so the server stops generating
        async with _closing(self.llm.stream(self._history.messages())) as deltas:
            async for delta in deltas:
                if turn.timeline.llm_first_token is None:
                    turn.timeline.llm_first_token = self.clock.now()
                yield delta

    async def _pump_text(self, turn: _Turn, stream: SpeechStream) -> None:
        try:
            async with contextlib.aclosing(self._text_source(turn)) as deltas:
                async for delta in deltas:
                    if not delta:
                        continue
                    if turn.timeline.tts_first_text is None:
                        turn.timeline.tts_first_text = self.clock.now()
                    turn.parts.append(delta)
                    self._emit(TextDelta(delta, turn.id))
                    await stream.push_text(delta)
        except Exception as exc:  # LLM, user token source or engine: end the turn with what was spoken
            turn.error = str(exc)
            kind = getattr(exc, "kind", type(exc).__name__)
            log.warning("turn text source failed", extra={"turn_id": turn.id, "kind": kind})
            self._emit(ErrorEvent(f"turn {turn.id} text failed: {exc}", turn.id, detail={"kind": kind}))
        self._emit(TextDelta("", turn.id, final=True))
        try:
            await stream.end_input()
        except Exception as exc:
            self._fail_turn(turn, exc)

    def _fail_turn(self, turn: _Turn, exc: Exception) -> None:
        """The engine or the output failed mid-turn: keep what was heard, stop the rest."""
        turn.error = turn.error or str(exc)
        if isinstance(exc, MossError):
            log.warning("turn failed", extra={"turn_id": turn.id, "error": type(exc).__name__})
        else:  # not one of ours: a bug somewhere below, keep the traceback
            log.error("turn failed", extra={"turn_id": turn.id}, exc_info=exc)
        self._emit(ErrorEvent(f"turn {turn.id} failed: {exc}", turn.id, detail={"kind": type(exc).__name__}))
        self._request_interrupt(turn)

    async def _pump_audio(self, turn: _Turn, stream: SpeechStream) -> None:
        try:
            await self._play(turn, stream)
        except _StreamFailed as failed:
            # The engine broke, but the audio it made is good: let the listener hear it, then stop.
            turn.error = turn.error or str(failed.error)
            log.warning("speech stream failed", extra={"turn_id": turn.id}, exc_info=failed.error)
            kind = type(failed.error).__name__
            self._emit(ErrorEvent(f"turn {turn.id} failed: {failed.error}", turn.id, detail={"kind": kind}))
            for pump in turn.pumps:
                if pump is not asyncio.current_task():
                    pump.cancel()
            try:
                if self.output is not None:
                    await self._output_step(self.output.flush(), "flush")
            except Exception as exc:
                self._fail_turn(turn, exc)
            else:
                self._request_interrupt(turn)
        except Exception as exc:  # the output failed: this turn ends, the session goes on
            self._fail_turn(turn, exc)

    async def _play(self, turn: _Turn, stream: SpeechStream) -> None:
        tl = turn.timeline
        previous_frame = -1
        async for chunk in self._watched(stream):
            if chunk.turn_id != turn.id or turn.interrupt_requested:
                self.stale_chunks_dropped += 1
                continue
            now = self.clock.now()
            if tl.first_audio is None:
                tl.first_audio = now
            tl.last_audio = now
            tl.audio_s += chunk.duration_s
            if chunk.frame_index >= 0:
                if previous_frame >= 0:
                    turn.last_frame_span = max(1, chunk.frame_index - previous_frame)
                previous_frame = chunk.frame_index
                tl.frames = chunk.frame_index + turn.last_frame_span
            if self.echo_canceller is not None and self._far_resampler is not None:
                self.echo_canceller.feed_far(self._far_resampler.process(chunk.pcm))
            turn.audio_started = turn.playing = True
            if self.output is not None:
                await self._output_step(self.output.write(chunk), "write")
            else:
                await self._emit_audio(chunk)
            if tl.first_output is None:
                tl.first_output = self.clock.now()
        if self.output is not None:
            await self._output_step(self.output.flush(), "flush")
        turn.playing = False

    async def _watched(self, stream: SpeechStream) -> AsyncIterator[AudioChunk]:
        """The stream's chunks; raises EngineError when the next one does not come in time.

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

    def _played_s(self, turn: _Turn) -> float:
        if self.output is not None:
            return self.output.played_s(turn.id)
        return turn.timeline.audio_s

    async def _interrupt_turn(self, turn: _Turn) -> TurnResult:
        if turn.state == "queued":
            self._finish_unstarted(turn)
        else:
            self._request_interrupt(turn)
        return await asyncio.shield(turn.future)

    def _request_interrupt(self, turn: _Turn) -> None:
        if turn.state != "running" or turn.interrupt_requested:
            return
        # Read the playback position before clearing, so it is exactly what left the speaker.
        turn.heard_at_interrupt = self._played_s(turn)
        turn.interrupt_requested = True
        turn.playing = False
        if self.output is not None:
            self.output.clear()
        current = asyncio.current_task()
        for pump in turn.pumps:
            if pump is not current:
                pump.cancel()

    # ------------------------------------------------------------------ listening

    def _agent_speaking(self) -> bool:
        turn = self._current
        return turn is not None and turn.playing

    def _on_signal(self, signal: TurnSignal, utterance: Utterance | None) -> None:
        if isinstance(signal, SpeechStart):
            self._emit(UserStartedSpeaking(signal.at_s))
            turn = self._current
            if turn is not None and not turn.audio_started and not signal.during_agent:
                # The user spoke before the agent made a sound: the reply being prepared is stale.
                self._spawn(self._interrupt_turn(turn), f"preempt{turn.id}")
        elif isinstance(signal, BargeIn):
            turn = self._current
            if turn is not None and not turn.interrupt_requested:
                log.info("barge-in", extra={"turn_id": turn.id, "at_s": signal.at_s})
                self._spawn(self._interrupt_turn(turn), f"barge-in{turn.id}")
        elif isinstance(signal, SpeechEnd):
            self._emit(UserStoppedSpeaking(signal.at_s, signal.duration_s))
            if utterance is not None and not signal.backchannel:
                self._spawn(self._finish_utterance(utterance, self.clock.now()), "stt")

    async def _finish_utterance(self, utterance: Utterance, user_end: float) -> None:
        text = ""
        stt_start = self.clock.now()
        if self.stt is not None:
            try:
                text = (await self.stt.transcribe(utterance.audio, utterance.sample_rate)).strip()
            except Exception as exc:  # any recognizer's failure loses this utterance, not the session
                log.warning("speech recognition failed", extra={"session": self.name, "error": type(exc).__name__})
                self._emit(ErrorEvent(f"speech recognition failed: {exc}", detail={"kind": "stt"}))
                return
        stt_end = self.clock.now()
        if text:
            self._emit(TextDelta(text, -1, role="user", final=True))
        if self._closed:
            return
        if not self.config.auto_respond or self.llm is None:
            self._history.add("user", text)
            self._pending_user.append(dataclasses.replace(utterance, text=text))
            return
        if self.stt is not None and not text:
            return  # noise the recognizer found no words in
        try:
            handle = self.respond(user_text=text, user_audio=utterance.audio, user_sample_rate=utterance.sample_rate)
        except MossError as exc:  # turn queue full or closing: this utterance gets no answer
            self._emit(ErrorEvent(f"could not answer the user: {exc}", detail={"kind": type(exc).__name__}))
            return
        tl = handle._turn.timeline
        tl.user_end, tl.stt_start, tl.stt_end = user_end, stt_start, stt_end
