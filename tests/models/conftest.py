"""Fixtures shared across tests/models (defined in shared_fixtures.py so other folders can import them)."""

from __future__ import annotations

from tests.models.shared_fixtures import cases, goldens, loaded, model_dir, one_thread, tokenizer

__all__ = ["cases", "goldens", "loaded", "model_dir", "one_thread", "tokenizer"]
