"""Bounded channels between pipeline stages, each with a written overflow policy.

- ``block``: the producer waits for room (text into the TTS stream, audio toward a paced sink).
- ``drop_oldest``: the oldest item is discarded and counted (observers that may lag, e.g. event
  subscribers: the pipeline must never wait on them).
- ``reject``: ``put`` raises ``ChannelFullError`` (queued turns: the caller learns it asked too much).

Closing wakes every waiter: getters drain what is left then stop; putters get ``ChannelClosedError``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, Literal, TypeVar

from moss_agent.errors import OverloadError, SessionClosedError

T = TypeVar("T")
OverflowPolicy = Literal["block", "drop_oldest", "reject"]


class ChannelClosedError(SessionClosedError):
    """The channel was closed; nothing more can be put into it."""


class ChannelFullError(OverloadError):
    """A ``reject`` channel is full."""


class Channel(Generic[T]):
    """A bounded FIFO with an overflow policy; ``bypass`` lets chosen items skip the bound.

    ``bypass`` keeps control items from waiting behind data: an item for which it returns True is
    enqueued at once even when the channel is full (it still counts toward the length).
    """

    def __init__(
        self,
        maxsize: int,
        policy: OverflowPolicy = "block",
        *,
        name: str = "channel",
        bypass: Callable[[T], bool] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"channel {name!r}: maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.policy: OverflowPolicy = policy
        self.name = name
        self.dropped = 0
        self._items: deque[T] = deque()
        self._bypass = bypass
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def _update(self) -> None:
        if self._items or self._closed:
            self._readable.set()
        else:
            self._readable.clear()
        if len(self._items) < self.maxsize or self._closed:
            self._writable.set()
        else:
            self._writable.clear()

    def put_nowait(self, item: T) -> bool:
        """Enqueue without waiting; returns False when a ``block`` channel is full (item not taken)."""
        if self._closed:
            raise ChannelClosedError(f"channel {self.name!r} is closed")
        full = len(self._items) >= self.maxsize
        if full and not (self._bypass is not None and self._bypass(item)):
            if self.policy == "block":
                return False
            if self.policy == "reject":
                raise ChannelFullError(
                    f"channel {self.name!r} is full ({self.maxsize} items); wait for earlier items "
                    "to finish or raise its size in the config"
                )
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._update()
        return True

    async def put(self, item: T) -> None:
        while not self.put_nowait(item):
            await self._writable.wait()

    def get_nowait(self) -> T:
        """Next item; raises ``ChannelClosedError`` when closed and drained, IndexError when merely empty."""
        if not self._items:
            if self._closed:
                raise ChannelClosedError(f"channel {self.name!r} is closed")
            raise IndexError(f"channel {self.name!r} is empty")
        item = self._items.popleft()
        self._update()
        return item

    async def get(self) -> T:
        """Next item; raises ``ChannelClosedError`` once closed and drained."""
        while not self._items:
            if self._closed:
                raise ChannelClosedError(f"channel {self.name!r} is closed")
            await self._readable.wait()
        item = self._items.popleft()
        self._update()
        return item

    def clear(self) -> int:
        """Drop everything queued (e.g. stale audio after an interrupt); returns how many."""
        count = len(self._items)
        self._items.clear()
        self._update()
        return count

    def close(self) -> None:
        self._closed = True
        self._update()

    async def wait_for_room(self) -> None:
        """Wait until the channel has room (or is closed), whatever its policy: lets one producer be paced."""
        while len(self._items) >= self.maxsize and not self._closed:
            await self._writable.wait()

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.get()
            except ChannelClosedError:
                return
