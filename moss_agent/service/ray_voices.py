"""Uploaded voices shared by the replicas of a Ray Serve deployment (``ray_serve.py``).

One small actor per deployment (:class:`VoiceStore`, named ``moss-voices:APP:DEPLOYMENT`` in the
``moss_agent`` namespace, detached, no CPU) holds the voices uploaded through any replica, bounded
as the plain server bounds its own: at most ``max_voices`` voices, each at most ``max_samples``
samples. Every replica mirrors them into its ``VoiceRegistry`` (:class:`VoiceMirror`, the app's
``SharedVoices``):

- an upload or a delete goes to the store first, then the replica catches up, so the replica that
  took it answers with it in place;
- every replica follows the store (a long poll: ``wait`` returns on the next change) and catches
  up within an actor call or two, so sessions opened elsewhere see the voice too;
- a speech request naming a voice the replica does not know yet, and a voice listing, catch up
  first, so an upload followed at once by a request routed to another replica finds its voice.

A catch-up fetches only the voices it lacks (by revision), never the whole set. The store is
detached so that it outlives any one replica (an actor dies with its owner); ``ray_serve.shutdown``
removes it, and it otherwise lives as long as the cluster (a redeploy under the same names finds
its voices again). Should the store itself die, Ray restarts it empty under a new ``epoch``, and
each replica gives it back the voices it mirrors.

:class:`VoiceStore` is plain Python (the actor's class; tests can drive it without Ray); Ray is
imported only by :func:`voice_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import numpy as np

from moss_agent.errors import ConfigError, EngineError, MossError
from moss_agent.service.voices import VoiceEntry, VoiceRegistry

log = logging.getLogger(__name__)

NAMESPACE = "moss_agent"
CALL_TIMEOUT_S = 30.0  # one store call; a long poll waits POLL_S more
POLL_S = 30.0
RETRY_S = 1.0  # the follower's pause after a failed call


def store_name(app: str, deployment: str) -> str:
    """The store actor's name for the Serve application ``app`` and its deployment ``deployment``."""
    return f"moss-voices:{app}:{deployment}"


class VoiceStore:
    """The uploaded voices of one deployment: name -> (revision, float32 mono pcm, created_at).
    Every change takes the next ``version``; a voice keeps the version that put it as its revision."""

    def __init__(self, max_voices: int, max_samples: int) -> None:
        self.max_voices, self.max_samples = max_voices, max_samples
        self.epoch = uuid.uuid4().hex  # a restarted store starts empty under another epoch
        self.version = 0
        self._voices: dict[str, tuple[int, np.ndarray, int]] = {}
        self._changed: asyncio.Event | None = None  # made in the actor's own loop

    def _bump(self) -> int:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return self.version

    async def put(self, name: str, pcm: np.ndarray, created_at: int, if_absent: bool = False) -> str | None:
        """Keep ``pcm`` as ``name``; None when done, else why not (full, too long, not mono audio).
        ``if_absent``: leave a voice already there (a replica giving a restarted store its voices)."""
        samples = np.asarray(pcm)
        if samples.ndim != 1 or samples.size == 0 or samples.dtype != np.float32:
            return f"voice {name!r}: expected non-empty float32 mono audio"
        if samples.size > self.max_samples:
            return f"voice {name!r} is {samples.size} samples long; at most {self.max_samples} are kept"
        if name in self._voices:
            if if_absent:
                return None
        elif len(self._voices) >= self.max_voices:
            return f"this deployment already holds {self.max_voices} uploaded voices; delete one first"
        self._voices[name] = (self.version + 1, samples, created_at)
        self._bump()
        return None

    async def remove(self, name: str) -> bool:
        if self._voices.pop(name, None) is None:
            return False
        self._bump()
        return True

    async def listing(self) -> tuple[str, int, dict[str, int]]:
        """(epoch, version, name -> revision)."""
        return self.epoch, self.version, {name: entry[0] for name, entry in self._voices.items()}

    async def get(self, names: list[str]) -> dict[str, tuple[int, np.ndarray, int]]:
        """The voices among ``names`` still here: name -> (revision, pcm, created_at)."""
        return {name: self._voices[name] for name in names if name in self._voices}

    async def wait(self, epoch: str | None, version: int, timeout_s: float) -> int:
        """Return the version once it is not ``version`` (or the epoch is not ``epoch``), or after
        ``timeout_s``."""
        if epoch == self.epoch and version == self.version:
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self.version


class VoiceMirror:
    """A replica's ``SharedVoices``: the store's voices mirrored into ``voices`` (see the module
    docstring). ``store``: the store actor's handle. Start :meth:`follow` as a task; cancel it to stop."""

    def __init__(self, store: Any, voices: VoiceRegistry, *, call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.store, self.voices = store, voices
        self.call_timeout_s = call_timeout_s
        self._revisions: dict[str, int] = {}  # the uploaded voices mirrored here
        self._epoch: str | None = None
        self._version = -1
        self._lock = asyncio.Lock()  # one catch-up at a time

    async def _call(self, ref: Awaitable[Any], extra_s: float = 0.0) -> Any:
        async def result() -> Any:
            return await ref

        try:
            return await asyncio.wait_for(result(), self.call_timeout_s + extra_s)
        except (asyncio.CancelledError, MossError):
            raise
        except Exception as exc:  # Ray's own errors: the actor died, is restarting, timed out...
            raise EngineError(
                f"the voice store did not answer ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None

    async def publish(self, name: str, pcm: np.ndarray) -> VoiceEntry:
        samples = np.ascontiguousarray(pcm, dtype=np.float32)
        refused = await self._call(self.store.put.remote(name, samples, int(time.time())))
        if refused is not None:
            raise ConfigError(refused)
        await self.sync()
        entry = self.voices.lookup(name)
        if entry is None:  # deleted through another replica in the meantime
            raise EngineError(f"voice {name!r} was deleted while it was uploaded")
        return entry

    async def unpublish(self, name: str) -> bool:
        removed = bool(await self._call(self.store.remove.remote(name)))
        await self.sync()
        return removed

    async def sync(self) -> None:
        async with self._lock:
            epoch, version, listing = await self._call(self.store.listing.remote())
            if self._epoch is not None and epoch != self._epoch and self._revisions:
                await self._give_back(listing)  # the store restarted empty
                epoch, version, listing = await self._call(self.store.listing.remote())
            for name in [name for name in self._revisions if name not in listing]:
                self.voices.remove(name)
                del self._revisions[name]
            wanted = [name for name, revision in listing.items() if self._revisions.get(name) != revision]
            fetched = await self._call(self.store.get.remote(wanted)) if wanted else {}
            for name, (revision, pcm, created_at) in fetched.items():
                try:
                    # a copy: what Ray hands over may be a read-only view of its object store
                    self.voices.add(
                        name, np.array(pcm, dtype=np.float32), uploaded=True, created_at=created_at
                    )
                except ConfigError as exc:  # a name given at start here, or a smaller local bound
                    log.warning(
                        "a shared voice cannot be mirrored here", extra={"voice": name, "error": str(exc)}
                    )
                    continue
                self._revisions[name] = revision
            self._epoch, self._version = epoch, version

    async def _give_back(self, listing: dict[str, int]) -> None:
        log.warning("the voice store restarted empty; giving it back this replica's voices",
                    extra={"voices": len(self._revisions)})  # fmt: skip
        for name in self._revisions:
            entry = self.voices.lookup(name)
            if name not in listing and entry is not None and entry.pcm is not None:
                await self._call(self.store.put.remote(name, entry.pcm, entry.created_at, True))
        self._revisions.clear()  # the store's revisions start again: fetch what differs

    async def follow(self) -> None:
        """Catch up after every change of the store, until cancelled."""
        while True:
            try:
                await self._call(self.store.wait.remote(self._epoch, self._version, POLL_S), extra_s=POLL_S)
                await self.sync()
            except Exception as exc:  # an unreachable store (EngineError) or a bug: keep following
                log.warning("following the voice store failed; retrying", extra={"error": str(exc)[:300]},
                            exc_info=not isinstance(exc, EngineError))  # fmt: skip
                await asyncio.sleep(RETRY_S)


def voice_store(name: str, max_voices: int, max_samples: int) -> Any:
    """The handle of the store actor ``name``, started if it is not running yet (blocking: call it
    off the event loop). Imports Ray."""
    import ray

    actor = ray.remote(VoiceStore).options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_task_retries=-1, max_concurrency=1000,
    )  # fmt: skip
    return actor.remote(max_voices, max_samples)


def remove_voice_store(name: str) -> bool:
    """Stop the store actor ``name`` (its voices go with it); False when there is none."""
    import ray

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True
