"""One voice conversation: user audio in, LLM text through the speech engine, agent audio out.

Ownership: a session runs one root task holding a TaskGroup; every other task (the turn worker,
the listener, each turn's text and audio pumps, speech recognition) is a named child of it.
Channels: queued turns ``reject`` beyond ``turn_queue_size``; text blocks its producer inside the
SpeechStream; audio is paced by ``AudioOutput.write``; event subscribers drop their oldest events
when they lag. Control (interrupt, close) is a direct call that cancels the pumps, so it never waits
behind queued audio.

The session owns the queue, the listener and the public API; each turn runs in
``moss_agent.streaming.turn_runner`` (its phases, pumps and heard-text settling), and events fan out
through ``moss_agent.streaming.fanout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Generator, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from moss_agent.audio import StreamResampler
from moss_agent.config import SessionConfig
from moss_agent.errors import ConfigError, MossError, SessionClosedError
from moss_agent.events import (
    AudioChunk,
    ErrorEvent,
    FloatArray,
    TextDelta,
    UserStartedSpeaking,
    UserStoppedSpeaking,
)
from moss_agent.limiter import LimiterStats
from moss_agent.streaming.channels import Channel
from moss_agent.streaming.clock import Clock, MonotonicClock
from moss_agent.streaming.fanout import EventHub, EventStream
from moss_agent.streaming.history import ChatMessage, History
from moss_agent.streaming.listen import EchoCanceller, Listener, Transcriber, Utterance, VoiceActivityModel
from moss_agent.streaming.llm import LLM
from moss_agent.streaming.metrics import SessionSummary
from moss_agent.streaming.tts import Conversation, PastTurn, SpeechBackend, UserTurn, check_history
from moss_agent.streaming.turn_runner import TokenSource, Turn, TurnPhase, TurnResult, TurnRunner
from moss_agent.streaming.turns import BargeIn, SpeechEnd, SpeechStart, TurnSignal
from moss_agent.transports.base import AudioInput, AudioOutput

__all__ = ["EventStream", "Session", "TokenSource", "TurnHandle", "TurnResult"]

log = logging.getLogger(__name__)


class TurnHandle:
    """A queued or running agent turn.

    ``await handle`` gives its :class:`TurnResult`; ``async for event in handle`` yields this turn's
    events (TurnStarted, TextDelta, AudioChunk, WordTimes as words are spoken, ErrorEvent, TurnEnded
    or Interrupted, the final WordTimes, and Metrics last) and ends when the turn ends. Events are kept from the moment the turn is queued, so
    iterating later still starts at the beginning (up to ``SessionConfig.event_queue_size`` events;
    older ones are dropped while nobody reads). Once iterated, the turn's audio is paced by the
    reader, as with :meth:`Session.events`; a handle nobody iterates never holds the session back.
    """

    def __init__(self, session: Session, turn: Turn) -> None:
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
        return self._turn.events.reading()


class Session:
    """A voice conversation bound to one engine slot.

    >>> async with Session(backend, llm=OpenAIChatLLM(llm_settings), output=speaker, input=mic,
    ...                    vad=SileroVad(), stt=recognizer, config=cfg) as session:
    ...     await session.say("Hello! How can I help?")
    ...     async for event in session.events(): ...

    Without ``input`` the session is driven by :meth:`say` and :meth:`respond`; without ``output``
    agent audio arrives as ``AudioChunk`` events, paced by the slowest subscriber.

    ``history``: earlier turns (``PastTurn``) to start from, e.g. a resumed call. The engine's
    conversation opens with them (``open_conversation(history=...)``, which says what it accepts:
    an assistant turn needs its audio) and the LLM's history gets their text, so both know the same
    conversation; the LLM's history then trims by its own budget (``SessionConfig.history``). A
    history ending with a user turn is answered by the next ``respond()``.
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
        history: Sequence[PastTurn] | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self.past_turns = check_history(history)
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
        self._history = History(self.config.system_prompt, self.config.history)
        self._hub = EventHub(self.config.event_queue_size, name)
        self._ids = itertools.count(1)
        self._conversation: Conversation | None = None
        self._runner: TurnRunner | None = None
        self._root: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._children: set[asyncio.Task[Any]] = set()
        self._queue: Channel[Turn] | None = None
        self._current: Turn | None = None
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
        past = {"history": self.past_turns} if self.past_turns else {}  # backends of old take no history
        self._conversation = await self.backend.open_conversation(
            system_prompt=self.config.speech_system_prompt, voice_prompt=self.voice_prompt, **past
        )
        for turn in self.past_turns:
            self._history.add(turn.role, turn.text)
        self._runner = TurnRunner(
            self._conversation,
            config=self.config,
            clock=self.clock,
            hub=self._hub,
            history=self._history,
            summary=self.summary,
            llm=self.llm,
            output=self.output,
            far_end=self._feed_echo_canceller if self.echo_canceller is not None else None,
            name=self.name,
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
            self._hub.emit(ErrorEvent(f"session {self.name!r} failed: {exc}", fatal=True))
            raise
        finally:
            self._tg = None
            self._ready.set()

    async def _listen(self, listener: Listener) -> None:
        try:
            await listener.run()
        except MossError as exc:  # a broken input ends listening; the agent can still speak
            log.warning("listening stopped", extra={"session": self.name, "error": type(exc).__name__})
            self._hub.emit(ErrorEvent(f"listening stopped: {exc}", detail={"kind": "input"}))

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
        self._drop_queued()
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
        self._hub.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stale_chunks_dropped(self) -> int:
        """Audio chunks that arrived after their turn was cut (never played)."""
        return 0 if self._runner is None else self._runner.stale_chunks_dropped

    @property
    def limiter_stats(self) -> LimiterStats:
        """What the output limiter changed so far (samples turned down to the -1 dBFS ceiling)."""
        return LimiterStats() if self._runner is None else self._runner.limiter_stats

    # ------------------------------------------------------------------ public API

    def say(self, text: str) -> TurnHandle:
        """Speak ``text`` as an agent turn (queued behind the current one); it joins the history."""
        if not text.strip():
            raise ConfigError("say() needs non-empty text")
        return self._enqueue(tokens=(text,))

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
        return self._enqueue(tokens=tokens, user=user)

    async def interrupt(self) -> TurnResult | None:
        """Stop the agent now and drop queued turns; returns the interrupted turn's result, if any."""
        self._drop_queued()
        current = self._current
        if current is None:
            return None
        return await self._interrupt_turn(current)

    def events(self) -> EventStream:
        """Subscribe to events from now on; iterate with ``async for``; ends when the session closes."""
        return self._hub.subscribe()

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

    # ------------------------------------------------------------------ turns

    def _enqueue(self, *, tokens: TokenSource | None, user: UserTurn | None = None) -> TurnHandle:
        if self._closed or self._queue is None or self._tg is None:
            raise SessionClosedError(f"session {self.name!r} is not running; use 'async with Session(...)'")
        turn_id = next(self._ids)
        turn = Turn(turn_id, self._hub.subscribe(turn_id), tokens=tokens, user=user)
        try:
            self._queue.put_nowait(turn)
        except MossError:
            self._hub.end_turn(turn.id)
            raise
        return TurnHandle(self, turn)

    def _drop_queued(self) -> None:
        if self._queue is None:
            return
        if self._closed:
            self._queue.close()
        assert self._runner is not None
        while len(self._queue):
            self._runner.finish_unstarted(self._queue.get_nowait())

    async def _turn_worker(self) -> None:
        assert self._queue is not None and self._runner is not None
        async for turn in self._queue:
            if turn.phase is not TurnPhase.QUEUED:
                continue
            self._current = turn
            try:
                await self._runner.run(turn, self._user_turn(turn))
            finally:
                self._current = None

    def _user_turn(self, turn: Turn) -> UserTurn | None:
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

    def _played_s(self, turn: Turn) -> float:
        return 0.0 if self._runner is None else self._runner.played_s(turn)

    async def _interrupt_turn(self, turn: Turn) -> TurnResult:
        assert self._runner is not None
        if turn.phase is TurnPhase.QUEUED:
            self._runner.finish_unstarted(turn)
        else:
            self._runner.interrupt(turn)
        return await asyncio.shield(turn.future)

    def _feed_echo_canceller(self, chunk: AudioChunk) -> None:
        if self.echo_canceller is not None and self._far_resampler is not None:
            self.echo_canceller.feed_far(self._far_resampler.process(chunk.pcm))

    # ------------------------------------------------------------------ listening

    def _agent_speaking(self) -> bool:
        return TurnRunner.speaking(self._current)

    def _on_signal(self, signal: TurnSignal, utterance: Utterance | None) -> None:
        if isinstance(signal, SpeechStart):
            self._hub.emit(UserStartedSpeaking(signal.at_s))
            turn = self._current
            if turn is not None and turn.timeline.first_audio is None and not signal.during_agent:
                # The user spoke before the agent made a sound: the reply being prepared is stale.
                self._spawn(self._interrupt_turn(turn), f"preempt{turn.id}")
        elif isinstance(signal, BargeIn):
            turn = self._current
            if turn is not None and turn.interruptible:
                log.info("barge-in", extra={"turn_id": turn.id, "at_s": signal.at_s})
                self._spawn(self._interrupt_turn(turn), f"barge-in{turn.id}")
        elif isinstance(signal, SpeechEnd):
            self._hub.emit(UserStoppedSpeaking(signal.at_s, signal.duration_s))
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
                self._hub.emit(ErrorEvent(f"speech recognition failed: {exc}", detail={"kind": "stt"}))
                return
        stt_end = self.clock.now()
        if text:
            self._hub.emit(TextDelta(text, -1, role="user", final=True))
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
            self._hub.emit(ErrorEvent(f"could not answer the user: {exc}", detail={"kind": type(exc).__name__}))
            return
        tl = handle._turn.timeline
        tl.user_end, tl.stt_start, tl.stt_end = user_end, stt_start, stt_end
