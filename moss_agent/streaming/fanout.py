"""A session's events, fanned out to its subscribers: the whole session's, or one turn's.

Each subscriber has its own ``drop_oldest`` channel, so a lagging observer loses its oldest events
(counted in ``EventStream.dropped``) and never holds the pipeline back. Audio is the exception: it
waits for room in every channel that is being read, so audio without an output is paced by its
slowest reader. A turn's own stream that nobody iterates yet never paces anything.
"""

from __future__ import annotations

from moss_agent.events import AudioChunk, Event
from moss_agent.streaming.channels import Channel, ChannelClosedError


class EventStream:
    """Events of one subscriber, from the moment it subscribed until it is closed."""

    def __init__(self, hub: EventHub, channel: Channel[Event]) -> None:
        self._hub = hub
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

    def reading(self) -> EventStream:
        """Mark this stream as read: from now on its reader paces audio."""
        self._hub._unread.discard(self._channel)
        return self

    def close(self) -> None:
        self._hub._drop(self._channel)


def _follows(turn_id: int | None, event: Event) -> bool:
    """Whether a subscriber that follows ``turn_id`` (None: the whole session) gets ``event``."""
    return turn_id is None or getattr(event, "turn_id", None) == turn_id


class EventHub:
    """The subscribers of one session and the turn each follows (None: every event)."""

    def __init__(self, queue_size: int, name: str) -> None:
        self.queue_size = queue_size
        self.name = name
        self._subscribers: dict[Channel[Event], int | None] = {}
        self._unread: set[Channel[Event]] = set()  # turn streams nobody iterates yet: they never pace audio
        self.closed = False

    def subscribe(self, turn_id: int | None = None) -> EventStream:
        """A new subscriber; a turn's subscriber is unread (never pacing audio) until iterated."""
        name = f"{self.name}-events" if turn_id is None else f"{self.name}-turn{turn_id}-events"
        channel: Channel[Event] = Channel(self.queue_size, "drop_oldest", name=name)
        if self.closed:
            channel.close()
        else:
            self._subscribers[channel] = turn_id
            if turn_id is not None:
                self._unread.add(channel)
        return EventStream(self, channel)

    def emit(self, event: Event) -> None:
        for channel, turn_id in list(self._subscribers.items()):
            if not channel.closed and _follows(turn_id, event):
                channel.put_nowait(event)

    async def emit_audio(self, chunk: AudioChunk) -> None:
        """Like emit, but waits for room in every channel that is being read."""
        for channel, turn_id in list(self._subscribers.items()):
            if not _follows(turn_id, chunk):
                continue
            if channel not in self._unread:
                await channel.wait_for_room()
            if not channel.closed:
                channel.put_nowait(chunk)

    def end_turn(self, turn_id: int) -> None:
        """Close the streams that follow one turn (after its last event, or when it is dropped)."""
        for channel, followed in list(self._subscribers.items()):
            if followed == turn_id:
                self._drop(channel)

    def close(self) -> None:
        """Close every stream; later subscribers get a closed one."""
        self.closed = True
        for channel in list(self._subscribers):
            self._drop(channel)

    def _drop(self, channel: Channel[Event]) -> None:
        self._subscribers.pop(channel, None)
        self._unread.discard(channel)
        channel.close()
