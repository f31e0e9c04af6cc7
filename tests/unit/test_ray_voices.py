"""The Ray Serve deployment's shared voices without Ray: the store's class and two replicas' mirrors.

``VoiceStore`` is the actor's plain class; :class:`LocalHandle` calls it the way an actor handle
does (``handle.method.remote(...)`` is awaited), so the mirrors run their real code.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from moss_agent.errors import ConfigError, EngineError
from moss_agent.service.ray_voices import VoiceMirror, VoiceStore
from moss_agent.service.voices import VoiceRegistry

RATE = 24000
SPEECH = np.linspace(-0.1, 0.1, 4800, dtype=np.float32)


class _Method:
    def __init__(self, handle: LocalHandle, name: str) -> None:
        self.handle, self.name = handle, name

    def remote(self, *args: Any) -> Any:
        if self.handle.down:
            return self._fail()
        return getattr(self.handle.store, self.name)(*args)

    @staticmethod
    async def _fail() -> None:
        raise RuntimeError("the actor died")  # what Ray raises from an awaited call is not ours either


class LocalHandle:
    """An actor handle's calling convention on a local ``VoiceStore``; ``store`` may be swapped
    (a restarted actor) and ``down`` makes every call fail (an unreachable actor)."""

    def __init__(self, store: VoiceStore) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


def replica(handle: LocalHandle) -> tuple[VoiceRegistry, VoiceMirror]:
    voices = VoiceRegistry(RATE, max_uploaded=2)
    voices.add("given", SPEECH)  # a voice the deployment gives every replica at start
    return voices, VoiceMirror(handle, voices, call_timeout_s=1.0)


async def test_an_upload_through_one_replica_is_mirrored_by_the_other() -> None:
    handle = LocalHandle(VoiceStore(max_voices=2, max_samples=RATE))
    (voices_a, a), (voices_b, b) = replica(handle), replica(handle)
    follower = asyncio.create_task(b.follow())
    try:
        entry = await a.publish("carol", SPEECH)
        assert entry.uploaded and voices_a["carol"] is entry.pcm
        for _ in range(100):  # b follows the store by itself
            if voices_b.lookup("carol") is not None:
                break
            await asyncio.sleep(0.01)
        mirrored = voices_b.lookup("carol")
        assert mirrored is not None and mirrored.uploaded and mirrored.created_at == entry.created_at
        np.testing.assert_array_equal(mirrored.pcm, SPEECH)

        # The bound is the deployment's: two voices, whichever replica takes the upload.
        await b.publish("dave", SPEECH)
        with pytest.raises(ConfigError, match="already holds 2 uploaded voices"):
            await a.publish("erin", SPEECH)
        await a.publish("carol", SPEECH[:100])  # replacing one is no new voice
        with pytest.raises(ConfigError, match="at most"):
            await a.publish("carol", np.zeros(RATE + 1, np.float32))
        await b.sync()
        assert voices_b["carol"].shape == (100,)

        # A delete through one replica reaches the other; a voice given at start is not the store's.
        assert await b.unpublish("carol") and not await b.unpublish("given")
        await a.sync()
        assert voices_a.lookup("carol") is None and voices_a.lookup("given") is not None
        assert sorted(voices_a) == sorted(voices_b) == ["dave", "given"]
    finally:
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follower


async def test_a_restarted_store_gets_the_voices_back_and_an_unreachable_one_is_an_engine_error() -> None:
    handle = LocalHandle(VoiceStore(max_voices=2, max_samples=RATE))
    (voices_a, a), (voices_b, b) = replica(handle), replica(handle)
    await a.publish("carol", SPEECH)
    await b.sync()

    handle.down = True
    with pytest.raises(EngineError, match="did not answer"):
        await a.publish("dave", SPEECH)
    assert voices_a.lookup("dave") is None

    handle.down = False
    handle.store = VoiceStore(max_voices=2, max_samples=RATE)  # Ray restarted the actor: empty
    await b.sync()  # b gives back what it mirrors
    await a.sync()
    assert await handle.store.get(["carol"]) and sorted(voices_a) == sorted(voices_b) == ["carol", "given"]
    # A replica starting now fetches the voices uploaded before it.
    voices_c, c = replica(handle)
    await c.sync()
    np.testing.assert_array_equal(voices_c["carol"], SPEECH)


async def test_the_store_wakes_its_followers_on_a_change_only() -> None:
    store = VoiceStore(max_voices=1, max_samples=10)
    epoch, version, listing = await store.listing()
    assert (version, listing) == (0, {})
    assert await store.wait(epoch, version, 0.01) == 0  # nothing changed: returns at the timeout
    waiting = asyncio.create_task(store.wait(epoch, version, 10.0))
    await asyncio.sleep(0)
    assert await store.put("a", np.ones(5, np.float32), 0) is None
    assert await asyncio.wait_for(waiting, 1.0) == 1
    assert await store.wait("another epoch", 1, 10.0) == 1  # a restarted store answers at once
    assert "float32 mono" in str(await store.put("b", np.ones((2, 2), np.float32), 0))
