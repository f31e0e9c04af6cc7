"""An engine's health as the asyncio side sees it: bounded waits on the device, failure reporting.

Every await on a device thread goes through ``bounded``, so a stuck or dead device turns into an
``EngineError`` naming what timed out instead of a hang. ``EngineHealth`` holds why an engine
stopped serving and tells the host (``moss-agent serve`` exits non-zero so a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import TypeVar

from moss_agent.errors import EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")

FailureCallback = Callable[[EngineError], object]


async def bounded(future: concurrent.futures.Future[T], timeout_s: float, what: str) -> T:
    """Await a device-thread future for at most ``timeout_s``; then cancel it and raise EngineError."""
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.wrap_future(future)
    except TimeoutError:
        future.cancel()  # if it has not started, it never will
        raise EngineError(
            f"the engine did not finish {what} within {timeout_s:g} s: its device is stuck or overloaded "
            "(the limit is RealtimeEngineConfig.call_timeout_s)"
        ) from None


class EngineHealth:
    """Whether an engine can still serve, and who to tell when it no longer can (event loop only)."""

    def __init__(self) -> None:
        self.failure: EngineError | None = None
        self._callbacks: list[FailureCallback] = []

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def add_callback(self, callback: FailureCallback) -> None:
        """``callback(error)`` runs on the event loop once the engine fails (at once if it already has)."""
        if self.failure is not None:
            callback(self.failure)
        else:
            self._callbacks.append(callback)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def failed(self, error: EngineError) -> None:
        """Record the failure (the first one wins) and tell every callback."""
        if self.failure is not None:
            return
        self.failure = error
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(error)
            except Exception:
                log.exception("an engine failure callback raised")
