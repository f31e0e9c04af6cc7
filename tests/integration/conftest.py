"""Fixtures shared by the integration tests (defined in helper modules that import nothing optional)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jack_audio import jack_server

__all__ = ["cache", "jack_server"]


@pytest.fixture
def cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_realtime_dir: Path, tiny_codec_dir: Path
) -> Path:
    """The CLI's cache, holding the session's tiny realtime checkpoints (``--tiny`` makes none anew)."""
    root = tmp_path / "cache"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "realtime").symlink_to(tiny_realtime_dir)
    (root / "tiny" / "codec").symlink_to(tiny_codec_dir)
    monkeypatch.setenv("MOSS_AGENT_CACHE", str(root))
    return root
