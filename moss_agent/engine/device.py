"""A dedicated thread that owns one device's models and runs their ticks.

Only this thread touches the models and their state. Other threads hand it work as commands (run
between ticks, in order); asyncio code awaits their results through ``asyncio.wrap_future``. When
there is nothing to compute the thread sleeps on a condition instead of polling.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from moss_agent.errors import EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")


class DeviceThread:
    """Runs ``tick()`` while ``has_work()`` is true, and commands between ticks.

    ``tick`` and ``has_work`` are called on this thread only. An exception in a command goes to its
    future; an exception in ``tick`` goes to ``on_tick_error`` and the thread keeps running, so one
    failing session never takes the device down.
    """

    def __init__(
        self,
        name: str,
        tick: Callable[[], None],
        has_work: Callable[[], bool],
        on_tick_error: Callable[[BaseException], None],
    ) -> None:
        self._tick = tick
        self._has_work = has_work
        self._on_tick_error = on_tick_error
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any] | None]] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` on the device thread before its next tick; the future gets the result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue(lambda: fn(*args), future)
        return future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like submit, for callers that do not wait: ``fn`` must handle its own errors."""
        self._enqueue(lambda: fn(*args), None)

    def wake(self) -> None:
        """Re-check ``has_work`` (e.g. a consumer caught up with a paused stream)."""
        with self._wakeup:
            self._wakeup.notify()

    def _enqueue(self, call: Callable[[], Any], future: concurrent.futures.Future[Any] | None) -> None:
        with self._wakeup:
            if self._stopping:
                raise EngineError("the engine is closed")
            self._commands.append((call, future))
            self._wakeup.notify()

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive() and not self.is_current():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._commands and not self._stopping and not self._has_work():
                    self._wakeup.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            for call, future in commands:
                self._run_command(call, future, cancelled=stopping)
            if stopping:
                return
            if self._has_work():
                try:
                    self._tick()
                except Exception as exc:
                    log.exception("engine tick failed")
                    self._on_tick_error(exc)

    @staticmethod
    def _run_command(
        call: Callable[[], Any], future: concurrent.futures.Future[Any] | None, *, cancelled: bool
    ) -> None:
        if future is not None and not future.set_running_or_notify_cancel():
            return
        if cancelled:
            if future is not None:
                future.set_exception(EngineError("the engine was closed before this request ran"))
            return
        try:
            result = call()
        except BaseException as exc:
            if future is None:
                log.exception("engine command failed")
            else:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)
