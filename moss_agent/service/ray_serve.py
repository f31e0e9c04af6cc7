"""The speech server scaled out on Ray Serve: one replica per GPU, each replica one engine.

Ray Serve's HTTP proxy speaks ASGI, our server is an aiohttp app. Each replica loads its own
``RealtimeEngine``, runs the unchanged ``create_app`` server on a Unix socket private to the
replica, and answers the proxy through :class:`ReplicaASGI`, which forwards every request to that
socket: HTTP with its body and streamed response, WebSockets frame by frame, both ways. So auth,
limits, errors, metrics and the session protocol are exactly the plain server's, and a WebSocket
(a session with its conversations) stays on the replica the proxy routed its upgrade to.

Routing and scale: ``max_ongoing_requests`` is the engine's slots (one speech request or one
session socket is one ongoing request), and the deployment autoscales on ongoing requests
(``target_ongoing_requests``, default three quarters of the slots) between ``min_replicas`` and
``max_replicas``. With CUDA in the cluster every replica asks for one GPU (``num_gpus: 1``), so
there is one replica per GPU; on the CPU it asks for ``cpus_per_replica`` CPUs.

Batch models (``batch_models``, ``speech-server --batch-model``) are loaded by every replica beside
its engine, sharing its codec and device thread, as the plain server does. Uploaded voices are
shared: one small actor per deployment holds them and every replica mirrors them
(``moss_agent.service.ray_voices``), so a voice uploaded through one replica speaks on all.

A replica that dies takes its streams with it: an HTTP stream ends short (the proxy drops the
connection), a WebSocket is closed by the proxy (the Python client raises ``EngineError``); new
requests go to the surviving replicas while Serve starts a replacement.

Deploy (``pip install "moss-agent[ray]"``)::

    serve run moss_agent.service.ray_serve:build_app model=/ckpt/realtime codec=/ckpt/codec \\
        token=SECRET max_replicas=4 slots=8
    serve run moss_agent.service.ray_serve:build_app tiny=true min_replicas=2 max_replicas=2

or from Python: ``serve.run(deployment(RayServeOptions(...)), route_prefix="/")``, or :func:`deploy`
(Ray, Serve's proxy on host:port and the deployment in one call; :func:`options_from_cli` maps the
``speech-server`` engine options) and :func:`shutdown`. ``docs/ray-serve.md`` has the details. The plain server
(``moss_agent.service``) imports nothing from Ray; this module imports Ray only when a deployment is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moss_agent.errors import ConfigError, MossError

log = logging.getLogger(__name__)

VOICE_RATE = 24000  # the rate voices travel at to the replicas (every MOSS codec's)

REPLICA_HEADER = "X-Moss-Replica"  # on every response: which replica served it
APP_NAME = "moss-speech"  # the Serve application deploy() makes
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})  # fmt: skip
_WS_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
})  # fmt: skip


@dataclass(frozen=True)
class RayServeOptions:
    """One deployment's settings. ``model`` / ``codec``: checkpoint folders or hub ids (``tiny``:
    the tiny random checkpoints instead, for tests). ``slots``: conversations per engine, and so
    ``max_ongoing_requests`` per replica. ``device``: ``auto`` (one GPU per replica when the cluster
    has GPUs, else CPU), ``cuda`` or ``cpu``. ``token``: the bearer token of every replica.
    ``voices``: named voices every replica registers, (name, float32 mono speech at
    ``VOICE_RATE``) pairs decoded once where the deployment is built (``voices=NAME=PATH,...`` for
    ``serve run``; see :func:`read_voices`), so replicas need no access to the files.
    ``max_input_chars`` / ``max_voice_seconds`` / ``max_uploaded_voices``: as ``ServiceConfig`` (the
    uploaded voices are counted for the whole deployment). ``batch_models``: (name, checkpoint folder
    or hub id; ``tiny``: the tiny random Delay, with ``tiny``) pairs every replica also serves in
    ``/v1/audio/speech`` (``batch_models=NAME=PATH,...`` for ``serve run``); their answers are at
    least ``min_seconds`` long (1 s with ``tiny`` when ``min_seconds`` is 0, as the CLI's ``--tiny``).
    """

    model: str | None = None
    codec: str | None = None
    tiny: bool = False
    slots: int = 8
    max_seconds: float = 60.0
    min_seconds: float = 0.0  # no audio end before this (tests that need long streams)
    greedy: bool = False
    seed: int | None = None
    device: str = "auto"
    token: str | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None
    cpus_per_replica: float = 1.0
    name: str = "MossSpeech"
    dtype: str | None = None
    compile: bool = False
    voices: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)
    max_input_chars: int = 4096
    max_voice_seconds: float = 30.0
    max_waiting: int | None = None  # the engine's queue for a slot (None: the engine's default)
    max_uploaded_voices: int = 64
    batch_models: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.tiny and not (self.model and self.codec):
            raise ConfigError("give model= and codec= (checkpoint folders or hub ids), or tiny=true")
        if self.slots < 1 or not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError("need slots >= 1 and 1 <= min_replicas <= max_replicas")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device must be auto, cuda or cpu, got {self.device!r}")
        if self.max_uploaded_voices < 1:
            raise ConfigError(f"max_uploaded_voices must be >= 1, got {self.max_uploaded_voices}")
        for name, path in self.batch_models:
            if path == "tiny" and not self.tiny:
                raise ConfigError(
                    f"batch model {name}=tiny is the tiny random Delay model: it goes with tiny=true"
                )
        if len({name for name, _ in self.batch_models}) != len(self.batch_models):
            raise ConfigError(f"batch model names must differ, got {[name for name, _ in self.batch_models]}")
        if not 0 <= self.min_seconds <= self.max_seconds or self.max_seconds <= 0:
            raise ConfigError(
                f"need 0 <= min_seconds <= max_seconds and max_seconds > 0, "
                f"got {self.min_seconds} and {self.max_seconds}"
            )

    @classmethod
    def from_args(cls, args: dict[str, str]) -> RayServeOptions:
        """From ``serve run`` arguments (``key=value`` strings)."""
        args = dict(args)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ConfigError(f"unknown options {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        if "voices" in args:
            values["voices"] = read_voices([item for item in str(args.pop("voices")).split(",") if item])
        if "batch_models" in args:
            from moss_agent.commands.speech_server import parse_batch_models

            items = [item for item in str(args.pop("batch_models")).split(",") if item]
            tiny = str(args.get("tiny", "")).lower() in ("1", "true", "yes", "on")
            values["batch_models"] = tuple(parse_batch_models(items, tiny))
        for key, text in args.items():
            kind, _, optional = str(known[key].type).partition(" | ")
            try:
                if optional and str(text).lower() in ("none", "null", ""):
                    values[key] = None
                elif kind == "bool":
                    values[key] = str(text).lower() in ("1", "true", "yes", "on")
                elif kind in ("int", "float"):
                    values[key] = int(text) if kind == "int" else float(text)
                else:
                    values[key] = str(text)
            except ValueError as exc:
                raise ConfigError(f"option {key}={text!r}: {exc}") from None
        return cls(**values)


def read_voices(items: list[str], max_seconds: float | None = 30.0) -> tuple[tuple[str, Any], ...]:
    """``NAME=PATH`` items -> (name, float32 mono speech at ``VOICE_RATE``) pairs; ConfigError or
    AudioError for a bad name or file, here rather than on every replica."""
    from moss_agent.audio import load_audio
    from moss_agent.service.voices import parse_voice_option

    voices = []
    for item in items:
        name, path = parse_voice_option(item)
        voices.append((name, load_audio(path, VOICE_RATE, max_seconds=max_seconds)))
    return tuple(voices)


# -- the replica ----------------------------------------------------------------------------------


class ReplicaASGI:
    """An ASGI app that owns one engine and its aiohttp server (on a private Unix socket) and
    forwards the proxy's requests to it. Started and stopped by the ASGI lifespan (Serve runs it)."""

    def __init__(
        self, options: RayServeOptions, replica: str | None = None, voice_store: str | None = None
    ) -> None:
        """``voice_store``: the name of the deployment's voice store actor (``ray_voices``), which
        shares uploaded voices with the other replicas; None keeps them on this replica (no Ray)."""
        self.options = options
        self.replica = replica or f"pid{os.getpid()}"
        self.voice_store = voice_store
        self.engine: Any = None
        self.batch_engines: dict[str, Any] = {}
        self._follower: asyncio.Task[None] | None = None
        self._runner: Any = None
        self._http: Any = None
        self._socket: Path | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None

    async def start(self) -> None:
        import aiohttp
        from aiohttp import web

        from moss_agent.audio import resample
        from moss_agent.service import ServiceConfig, create_app
        from moss_agent.service.app import wait_until_warm
        from moss_agent.service.voices import VoiceRegistry

        opts = self.options
        self.engine = await asyncio.to_thread(self._load_engine)
        config = ServiceConfig(token=opts.token, max_input_chars=opts.max_input_chars,
                               max_voice_seconds=opts.max_voice_seconds,
                               max_uploaded_voices=opts.max_uploaded_voices)  # fmt: skip
        voices = VoiceRegistry(self.engine.sample_rate, max_uploaded=config.max_uploaded_voices)
        for name, pcm in opts.voices:
            voices.add(name, resample(pcm, VOICE_RATE, self.engine.sample_rate))
        shared = await self._share_voices(voices, config) if self.voice_store else None
        app = create_app(self.engine, config, voices=voices, shared_voices=shared)
        if opts.batch_models:
            from moss_agent.service.batch_speech import add_batch_engines, load_batch_engines

            self.batch_engines = await asyncio.to_thread(
                load_batch_engines, list(opts.batch_models), self.engine, opts.dtype
            )
            add_batch_engines(app, self.batch_engines, min_frames=self._batch_min_frames())
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()  # runs the app's startup: starts warming the engine up
        # The replica takes requests (Serve routes to it) once warm; an engine that cannot start
        # fails the replica's startup, so Serve reports it and tries a new one.
        await wait_until_warm(app)
        self._folder = tempfile.TemporaryDirectory(prefix="moss-replica-")
        self._socket = Path(self._folder.name) / "speech.sock"
        await web.UnixSite(self._runner, str(self._socket)).start()
        self._http = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self._socket), limit=0),
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None),
        )  # fmt: skip
        log.info("replica ready", extra={"replica": self.replica, "slots": self.options.slots})

    async def _share_voices(self, voices: Any, config: Any) -> Any:
        from moss_agent.service.ray_voices import VoiceMirror, voice_store

        max_samples = math.ceil(config.max_voice_seconds * voices.sample_rate) + 1024  # resampling's rounding
        store = await asyncio.to_thread(
            voice_store, str(self.voice_store), config.max_uploaded_voices, max_samples
        )
        mirror = VoiceMirror(store, voices)
        try:
            await mirror.sync()  # the voices uploaded before this replica started
        except MossError as exc:  # the follower keeps trying
            log.warning(
                "the voice store is unreachable at start", extra={"replica": self.replica, "error": str(exc)}
            )
        self._follower = asyncio.create_task(mirror.follow(), name=f"moss-voices-{self.replica}")
        return mirror

    def _batch_min_frames(self) -> int:
        from moss_agent.options import FRAME_SECONDS, TINY_MIN_SECONDS

        seconds = self.options.min_seconds or (TINY_MIN_SECONDS if self.options.tiny else 0.0)
        return round(seconds / FRAME_SECONDS)

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for batch in self.batch_engines.values():
            batch.close()  # shares the engine's device thread: closes nothing of the engine's
        if self.engine is not None:
            await self.engine.aclose()
        if self._folder is not None:
            self._folder.cleanup()

    def _load_engine(self) -> Any:
        import torch

        from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
        from moss_agent.models.realtime import SamplingConfig
        from moss_agent.options import ensure_tiny_checkpoints

        opts = self.options
        if opts.tiny:
            model, codec = (str(path) for path in ensure_tiny_checkpoints())
        else:
            model, codec = str(opts.model), str(opts.codec)
        cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
        config = RealtimeEngineConfig(
            num_slots=opts.slots,
            max_frames_per_turn=max(1, round(opts.max_seconds / 0.08)),
            sampling=SamplingConfig(greedy=opts.greedy, min_frames=round(opts.min_seconds / 0.08)),
            seed=opts.seed,
            compile=opts.compile,
        )
        if opts.max_waiting is not None:
            config = dataclasses.replace(config, max_waiting=opts.max_waiting)
        return RealtimeEngine.load(
            model, codec, device="cuda" if cuda else "cpu", dtype=opts.dtype, config=config
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http_request(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.exception("replica failed to start", extra={"replica": self.replica})
                    await send({"type": "lifespan.startup.failed", "message": str(exc)[:500]})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _target(self, scope: dict[str, Any]) -> str:
        # Our routes are absolute: drop a route prefix (root_path) where the path still carries it.
        path, root = str(scope["path"]), str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        query = scope.get("query_string", b"").decode("latin-1")
        return "http://replica" + path + (f"?{query}" if query else "")

    @staticmethod
    def _headers(scope: dict[str, Any], drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        return [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope.get("headers", [])
            if name.decode("latin-1").lower() not in _HOP_BY_HOP | drop
        ]

    async def _http_request(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # The body is read whole, like the aiohttp app does, up to one byte past the app's own
        # limit (which then answers 413 with its usual error).
        limit = int(self._runner.app._client_max_size) + 1
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                del body[limit:]
                break
            if not message.get("more_body", False):
                break
        async with self._http.request(
            scope["method"], self._target(scope), headers=self._headers(scope), data=bytes(body),
            allow_redirects=False,
        ) as response:  # fmt: skip
            headers = [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in response.headers.items()
                if name.lower() not in _HOP_BY_HOP
            ]
            headers.append((REPLICA_HEADER.lower().encode(), self.replica.encode()))
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            async for data in response.content.iter_any():
                await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import aiohttp

        if (await receive())["type"] != "websocket.connect":
            return
        try:
            upstream = await self._http.ws_connect(
                self._target(scope), headers=self._headers(scope, _WS_HANDSHAKE), max_msg_size=0,
                autoping=True,
            )  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:  # refused (401 ...): the client gets that status
            await self._deny(scope, send, exc.status, exc.message)
            return
        await send(
            {
                "type": "websocket.accept",
                "headers": [(REPLICA_HEADER.lower().encode(), self.replica.encode())],
            }
        )
        try:
            async with asyncio.TaskGroup() as group:
                inbound = group.create_task(self._client_to_server(receive, upstream), name="ws-in")
                await self._server_to_client(upstream, send)
                inbound.cancel()
        except* Exception:  # the client went away while we wrote to it: nothing left to tell it
            log.info("websocket relay ended by a failure", extra={"replica": self.replica})
        finally:
            await upstream.close()

    async def _deny(self, scope: dict[str, Any], send: Any, status: int, reason: str) -> None:
        if "websocket.http.response" in scope.get("extensions", {}):
            body = f'{{"error": {{"message": "{reason}", "code": {status}}}}}'.encode()
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a close before accept: the proxy answers 403
            await send({"type": "websocket.close", "code": 1008, "reason": f"{status} {reason}"[:120]})

    @staticmethod
    async def _client_to_server(receive: Any, upstream: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(code=message.get("code", 1000))
                return
            if message.get("bytes") is not None:
                await upstream.send_bytes(message["bytes"])
            elif message.get("text") is not None:
                await upstream.send_str(message["text"])

    @staticmethod
    async def _server_to_client(upstream: Any, send: Any) -> None:
        import aiohttp

        async for message in upstream:
            if message.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": message.data})
            elif message.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": message.data})
            else:
                break
        code = upstream.close_code or 1000
        reason = ""
        if message_extra := getattr(upstream, "_close_message", None):  # not every aiohttp keeps it
            reason = str(message_extra)
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": code, "reason": reason[:120]})


# -- the deployment -------------------------------------------------------------------------------


def deployment(options: RayServeOptions) -> Any:
    """The bound Serve application (``serve.run(deployment(options))``). Imports Ray."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError('Ray Serve is not installed: pip install "moss-agent[ray]"') from exc

    gpus = options.device == "cuda" or (
        options.device == "auto" and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    )
    actor = {"num_gpus": 1} if gpus else {"num_cpus": options.cpus_per_replica}
    target = options.target_ongoing_requests or max(1.0, 0.75 * options.slots)

    def builder() -> ReplicaASGI:
        from moss_agent.service.ray_voices import store_name

        context = serve.get_replica_context()
        if context is None:
            return ReplicaASGI(options)
        return ReplicaASGI(options, replica=context.replica_id.unique_id,
                           voice_store=store_name(context.app_name, context.deployment))  # fmt: skip

    @serve.deployment(
        name=options.name,
        ray_actor_options=actor,
        max_ongoing_requests=options.slots,
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": target,
        },
        health_check_period_s=5,
    )  # fmt: skip
    @serve.ingress(builder)
    class MossSpeech:
        """One engine and its speech server (see ReplicaASGI)."""

    return MossSpeech.bind()  # type: ignore[attr-defined]


def build_app(args: dict[str, str]) -> Any:
    """The ``serve run moss_agent.service.ray_serve:build_app key=value ...`` builder."""
    return deployment(RayServeOptions.from_args(dict(args)))


def options_from_cli(
    args: Any,
    token: str | None,
    replicas: tuple[int, int] = (1, 1),
    voices: tuple[tuple[str, Any], ...] = (),
    batch_models: tuple[tuple[str, str], ...] = (),
) -> RayServeOptions:
    """RayServeOptions from ``moss-agent speech-server``'s engine options (``--model``, ``--codec``,
    ``--tiny``, ``--slots``, ``--max-seconds``, ``--min-seconds``, ``--greedy``, ``--seed``,
    ``--device``, ``--dtype``, ``--compile``, ``--max-input-chars``, ``--max-voice-seconds``) and its
    token; ``replicas``: (min, max); ``voices``: from :func:`read_voices`; ``batch_models``: from
    ``--batch-model`` (``parse_batch_models``)."""
    device = str(getattr(args, "device", None) or "auto")
    return RayServeOptions(
        model=None if args.tiny else args.model,
        codec=None if args.tiny else args.codec,
        tiny=bool(args.tiny),
        slots=int(args.slots),
        max_seconds=float(args.max_seconds),
        min_seconds=float(getattr(args, "min_seconds", None) or 0.0),
        greedy=bool(args.greedy),
        seed=args.seed,
        device="cuda" if device.startswith("cuda") else device,
        token=token,
        min_replicas=replicas[0],
        max_replicas=replicas[1],
        dtype=getattr(args, "dtype", None),
        compile=bool(getattr(args, "compile", False)),
        voices=voices,
        max_input_chars=int(getattr(args, "max_input_chars", 4096)),
        max_voice_seconds=float(getattr(args, "max_voice_seconds", 30.0)),
        max_waiting=getattr(args, "max_waiting", None),
        batch_models=tuple(batch_models),
    )


def deploy(
    options: RayServeOptions, host: str = "127.0.0.1", port: int = 8000, address: str | None = None
) -> str:
    """Connect to Ray (``address``: a cluster, e.g. ``auto``; None: a local instance), start Serve's
    HTTP proxy on ``host:port`` and deploy; returns the URL once every replica is up. Blocking."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError('Ray Serve is not installed: pip install "moss-agent[ray]"') from exc
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(options), name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def shutdown(options: RayServeOptions | None = None) -> None:
    """Remove the deployment and Serve (with ``options``: also the voice store of the deployment
    :func:`deploy` made with them), and disconnect from Ray (a local instance stops)."""
    import ray
    from ray import serve

    serve.shutdown()
    if options is not None:
        from moss_agent.service.ray_voices import remove_voice_store, store_name

        remove_voice_store(store_name(APP_NAME, options.name))
    ray.shutdown()
