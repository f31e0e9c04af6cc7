"""Glue between transports and Session: one voice conversation per client, or on local audio.

``session_handler(...)`` returns the ``async def handler(conn)`` that ``WebRTCServer`` and
``MqttWorker`` call per client. Each call builds a :class:`Session` on ``conn.input`` /
``conn.output``, forwards the session's events to the client as JSON, maps the client's control
messages onto the session and closes the session (freeing its engine slot) when the client leaves.

``converse(...)`` runs one conversation on a local input/output pair (microphone and speaker,
or files) and prints what each side says; ``moss-agent chat`` is built on it.

Control messages: ``interrupt`` stops the agent; ``text`` answers a typed message
(``{"type": "text", "text": "..."}``); ``ping`` gets ``pong``; ``close`` ends the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from moss_agent.config import SessionConfig
from moss_agent.errors import MossError
from moss_agent.events import AudioChunk, ErrorEvent, FloatArray, Interrupted, Metrics, TextDelta, TurnEnded
from moss_agent.streaming.listen import EchoCanceller, Transcriber, VoiceActivityModel
from moss_agent.streaming.llm import LLM
from moss_agent.streaming.metrics import SessionSummary, format_breakdown
from moss_agent.streaming.session import EventStream, Session
from moss_agent.streaming.tts import SpeechBackend
from moss_agent.transports.base import AudioInput, AudioOutput
from moss_agent.transports.connection import Connection, ConnectionHandler, error_event

log = logging.getLogger(__name__)

LLMFactory = Callable[[], LLM]
VadFactory = Callable[[], VoiceActivityModel]

def session_handler(
    backend: SpeechBackend,
    *,
    llm_factory: LLMFactory,
    vad_factory: VadFactory,
    stt: Transcriber | None,
    config: SessionConfig | None = None,
    voice_prompt: FloatArray | None = None,
    greeting: str | None = None,
) -> ConnectionHandler:
    """A per-connection handler that runs one Session for each client of a transport.

    ``llm_factory`` and ``vad_factory`` are called once per connection (a VAD is recurrent and
    serves one stream); ``stt`` is shared (recognizers serialise or are stateless). ``greeting``,
    when given, is spoken as soon as the client connects.
    """
    session_config = config or SessionConfig()

    async def handler(conn: Connection) -> None:
        session = Session(
            backend,
            llm=llm_factory(),
            output=conn.output,
            input=conn.input,
            vad=vad_factory(),
            stt=stt,
            config=session_config,
            voice_prompt=voice_prompt,
            name=f"session-{conn.id}",
        )
        try:
            await session.start()
        except MossError as exc:  # no free engine slot, bad audio format: tell the client why
            log.warning("session could not start", extra={"connection": conn.id, "error": type(exc).__name__})
            # The transport delivers it before hanging up (WebRTC waits for the data channel to open).
            await conn.send_event(error_event(f"the agent could not start: {exc}", code="unavailable", fatal=True))
            return
        events = session.events()
        try:
            await conn.send_event({"type": "ready", "connection": conn.id, "sample_rate": backend.sample_rate})
            async with asyncio.TaskGroup() as tasks:
                forwarder = tasks.create_task(_forward(events, conn), name=f"{conn.id}-events")
                if greeting:
                    session.say(greeting)
                await _serve_control(session, conn)
                forwarder.cancel()
        finally:
            events.close()
            await session.aclose()
            log.info("session closed", extra={"connection": conn.id})

    return handler


async def _forward(events: EventStream, conn: Connection) -> None:
    """The session's events to the client as JSON; audio goes through ``conn.output`` instead."""
    async for event in events:
        if isinstance(event, AudioChunk):
            continue
        with contextlib.suppress(MossError):  # a client that just left cannot take events
            await conn.send_event(event)


async def _serve_control(session: Session, conn: Connection) -> None:
    """Apply the client's control messages until it closes or disconnects."""
    async for message in conn.control:
        kind = message["type"]
        try:
            if kind == "interrupt":
                await session.interrupt()
            elif kind == "text":
                text = message["text"].strip()
                if text:
                    session.respond(user_text=text)
            elif kind == "ping":
                await conn.send_event({"type": "pong"})
            elif kind == "close":
                return
            else:
                await conn.send_event(error_event(f"control message {kind!r} is not supported by this agent"))
        except MossError as exc:  # e.g. the turn queue is full: this message fails, the call goes on
            await conn.send_event(error_event(f"{kind} failed: {exc}"))


async def converse(
    backend: SpeechBackend,
    *,
    input: AudioInput,
    output: AudioOutput,
    llm: LLM | None,
    vad: VoiceActivityModel,
    stt: Transcriber | None,
    config: SessionConfig | None = None,
    echo_canceller: EchoCanceller | None = None,
    voice_prompt: FloatArray | None = None,
    greeting: str | None = None,
    verbose: bool = False,
    stop: asyncio.Future[Any] | None = None,
    max_turns: int | None = None,
    show: Callable[[str], None] | None = None,
) -> SessionSummary:
    """Run one voice conversation on ``input``/``output``, printing what each side says.

    Ends when ``stop`` completes or after ``max_turns`` agent turns (greeting included); returns
    the session's SessionSummary. With ``verbose`` every turn's latency breakdown is printed.
    """

    def default_show(line: str) -> None:
        print(line, flush=True)

    say = show or default_show
    session = Session(
        backend, llm=llm, output=output, input=input, vad=vad, stt=stt, echo_canceller=echo_canceller,
        config=config, voice_prompt=voice_prompt, name="chat",
    )  # fmt: skip
    async with session:
        events = session.events()
        if greeting:
            session.say(greeting)

        async def report() -> None:
            turns = 0
            async for event in events:
                if isinstance(event, TextDelta) and event.role == "user" and event.text:
                    say(f"you: {event.text}")
                elif isinstance(event, TurnEnded):
                    say(f"agent: {event.text}")
                elif isinstance(event, Interrupted):
                    say(f"agent (interrupted after {event.heard_s:.1f} s): {event.heard_text}")
                elif isinstance(event, ErrorEvent):
                    say(f"error: {event.message}")
                elif isinstance(event, Metrics):
                    if verbose:
                        say(format_breakdown(event))
                    turns += 1
                    if max_turns is not None and turns >= max_turns:
                        return

        reporter = asyncio.create_task(report(), name="chat-report")
        waits: set[asyncio.Future[Any]] = {reporter}
        if stop is not None:
            waits.add(stop)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if reporter in done:
                reporter.result()  # re-raises a failure of the report loop
        finally:
            reporter.cancel()
            if stop is not None:
                stop.cancel()
            events.close()
    return session.summary
