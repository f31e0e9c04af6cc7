"""Fixtures shared by the integration tests (defined in helper modules that import nothing optional)."""

from __future__ import annotations

from jack_audio import jack_server

__all__ = ["jack_server"]
