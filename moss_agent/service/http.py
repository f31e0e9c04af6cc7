"""HTTP helpers of the speech server: OpenAI-shaped errors and size-limited request bodies.

Every error the server answers has OpenAI's shape, so the official ``openai`` client raises its
usual exception types (``BadRequestError`` for 400, ``AuthenticationError`` for 401,
``NotFoundError`` for 404, ``InternalServerError`` for 5xx...)::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "voice", "code": "voice_not_found"}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from moss_agent.errors import TransportError
from moss_agent.wire import JsonDict, decode_json_object

# OpenAI's error types, by status.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"


class ApiError(Exception):
    """An HTTP error answered as OpenAI answers it; ``headers`` go on the response (``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or (SERVER_ERROR if status >= 500 else INVALID_REQUEST)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> JsonDict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


async def read_body(request: web.Request, limit: int, *, what: str = "request body") -> bytes:
    """The request body, refused with 413 as soon as it is over ``limit`` bytes (never read whole)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ApiError(
            413, f"{what} is {declared} bytes; at most {limit} are accepted", code="body_too_large"
        )
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"{what} is larger than {limit} bytes", code="body_too_large")
    return bytes(data)


async def read_json(request: web.Request, limit: int) -> JsonDict:
    """A JSON object body through the guarded decoder; 400 ``invalid_json`` when it is not one."""
    content_type = request.content_type
    if content_type not in ("application/json", "application/octet-stream", "text/plain", ""):
        raise ApiError(
            415, f"expected a JSON body (Content-Type: application/json), got {content_type}",
            code="unsupported_media_type",
        )  # fmt: skip
    data = await read_body(request, limit)
    try:
        return decode_json_object(data, what="request body", max_bytes=limit, error=TransportError)
    except TransportError as exc:
        raise ApiError(400, str(exc), code="invalid_json") from None
