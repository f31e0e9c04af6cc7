"""The speech server's aiohttp application: auth, request ids, health, metrics, and the API routes.

``create_app(engine, config)`` builds it; :func:`serve` runs it on a socket (``moss-agent
speech-server`` does both). Routes:

- ``GET /healthz``: liveness, never authenticated (the process answers).
- ``GET /readyz``: 200 once the engine is warm and healthy; 503 while it warms up, after it failed
  for good (``engine.failure``) or after it was closed.
- ``GET /metrics``: Prometheus text (``moss_agent.service.metrics``).
- ``/v1/...``: the OpenAI-compatible speech API (``moss_agent.service.openai_speech``).
- the speech session WebSocket (``moss_agent.service.sessions``).

Auth: with ``ServiceConfig.token`` every route but ``/healthz`` wants ``Authorization: Bearer
TOKEN`` (compared in constant time); without one the server is open. Every request gets a request
id: the client's ``X-Request-Id`` when it is a sane one (1-128 printable characters), else a new
one; it is on the response's ``X-Request-Id``, in ``request_id(request)`` and in the log lines
(``extra={"request_id": ...}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from moss_agent.errors import EngineError
from moss_agent.service.config import ServiceConfig
from moss_agent.service.http import UNAVAILABLE, ApiError
from moss_agent.service.metrics import CONTENT_TYPE, ServiceMetrics
from moss_agent.service.voices import SharedVoices, VoiceRegistry

log = logging.getLogger(__name__)

ENGINE = web.AppKey("moss_engine", Any)
CONFIG = web.AppKey("moss_service_config", ServiceConfig)
METRICS = web.AppKey("moss_metrics", ServiceMetrics)
VOICES = web.AppKey("moss_voices", VoiceRegistry)
SHARED_VOICES = web.AppKey("moss_shared_voices", SharedVoices)

PUBLIC_PATHS = frozenset({"/healthz"})
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServiceState:
    """What the app knows about its engine beyond the engine itself."""

    def __init__(self) -> None:
        self.warm = False  # the engine's start() returned (its first tick was compiled or captured)
        self.start_error: str | None = None  # why start() failed
        self.settled = asyncio.Event()  # warm, or failed to start


STATE = web.AppKey("moss_service_state", ServiceState)
REQUEST_ID = web.RequestKey("moss_request_id", str)
# A streaming handler sets it once its last byte left: a client that hangs up after that did not
# cut the request short, so the request counts with this status rather than 499.
SENT = web.RequestKey("moss_response_sent", int)


def request_id(request: web.Request) -> str:
    """The request's id (see the module docstring); "" outside this app's middleware."""
    return request.get(REQUEST_ID, "")


def create_app(
    engine: Any,
    config: ServiceConfig | None = None,
    *,
    voices: VoiceRegistry | None = None,
    metrics: ServiceMetrics | None = None,
    sessions: bool = True,
    shared_voices: SharedVoices | None = None,
) -> web.Application:
    """The server on ``engine`` (a started or not yet started ``RealtimeEngine``: the app starts it
    in the background, and answers ``/readyz`` and speech with 503 until it is warm; closing the
    engine stays the caller's business). ``voices``: reference speech by name (default: only the
    model's own voice). ``sessions``: also serve the speech session WebSocket. ``shared_voices``:
    where uploads and deletes go so that other servers see them, mirrored into ``voices`` (the Ray
    Serve replicas; default: an upload stays in ``voices``).

    Run it with :func:`serve`, or with an ``AppRunner(app, handler_cancellation=True)``: a client
    that disconnects must cancel its handler so that its engine slot is freed at once.
    """
    config = config or ServiceConfig()
    from moss_agent.service.openai_speech import add_openai_routes

    largest = max(config.max_body_bytes, config.max_voice_bytes + 64 * 1024)
    app = web.Application(middlewares=[_request_context, _auth], client_max_size=largest)
    app[ENGINE] = engine
    app[CONFIG] = config
    app[METRICS] = metrics or ServiceMetrics(engine)
    app[VOICES] = voices if voices is not None else VoiceRegistry(engine.sample_rate,
                                                                   max_uploaded=config.max_uploaded_voices)  # fmt: skip
    if shared_voices is not None:
        app[SHARED_VOICES] = shared_voices
    app[STATE] = ServiceState()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    add_openai_routes(app)
    if sessions:
        # The speech session WebSocket (moss_agent.service.sessions) on the same engine, voices and metrics.
        from moss_agent.service.sessions import add_session_routes

        add_session_routes(app)
    app.on_response_prepare.append(_stamp_request_id)
    app.cleanup_ctx.append(_engine_lifecycle)
    return app


# -- middleware ----------------------------------------------------------------------------------


@web.middleware
async def _request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, OpenAI-shaped errors, one structured log line and a count per request."""
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    metrics = request.app[METRICS]
    route = _route_name(request)
    began = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:  # whoever raised it counted it (a rejection, an engine error)
        status = exc.status
        return exc.response()
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        error = ApiError(exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_"),
                         headers={k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")})  # fmt: skip
        return error.response()
    except asyncio.CancelledError:
        status = request.get(SENT, 499)  # 499: the client went away before the end
        raise
    except Exception:
        log.exception("request failed", extra={"request_id": request_id, "path": request.path})
        metrics.error("internal")
        return ApiError(
            500, f"internal server error (request {request_id})", code="internal_error"
        ).response()
    finally:
        metrics.request(route, status)
        log.info(
            "request",
            extra={"request_id": request_id, "method": request.method, "route": route, "status": status,
                   "seconds": round(time.monotonic() - began, 4)},
        )  # fmt: skip


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[CONFIG].token
    if token is None or request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
        request.app[METRICS].rejected("auth")
        message = "missing bearer token" if not header else "invalid bearer token"
        raise ApiError(
            401, f"{message}: send Authorization: Bearer TOKEN with this server's token",
            type="invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    return await handler(request)


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    given = request.get(REQUEST_ID)
    if given:
        response.headers["X-Request-Id"] = given


def _route_name(request: web.Request) -> str:
    """The route's pattern (``/v1/audio/voices/{voice_id}``), never the raw path: bounded label values."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# -- engine lifecycle ----------------------------------------------------------------------------


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    engine, metrics, state = app[ENGINE], app[METRICS], app[STATE]

    def failed(error: BaseException) -> None:
        metrics.error("engine_failure")
        log.error("the engine failed; /readyz reports unready until the server is restarted",
                  extra={"error": str(error)[:300]})  # fmt: skip

    if hasattr(engine, "on_failure"):
        engine.on_failure(failed)

    async def warm_up() -> None:
        # In the background: the server answers /healthz, and /readyz with 503, while the engine
        # compiles or captures its step (a minute with --compile on a CPU).
        start = getattr(engine, "start", None)
        try:
            if start is not None:
                await start()
        except Exception as exc:
            state.start_error = f"{type(exc).__name__}: {exc}"
            metrics.error("engine_start")
            log.exception("the engine could not start; /readyz reports why")
        else:
            state.warm = True
            log.info("the engine is warm; /readyz reports ready")
        state.settled.set()

    tasks = [
        asyncio.create_task(warm_up(), name="moss-engine-warm-up"),
        asyncio.create_task(_sample(metrics, app[CONFIG].metrics_interval_s), name="moss-metrics-sampler"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def wait_until_warm(app: web.Application) -> None:
    """Return once the app's engine is warm; raise EngineError if it could not start."""
    state = app[STATE]
    await state.settled.wait()
    if state.start_error is not None:
        raise EngineError(f"the engine could not start: {state.start_error}")


async def _sample(metrics: ServiceMetrics, interval_s: float) -> None:
    while True:
        metrics.sample_engine()
        await asyncio.sleep(interval_s)


# -- health and metrics --------------------------------------------------------------------------


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def unready_reason(app: web.Application) -> str | None:
    """Why the engine cannot serve now, or None when it can."""
    engine = app[ENGINE]
    failure = getattr(engine, "failure", None)
    if failure is not None:
        return f"the engine failed: {failure}"
    if app[STATE].start_error is not None:
        return f"the engine could not start: {app[STATE].start_error}"
    if not getattr(engine, "healthy", True):
        return "the engine is closed"
    if not app[STATE].warm:
        return "the engine is warming up"
    return None


async def _readyz(request: web.Request) -> web.Response:
    reason = unready_reason(request.app)
    engine = request.app[ENGINE]
    if reason is not None:
        raise ApiError(503, reason, type=UNAVAILABLE, code="not_ready")
    return web.json_response({
        "status": "ready",
        "free_slots": getattr(engine, "free_slots", None),
        "waiting": getattr(engine, "waiting", None),
    })  # fmt: skip


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    metrics.sample_engine()
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


# -- running -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Run ``app`` on ``host:port`` (0: a free port), or on the listening socket ``sock``; yields
    ``http://host:port``. A client that disconnects cancels its handler (``handler_cancellation``),
    which frees its slot."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site: web.BaseSite = (
            web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, host, port)
        )
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        if sock is not None:
            host = bound_host
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound_port}"
    finally:
        await runner.cleanup()
