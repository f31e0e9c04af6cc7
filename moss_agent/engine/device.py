"""A dedicated thread that owns one device's models: realtime ticks, commands and batch jobs.

Only this thread touches the models on its device and their state (the realtime generator, the
shared codec, batch TTS models). Other threads hand it work:

- commands (``submit``/``post``): run between ticks, in order;
- workers (``attach``): a realtime engine whose ``tick`` runs whenever its ``has_work`` says so;
- batch jobs (``submit_batch``): long, lower-priority work. A job runs only when no realtime tick
  is due and calls ``checkpoint()`` between its steps; the checkpoint runs the commands and ticks
  that came due meanwhile (at most ``ticks_per_batch_step`` ticks, so a saturated realtime load
  still lets the job advance), then lets the job take its next step.

When there is nothing to compute the thread sleeps on a condition instead of polling.

Failure: an exception in a worker's tick goes to its ``tick_failed``, which may recover (the
device still works) or raise. Anything that escapes the loop (a raising ``has_work`` or
``tick_failed``, or ``fail()`` called by a command that found the device's state broken) marks the
thread failed: every queued and later command and batch job fails at once with an ``EngineError``
that says what happened, and each worker's ``device_failed`` is called once, so it can end its
streams and tell its host. A failed thread never runs again; the process restarts the engine.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from moss_agent.errors import EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")

Checkpoint = Callable[[], None]


@dataclass(eq=False)
class DeviceWorker:
    """Realtime work on a device thread; every callable runs on that thread.

    ``tick_failed(exc)`` recovers from a failed tick, or raises to mark the device failed.
    ``device_failed(error)`` is told, once, that the device thread failed for good.
    """

    name: str
    tick: Callable[[], None]
    has_work: Callable[[], bool]
    tick_failed: Callable[[Exception], None]
    device_failed: Callable[[EngineError], None]


class _BatchJob:
    def __init__(self, run: Callable[[Checkpoint], Any]) -> None:
        self.run = run
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class DeviceThread:
    """Runs workers' ticks, commands between them, and batch jobs when no tick is due.

    ``ticks_per_batch_step``: while a batch job runs, at most this many realtime ticks and commands
    run before the job takes its next step (realtime first, but a batch job is never starved).
    ``realtime_grace_s``: after serving realtime work between two batch steps, how long to wait
    for more before the next step: a turn's start is followed by its text, a tick by the next
    once its chunk is read; without the wait each of them queued behind a whole batch step
    (first audio +73% beside a batch job at 3 ms, +12% at 20 ms on a loaded 2-core CPU).
    """

    def __init__(self, name: str, *, ticks_per_batch_step: int = 8, realtime_grace_s: float = 0.02) -> None:
        if ticks_per_batch_step < 1:
            raise ValueError(f"ticks_per_batch_step must be >= 1, got {ticks_per_batch_step}")
        self.name = name
        self.ticks_per_batch_step = ticks_per_batch_step
        self.realtime_grace_s = realtime_grace_s
        self._workers: tuple[DeviceWorker, ...] = ()  # replaced, never mutated: read without the lock
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any] | None]] = deque()
        self._batch_jobs: deque[_BatchJob] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._failure: EngineError | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- state -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (again is a no-op)."""
        with self._wakeup:
            if not self._thread.is_alive() and self._thread.ident is None:
                self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def failure(self) -> EngineError | None:
        """Why the thread failed for good, or None."""
        return self._failure

    @property
    def healthy(self) -> bool:
        return self._failure is None and not self._stopping and self._thread.ident is not None and self.alive

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    # -- handing work over -----------------------------------------------------------------------

    def attach(self, worker: DeviceWorker) -> None:
        with self._wakeup:
            self._check_open()
            self._workers = (*self._workers, worker)
            self._wakeup.notify()

    def detach(self, worker: DeviceWorker) -> None:
        """Stop ticking ``worker``; from the device thread, or between ticks under the lock."""
        with self._wakeup:
            self._workers = tuple(w for w in self._workers if w is not worker)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` on the device thread before its next tick; the future gets the result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue(lambda: fn(*args), future)
        return future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like submit, for callers that do not wait: ``fn`` must handle its own errors."""
        self._enqueue(lambda: fn(*args), None)

    def submit_batch(self, run: Callable[[Checkpoint], T]) -> concurrent.futures.Future[T]:
        """Queue ``run(checkpoint)`` as a batch job; it must call ``checkpoint()`` between steps.

        ``checkpoint`` raises EngineError when the job must stop: the thread is stopping or failed.
        Jobs run one at a time, in order; a job cancels itself by raising from its own steps.
        """
        job = _BatchJob(run)
        with self._wakeup:
            self._check_open()
            self._batch_jobs.append(job)
            self._wakeup.notify()
        return job.future

    def wake(self) -> None:
        """Re-check ``has_work`` (e.g. a consumer caught up with a paused stream)."""
        with self._wakeup:
            self._wakeup.notify()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._stopping:
            raise EngineError("the engine is closed")
        if self._thread.ident is not None and not self._thread.is_alive():
            raise EngineError(f"the device thread {self.name!r} is not running; restart the engine")

    def _enqueue(self, call: Callable[[], Any], future: concurrent.futures.Future[Any] | None) -> None:
        with self._wakeup:
            self._check_open()
            self._commands.append((call, future))
            self._wakeup.notify()

    # -- ending ----------------------------------------------------------------------------------

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the command or batch step in progress, fail the queued ones, end the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive() and not self.is_current():
            self._thread.join(timeout)

    def fail(self, exc: BaseException) -> EngineError:
        """Mark the thread failed for good (on the device thread): the device or its models are in
        an unknown state. Queued work fails, workers are told; the loop exits after the current step."""
        with self._wakeup:
            if self._failure is not None:
                return self._failure
            log.error("device thread failed", extra={"device_thread": self.name}, exc_info=exc)
            error = EngineError(
                f"the device thread {self.name!r} failed ({type(exc).__name__}: {exc}); every turn on it "
                "ended, and the engine must be restarted"
            )
            error.__cause__ = exc
            self._failure = error
            commands, self._commands = list(self._commands), deque()
            jobs, self._batch_jobs = list(self._batch_jobs), deque()
            workers = self._workers
            self._wakeup.notify_all()
        _fail_waiting(commands, jobs, error)
        for worker in workers:
            try:
                worker.device_failed(error)
            except Exception:
                log.exception("a worker's failure handler raised", extra={"worker": worker.name})
        return error

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            served = 0  # realtime work since a batch job last had a turn: it starts even under full load
            while self._failure is None:
                with self._wakeup:
                    while not (self._commands or self._stopping or self._batch_jobs or self._due()):
                        self._wakeup.wait()
                done = self._serve()
                served += done
                batch_turn = done == 0 or served >= self.ticks_per_batch_step
                if batch_turn and self._batch_jobs and self._failure is None and not self._stopping:
                    served = 0
                    self._run_batch_job()
                if self._stopping:
                    self._drain_on_stop()
                    return
        except BaseException as exc:  # nothing may end this thread silently
            self.fail(exc)

    def _due(self) -> bool:
        return any(worker.has_work() for worker in self._workers)

    def _serve(self) -> int:
        """Run the queued commands, then one tick of every worker that has work; return ticks run."""
        with self._wakeup:
            commands, self._commands = list(self._commands), deque()
        for call, future in commands:
            if self._failure is None:
                self._run_command(call, future)
            elif future is not None and future.set_running_or_notify_cancel():
                future.set_exception(self._failure)
        ticks = 0
        for worker in self._workers:
            if self._failure is None and not self._stopping and worker.has_work():
                ticks += 1
                try:
                    worker.tick()
                except Exception as exc:
                    log.exception("engine tick failed", extra={"worker": worker.name})
                    worker.tick_failed(exc)  # raising marks the device failed
        return ticks + len(commands)

    def _run_batch_job(self) -> None:
        with self._wakeup:
            job = self._batch_jobs.popleft()
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            result = job.run(self._checkpoint)
        except BaseException as exc:
            job.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            job.future.set_result(result)

    def _checkpoint(self) -> None:
        """Between two steps of a batch job: serve the realtime work that came due.

        Realtime goes first, up to ``ticks_per_batch_step`` ticks. After serving, wait up to
        ``realtime_grace_s`` for the event loop's follow-up (a turn's text right after its start)
        so it does not queue behind a whole batch step.
        """
        if not self.is_current():
            raise EngineError("a batch job's checkpoint was called off its device thread")
        try:
            served = 0
            while served < self.ticks_per_batch_step and self._failure is None and not self._stopping:
                done = self._serve()
                if done == 0:
                    break
                served += done
                with self._wakeup:
                    if not (self._commands or self._stopping or self._due()):
                        self._wakeup.wait(self.realtime_grace_s)
        except Exception as exc:
            raise EngineError(f"batch job stopped: {self.fail(exc)}") from exc
        if self._failure is not None:
            raise self._failure
        if self._stopping:
            raise EngineError("the engine was closed while this batch job ran")

    def _drain_on_stop(self) -> None:
        with self._wakeup:
            commands, self._commands = list(self._commands), deque()
            jobs, self._batch_jobs = list(self._batch_jobs), deque()
        _fail_waiting(commands, jobs, EngineError("the engine was closed before this request ran"))

    @staticmethod
    def _run_command(call: Callable[[], Any], future: concurrent.futures.Future[Any] | None) -> None:
        if future is not None and not future.set_running_or_notify_cancel():
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


def _fail_waiting(commands: Iterable[tuple[Any, concurrent.futures.Future[Any] | None]], jobs: Iterable[_BatchJob],
                  error: BaseException) -> None:
    """Fail the futures of commands and batch jobs that will never run."""
    for _, future in commands:
        if future is not None and future.set_running_or_notify_cancel():
            future.set_exception(error)
    for job in jobs:
        if job.future.set_running_or_notify_cancel():
            job.future.set_exception(error)
