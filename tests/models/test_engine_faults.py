"""Faults injected into the realtime engine's real code paths end turns with errors, never hang.

The generator and the codec are wrapped: every call goes to the real object, except that chosen
methods raise RuntimeError from their Nth call (as a CUDA error would). Sessions run on a tiny
engine; every turn must end with an ErrorEvent within the stall timeout, and nothing may be left
running afterwards (no task, no device thread).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from moss_agent.commands.common import engine_failed, wait_for_stop_signal
from moss_agent.config import SessionConfig
from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.errors import EngineError
from moss_agent.events import ErrorEvent, Interrupted
from moss_agent.models.codec import load_codec
from moss_agent.models.realtime import SamplingConfig
from moss_agent.streaming.session import Session

STALL_S = 2.0
TEXT = "Hello there, this turn is long enough to be cut in the middle by a fault."


@dataclass
class Fault:
    """Raise from the ``at``-th call on, ``times`` times (None: every later call, a broken device)."""

    at: int
    times: int | None = 1
    calls: int = 0
    raised: int = 0
    armed: bool = True  # counts calls only once armed (e.g. after the sessions opened)

    def check(self, name: str) -> None:
        if not self.armed:
            return
        self.calls += 1
        if self.calls >= self.at and (self.times is None or self.raised < self.times):
            self.raised += 1
            raise RuntimeError(f"injected fault in {name} (call {self.calls})")


@dataclass
class Faulty:
    """Delegates everything to ``target``; the methods named in ``faults`` raise as their Fault says."""

    target: Any
    faults: dict[str, Fault] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.target, name)
        fault = self.faults.get(name)
        if fault is None:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            fault.check(name)
            return attr(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def codec(tiny_codec_dir: Path):
    return load_codec(tiny_codec_dir, device="cpu")


def faulty_engine(
    model_dir: Path, codec, *, generator: dict[str, Fault] | None = None, codec_faults: dict[str, Fault] | None = None,
    **overrides: Any,
) -> RealtimeEngine:
    settings: dict[str, Any] = {
        "num_slots": 8, "max_context": 512, "max_frames_per_turn": 40, "sampling": SamplingConfig(greedy=True),
        "call_timeout_s": 5.0,
    }
    settings.update(overrides)
    config = RealtimeEngineConfig(**settings)
    real = RealtimeEngine.load(model_dir, codec, device="cpu", config=config)  # never started: only its parts
    return RealtimeEngine(Faulty(real.generator, generator or {}), Faulty(codec, codec_faults or {}), config)


async def run_turns(
    engine: RealtimeEngine, sessions: int, arm: Fault | None = None
) -> tuple[list[list[Any]], list[Any], list[Session]]:
    """Start one turn per session; return each turn's events and results (each within the stall timeout).
    ``arm``: a fault that starts counting once every session is open, so it hits the turns."""
    config = SessionConfig(audio_stall_timeout_s=STALL_S)
    opened = [Session(engine, config=config, name=f"s{k}") for k in range(sessions)]
    for session in opened:
        await session.start()
    if arm is not None:
        arm.armed = True
    handles = [session.say(f"{TEXT} Session {k}.") for k, session in enumerate(opened)]

    async def collect(handle: Any) -> list[Any]:
        return [event async for event in handle]

    started = time.monotonic()
    events = await asyncio.wait_for(asyncio.gather(*(collect(h) for h in handles)), STALL_S + 3)
    results = [await asyncio.wait_for(h, 1) for h in handles]
    assert time.monotonic() - started < STALL_S + 3
    return events, results, opened


async def close_all(engine: RealtimeEngine, sessions: list[Session]) -> None:
    for session in sessions:
        await asyncio.wait_for(session.aclose(), 5)
    await asyncio.wait_for(engine.aclose(), 10)
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set(), "a task was left running"
    assert not engine._device.alive, "the device thread is still running"
    assert not [t for t in threading.enumerate() if t.name == "moss-realtime-engine"]


def errors_of(events: list[Any]) -> list[ErrorEvent]:
    return [e for e in events if isinstance(e, ErrorEvent)]


@pytest.mark.parametrize("sessions", [1, 8])
@pytest.mark.parametrize("where", ["tick", "codec step"])
async def test_a_failed_forward_ends_every_turn_and_keeps_what_was_heard(
    tiny_realtime_endless_dir, codec, sessions, where
):
    faults = {"step": Fault(at=6)} if where == "tick" else {}
    codec_faults = {"decode_step": Fault(at=6)} if where == "codec step" else {}
    engine = faulty_engine(tiny_realtime_endless_dir, codec, generator=faults, codec_faults=codec_faults)
    failures: list[EngineError] = []
    engine.on_failure(failures.append)
    async with engine:
        events, results, opened = await run_turns(engine, sessions)
        for turn_events, result in zip(events, results, strict=True):
            messages = [e.message for e in errors_of(turn_events)]
            assert len(messages) == 1, messages  # one error, no second "interrupt failed"
            assert "generation failed on the device" in messages[0] and "injected fault" in messages[0]
            assert result.error and result.interrupted
            interrupted = [e for e in turn_events if isinstance(e, Interrupted)]
            assert interrupted and interrupted[0].heard_s == pytest.approx(result.audio_s)
        # the turns keep the frames that were delivered (without an output, delivered is heard)
        assert any(r.heard_s > 0 for r in results)
        assert engine.healthy and not failures and engine.stats.failed_ticks == 1
        # the engine goes on: each session speaks again
        again = [s.say("And again.") for s in opened]
        for result in await asyncio.wait_for(asyncio.gather(*again), 10):
            assert result.error is None and result.audio_s > 0
        await close_all(engine, opened)


@pytest.mark.parametrize("sessions", [1, 8])
@pytest.mark.parametrize("where", ["rollback", "has-work check"])
async def test_a_fault_while_recovering_fails_the_engine_for_good(tiny_realtime_endless_dir, codec, sessions, where):
    if where == "rollback":  # a tick fails, then cutting the turn to what was heard fails too
        faults = {"step": Fault(at=6), "rollback": Fault(at=1, times=None)}
    else:  # the device breaks once the turns run: every later has-work check raises
        faults = {"has_work": Fault(at=12, times=None, armed=False)}
    engine = faulty_engine(tiny_realtime_endless_dir, codec, generator=faults)
    failures: list[EngineError] = []
    engine.on_failure(failures.append)
    async with engine:
        events, results, opened = await run_turns(engine, sessions, faults.get("has_work"))
        for turn_events, result in zip(events, results, strict=True):
            assert errors_of(turn_events), "a turn ended without an error"
            assert result.error
        assert not engine.healthy
        assert len(failures) == 1 and failures[0] is engine.failure
        assert "injected fault" in str(engine.failure) and "must be restarted" in str(engine.failure)
        # later requests fail at once with the same error; new conversations are refused
        began = time.monotonic()
        with pytest.raises(EngineError, match="must be restarted"):
            await engine.open_conversation()
        result = await asyncio.wait_for(opened[0].say("Anyone there?"), STALL_S + 1)
        assert result.error and "must be restarted" in result.error
        assert time.monotonic() - began < 1.0
        # a CLI server waiting for its stop signal returns, and its command exits 1 saying why
        await asyncio.wait_for(wait_for_stop_signal(engine), 1)
        assert engine_failed(engine, "serve") == 1
        await close_all(engine, opened)


async def test_a_stuck_device_call_times_out_with_what_it_was(tiny_realtime_dir, codec):
    release = threading.Event()

    class Stuck:
        calls = 0

        def check(self, name: str) -> None:  # the second turn's start never returns on its own
            self.calls += 1
            if self.calls == 2:
                release.wait(10)

    engine = faulty_engine(tiny_realtime_dir, codec, generator={"start_turn": Stuck()}, call_timeout_s=0.5)  # type: ignore[dict-item]
    async with engine:
        conversation = await engine.open_conversation()
        stream = await conversation.start_turn(None, 1)
        await stream.aclose()
        began = time.monotonic()
        with pytest.raises(EngineError, match=r"did not finish start turn within 0.5 s"):
            await conversation.start_turn(None, 2)
        assert time.monotonic() - began < 2
        release.set()
        await conversation.aclose()
    assert not engine._device.alive
