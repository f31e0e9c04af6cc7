"""The speech server: the realtime engine shared over the network (``moss-agent speech-server``).

- :func:`create_app` / :func:`serve` (``app.py``): auth, request ids, ``/healthz``, ``/readyz``,
  ``/metrics``; :class:`ServiceConfig` (``config.py``).
- ``openai_speech.py``: ``POST /v1/audio/speech`` and the voice and model lists, as OpenAI defines them.
- ``sessions.py``: the streaming-text session WebSocket (``docs/speech-protocol.md``).
- ``metrics.py``: Prometheus metrics (``pip install "moss-agent[service]"``).

Importing this package imports aiohttp but no torch; the engine is passed in.
"""

from __future__ import annotations

from moss_agent.service.app import create_app, serve
from moss_agent.service.config import ServiceConfig
from moss_agent.service.voices import DEFAULT_VOICE, VoiceRegistry

__all__ = ["DEFAULT_VOICE", "ServiceConfig", "VoiceRegistry", "create_app", "serve"]
