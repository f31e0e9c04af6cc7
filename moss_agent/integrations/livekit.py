"""A LiveKit Agents (1.x) TTS plugin on MOSS-TTS-Realtime: ``MossTTS``.

::

    from livekit.agents import AgentSession
    from moss_agent.integrations.livekit import MossTTS

    session = AgentSession(stt=..., llm=..., tts=MossTTS(url="ws://gpu-box:8000", token="..."))

**Where speech is made.** LiveKit runs every job (call) in its own process, so by default the plugin
speaks to a ``moss-agent speech-server`` through ``moss_agent.client.RemoteSpeechBackend``: one GPU
engine serves the jobs of every worker. Any ``SpeechBackend`` can be passed instead (``backend=``):
an in-process ``moss_agent.engine.RealtimeEngine`` or ``moss_agent.testing.FakeSpeechBackend``; a
backend passed in belongs to the caller and is not closed by ``aclose()``.

**One conversation per TTS instance.** MOSS-TTS-Realtime keeps the conversation's earlier turns in
its context (one engine slot), so a ``MossTTS`` holds one conversation, opened by ``prewarm()`` or
the first turn, kept across turns and freed by ``aclose()``. Build one ``MossTTS`` per
``AgentSession`` (LiveKit's entrypoint does, once per job); two sessions sharing an instance would
share one voice context. Every ``stream()`` and ``synthesize()`` is one agent turn of it; turns run
one at a time (a second waits until the first is settled), as the engine allows one open turn per
conversation. ``add_user_turn`` hands the model what the user said before the next agent turn.

**Streaming.** Text deltas go to the engine as they arrive (no sentence buffering: the engine starts
speaking after about a dozen tokens); PCM goes out through LiveKit's output emitter, with word
timings (``moss_agent.streaming.word_timing.WordTimer``, estimated from the text and the audio) as
``TimedString``s: seconds from the first sample of the turn's audio, each carrying the text before
it (spaces included), so joined they give the text as written.

**Interruptions.** LiveKit cancels the stream when the user barges in; the plugin then settles the
engine turn at what was heard: LiveKit plays audio in real time from the first pushed frame, so the
estimate is ``min(audio pushed, wall time since the first audio was pushed)``. The engine usually
runs faster than real time, so a turn's audio is all made long before it is played; with
``hold_until_played`` (the default) a stream stays open until its audio has been played by that
estimate, so an interruption during playback still reaches it and rolls the context back. The cost:
where LiveKit splits one reply into several TTS segments (an LLM ``FlushSentinel``), it starts the
next segment only once the previous one has been played.

**Errors** arrive as LiveKit's API errors, so its retries and ``FallbackAdapter`` work: a server that
cannot be reached or was lost -> ``APIConnectionError``; a full one (``OverloadError``) ->
``APIStatusError`` 503; a wrong voice or setting -> 400; a start that exceeds ``conn_options.timeout``
-> ``APITimeoutError``. A turn that failed drops its conversation when the conversation cannot be
settled, and the framework's retry opens a new one (its context is then lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from moss_agent.audio import float_to_pcm16
from moss_agent.errors import (
    AudioError,
    ConfigError,
    EngineError,
    MissingExtraError,
    MossError,
    OverloadError,
    SessionClosedError,
    TransportError,
)
from moss_agent.events import FloatArray
from moss_agent.streaming.tts import Conversation, SpeechBackend, SpeechStream, UserTurn
from moss_agent.streaming.word_timing import WordTimer, WordTiming, split_words

try:
    from livekit.agents import (
        DEFAULT_API_CONNECT_OPTIONS,
        APIConnectionError,
        APIConnectOptions,
        APIError,
        APIStatusError,
        APITimeoutError,
        tts,
        utils,
    )
    from livekit.agents.types import TimedString
except ImportError as exc:  # the extra is optional: say which one to install
    raise MissingExtraError("livekit.agents", "livekit") from exc

__all__ = ["DEFAULT_URL", "MossChunkedStream", "MossSynthesizeStream", "MossTTS", "api_error"]

log = logging.getLogger(__name__)

DEFAULT_URL = "ws://127.0.0.1:8000"  # `moss-agent speech-server`'s default address


def api_error(exc: BaseException) -> APIError | None:
    """The LiveKit API error for one of ours (None for anything else: bugs stay bugs).

    ``retryable`` follows what another try can change: a full or lost server may have room or be
    back; a bad setting, a refused token or a closed TTS will not change.
    """
    if isinstance(exc, APIError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, OverloadError):
        return APIStatusError(
            message,
            status_code=503,
            retryable=True,
            body={"retry_after_s": getattr(exc, "retry_after_s", None)},
        )
    if isinstance(exc, ConfigError | AudioError):
        return APIStatusError(message, status_code=400, retryable=False)
    if isinstance(exc, TransportError | SessionClosedError):
        return APIConnectionError(message, retryable=False)
    if isinstance(exc, TimeoutError):
        return APITimeoutError(message)
    if isinstance(exc, EngineError | MossError):
        return APIConnectionError(message, retryable=True)
    return None


def _raise_mapped(exc: BaseException) -> NoReturn:
    mapped = api_error(exc)
    if mapped is not None and mapped is not exc:
        raise mapped from exc
    raise exc


class MossTTS(tts.TTS[None]):
    """LiveKit TTS on MOSS-TTS-Realtime; see the module docstring for conversations and errors.

    ``url`` / ``token`` / ``voice`` / ``encoding``: the speech server (``voice``: a voice registered
    there), used when no ``backend`` is given. ``backend``: any ``SpeechBackend`` instead (not closed
    by ``aclose``). ``system_prompt`` / ``voice_prompt`` (float32 mono at the backend's rate): the
    conversation's, sent when it opens. ``sample_rate``: of the audio pushed to LiveKit (default the
    backend's, 24 kHz for MOSS). ``hold_until_played``: keep each stream open until its audio was
    played (by the real-time estimate), so late interruptions roll the engine back.
    """

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        token: str | None = None,
        voice: str | None = None,
        encoding: str = "pcm_s16le",
        backend: SpeechBackend | None = None,
        system_prompt: str | None = None,
        voice_prompt: FloatArray | None = None,
        sample_rate: int | None = None,
        hold_until_played: bool = True,
    ) -> None:
        self._owns_backend = backend is None
        if backend is None:
            from moss_agent.client import RemoteSpeechBackend  # needs aiohttp, which livekit brings

            backend = RemoteSpeechBackend(url, token=token, voice=voice, encoding=encoding)
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=sample_rate or backend.sample_rate,
            num_channels=1,
        )
        self.backend = backend
        self.system_prompt = system_prompt
        self.voice_prompt = voice_prompt
        self.hold_until_played = hold_until_played
        self._conversation: Conversation | None = None
        self._turns = asyncio.Lock()  # one open turn per conversation: held from start to settle
        self._next_turn_id = 1
        self._user: UserTurn | None = None
        self._prewarming: asyncio.Task[None] | None = None
        self._streams: weakref.WeakSet[MossSynthesizeStream | MossChunkedStream] = weakref.WeakSet()
        self._closed = False

    @property
    def model(self) -> str:
        return "MOSS-TTS-Realtime"

    @property
    def provider(self) -> str:
        return "moss-agent"

    @property
    def conversation(self) -> Conversation | None:
        """The open conversation (None before the first turn or prewarm, and after a lost one)."""
        return self._conversation

    def add_user_turn(self, text: str, audio: FloatArray | None = None, sample_rate: int = 24000) -> None:
        """What the user said (transcript, optionally their audio): the next agent turn follows it in
        the model's context. A later call before that turn replaces it."""
        self._user = UserTurn(text, audio, sample_rate)

    # -- TTS -------------------------------------------------------------------------------------

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> MossSynthesizeStream:
        stream = MossSynthesizeStream(tts=self, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> MossChunkedStream:
        stream = MossChunkedStream(tts=self, input_text=text, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def prewarm(self) -> None:
        """Connect and open the conversation now (in the background), so the first turn starts at
        once; a failure is logged and raised again by the first turn."""
        if self._prewarming is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to connect on: the first turn connects
        self._prewarming = loop.create_task(self._prewarm(), name="moss-livekit-prewarm")

    async def _prewarm(self) -> None:
        try:
            async with self._turns:
                await self._open(timeout_s=None)
        except MossError as exc:
            log.warning("speech prewarm failed", extra={"error": str(exc)})

    async def aclose(self) -> None:
        """Close every stream, free the conversation, and close the backend this TTS made."""
        if self._closed:
            return
        self._closed = True
        if self._prewarming is not None:
            await utils.aio.cancel_and_wait(self._prewarming)
        for stream in list(self._streams):
            await stream.aclose()
        async with self._turns:
            await self._drop_conversation()
        if self._owns_backend:
            closer: Callable[[], Any] | None = getattr(self.backend, "aclose", None)
            if closer is not None:
                await closer()

    # -- turns -----------------------------------------------------------------------------------

    async def _open(self, timeout_s: float | None) -> Conversation:
        """The conversation, opened when there is none. Call with ``_turns`` held."""
        if self._closed:
            raise SessionClosedError("this MossTTS was closed")
        if self._conversation is None:
            async with asyncio.timeout(timeout_s):
                self._conversation = await self.backend.open_conversation(
                    system_prompt=self.system_prompt, voice_prompt=self.voice_prompt
                )
        return self._conversation

    async def _start_turn(self, timeout_s: float) -> SpeechStream:
        """Open (if needed) and start one agent turn; ``_turns`` must be held until it is settled."""
        conversation = await self._open(timeout_s)
        if conversation.sample_rate != self.sample_rate:
            raise APIError(
                f"the speech engine makes {conversation.sample_rate} Hz audio but this MossTTS was built "
                f"for {self.sample_rate} Hz; pass sample_rate={conversation.sample_rate}",
                retryable=False,
            )
        turn_id, self._next_turn_id = self._next_turn_id, self._next_turn_id + 1
        user, self._user = self._user, None
        try:
            async with asyncio.timeout(timeout_s):
                return await conversation.start_turn(user, turn_id)
        except (MossError, TimeoutError):
            # a conversation that cannot start a turn (lost connection, a failed slot) is of no more
            # use; the framework's retry opens a fresh one, and the user's words go with that try
            self._user = self._user or user
            await self._drop_conversation()
            raise

    async def _drop_conversation(self) -> None:
        conversation, self._conversation = self._conversation, None
        if conversation is not None:
            with contextlib.suppress(MossError):
                await conversation.aclose()


class _Turn:
    """One engine turn feeding one output emitter: text in, PCM and word timings out, and the
    played-position estimate that settles it."""

    def __init__(self, speech: SpeechStream, emitter: tts.AudioEmitter, sample_rate: int) -> None:
        self.speech = speech
        self.emitter = emitter
        self.timer = WordTimer(sample_rate)
        self.pushed_s = 0.0
        self.first_pushed_at: float | None = None  # time.monotonic() of the first audio pushed
        self._words_sent = 0
        self._text_end = 0  # where the last word sent to LiveKit ends in the text

    def heard_s(self) -> float:
        """LiveKit plays in real time from the first frame: what can have been heard by now."""
        if self.first_pushed_at is None:
            return 0.0
        return min(self.pushed_s, time.monotonic() - self.first_pushed_at)

    def unplayed_s(self) -> float:
        return self.pushed_s - self.heard_s()

    async def run(self, texts: AsyncIterator[str], on_first_text: Callable[[], None] | None = None) -> None:
        """Feed ``texts`` and push the audio until the turn's speech ended."""
        try:
            async with asyncio.TaskGroup() as group:
                feeder = group.create_task(self._feed(texts, on_first_text), name="moss-livekit-text")

                async def play() -> None:
                    await self._play()
                    # the speech ended (all text spoken, or the frame cap): text still to come is
                    # never spoken, so stop waiting for it
                    feeder.cancel()

                group.create_task(play(), name="moss-livekit-audio")
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None

    async def _feed(self, texts: AsyncIterator[str], on_first_text: Callable[[], None] | None) -> None:
        async for delta in texts:
            if on_first_text is not None:
                on_first_text()
                on_first_text = None
            self.timer.push_text(delta)  # before the engine may block on it: audio can come meanwhile
            await self.speech.push_text(delta)
        self.timer.end_text()
        await self.speech.end_input()

    async def _play(self) -> None:
        async for chunk in self.speech:
            self._send_words(self.timer.push_audio(chunk.pcm))
            self.emitter.push(float_to_pcm16(chunk.pcm).tobytes())
            if self.first_pushed_at is None:
                self.first_pushed_at = time.monotonic()
            self.pushed_s += chunk.duration_s
        self._send_words(self.timer.finish())

    def _send_words(self, words: list[WordTiming]) -> None:
        """Push words as TimedStrings: each carries the text since the previous word (its spaces), as
        LiveKit's transcript joins them as they are. The timer reports the words of its own text in
        order, so the n-th word reported is the n-th span of that text."""
        if not words:
            return
        spans = split_words(self.timer.text)
        for word in words:
            end = spans[self._words_sent][1]
            self._words_sent += 1
            text, self._text_end = self.timer.text[self._text_end : end], end
            self.emitter.push_timed_transcript(
                TimedString(text, start_time=word.start_s, end_time=word.end_s)
            )

    async def settle(self, heard_s: float | None) -> bool:
        """Settle the engine turn at ``heard_s`` (None: everything made). False when it could not be
        settled (the connection is gone): the conversation must be dropped."""
        try:
            if heard_s is None:
                await self.speech.aclose()
            else:
                await self.speech.interrupt(heard_s)
        except MossError as exc:
            log.warning(
                "could not settle a speech turn", extra={"turn": self.speech.turn_id, "error": str(exc)}
            )
            return False
        return True


async def _speak(
    owner: MossTTS,
    emitter: tts.AudioEmitter,
    texts: AsyncIterator[str],
    *,
    timeout_s: float,
    hold: bool,
    on_started: Callable[[], None] | None = None,
    on_first_text: Callable[[], None] | None = None,
    on_spoken: Callable[[], None] | None = None,
) -> None:
    """One agent turn from ``texts`` into ``emitter``, settled on every way out (see the module
    docstring); our errors leave as LiveKit's API errors."""
    async with owner._turns:
        # The engine turn starts before the first text arrives, so its start (the tick in progress,
        # the prompt's prefill) overlaps the LLM's time to first token instead of adding to it.
        try:
            speech = await owner._start_turn(timeout_s)
        except (MossError, TimeoutError) as exc:
            _raise_mapped(exc)
        turn = _Turn(speech, emitter, owner.sample_rate)
        try:
            first = await anext(texts, None)
            if first is None:  # no text came: nothing was said, the turn leaves nothing behind
                if not await turn.settle(0.0):
                    await owner._drop_conversation()
                return
            if on_started is not None:
                on_started()
            await turn.run(_prepend(first, texts), on_first_text)
            if on_spoken is not None:
                on_spoken()  # LiveKit gets the segment's end now, the hold below is ours
            if hold and turn.unplayed_s() > 0:
                await asyncio.sleep(turn.unplayed_s())
        except asyncio.CancelledError:
            # interrupted (the stream was closed): keep in the context only what was heard
            if not await turn.settle(turn.heard_s()):
                await owner._drop_conversation()
            raise
        except BaseException as exc:
            # a failure stops nothing downstream: LiveKit still plays the audio it has
            if not await turn.settle(turn.pushed_s):
                await owner._drop_conversation()
            _raise_mapped(exc)
        # played to its end (by the estimate): settled as heard in full
        if not await turn.settle(None):
            await owner._drop_conversation()


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for delta in rest:
        yield delta


class MossSynthesizeStream(tts.SynthesizeStream):
    """One agent turn from streamed text (what ``AgentSession`` uses): deltas go to the engine as
    they arrive; the first flush (or ``end_input``) after some text ends the turn's text."""

    def __init__(self, *, tts: MossTTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._moss = tts

    async def _segment_text(self) -> AsyncIterator[str]:
        """Text up to the first flush that follows some text; LiveKit drops text after that flush."""
        got_text = False
        async for item in self._input_ch:  # read at each attempt: a retry replays a fresh channel
            if isinstance(item, str):
                if item:
                    got_text = True
                    yield item
            elif got_text:  # a flush
                return

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        request_id = utils.shortuuid()
        output_emitter.initialize(
            request_id=request_id,
            sample_rate=self._moss.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
            stream=True,
        )
        await _speak(
            self._moss, output_emitter, self._segment_text(),
            timeout_s=self._conn_options.timeout, hold=self._moss.hold_until_played,
            on_started=lambda: output_emitter.start_segment(segment_id=request_id),
            on_first_text=self._mark_started, on_spoken=output_emitter.end_segment,
        )  # fmt: skip


class MossChunkedStream(tts.ChunkedStream):
    """One agent turn from a whole text (``synthesize``); not held for playback, as nothing says
    it is played live."""

    def __init__(self, *, tts: MossTTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._moss = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=self._moss.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
        )
        if not self._input_text.strip():
            return

        async def whole() -> AsyncIterator[str]:
            yield self._input_text

        await _speak(self._moss, output_emitter, whole(), timeout_s=self._conn_options.timeout, hold=False)
