"""MOSS-TTS-Realtime: model, checkpoint loading, prompt rows and the batched streaming generator.

``load_realtime(path_or_id, device=None, dtype=None, attn_implementation=None) -> (model, tokenizer)``
loads the official checkpoint layout; ``RealtimeGenerator`` runs many conversations at once (see
``moss_agent.models.realtime.generator`` for the API); ``save_tiny_realtime`` writes a small random
checkpoint for tests and benchmarks.
"""

from __future__ import annotations

from moss_agent.models.realtime.config import DELAY_TOKENS, LocalConfig, RealtimeConfig
from moss_agent.models.realtime.generator import RealtimeGenerator, StepOutput
from moss_agent.models.realtime.model import BackboneCache, MossTTSRealtime, load_realtime
from moss_agent.models.realtime.prompt import EncodedTurn, PromptBuilder
from moss_agent.models.realtime.state import ContextLayout, GenerationState
from moss_agent.models.realtime.text import GrowingTextTokenizer, UpstreamSegmentTokenizer
from moss_agent.models.realtime.tiny import save_tiny_realtime
from moss_agent.models.sampling import SamplingConfig

__all__ = [
    "DELAY_TOKENS",
    "BackboneCache",
    "ContextLayout",
    "EncodedTurn",
    "GenerationState",
    "GrowingTextTokenizer",
    "LocalConfig",
    "MossTTSRealtime",
    "PromptBuilder",
    "RealtimeConfig",
    "RealtimeGenerator",
    "SamplingConfig",
    "StepOutput",
    "UpstreamSegmentTokenizer",
    "load_realtime",
    "save_tiny_realtime",
]
