"""MossTTSLocal v1 (MOSS-TTS-Local-Transformer 1.7B): model and generation; prompts come from the Delay processor."""

from __future__ import annotations

from moss_agent.models.local.generation import generate_local
from moss_agent.models.local.model import MossTTSLocalModel
from moss_agent.models.local.tiny import save_tiny_local

__all__ = ["MossTTSLocalModel", "generate_local", "save_tiny_local"]
