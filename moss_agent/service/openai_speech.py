"""OpenAI's speech API on the realtime engine: ``POST /v1/audio/speech``, ``GET /v1/models``."""

from __future__ import annotations

from aiohttp import web


def add_openai_routes(app: web.Application) -> None:
    from moss_agent.service.app import CONFIG

    async def models(request: web.Request) -> web.Response:
        config = request.app[CONFIG]
        data = [{"id": name, "object": "model", "owned_by": "moss-agent"} for name in config.model_names]
        return web.json_response({"object": "list", "data": data})

    app.router.add_get("/v1/models", models)
