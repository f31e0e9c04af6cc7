"""MossTTSDelay (MOSS-TTS 8B, MOSS-TTSD, MOSS-VoiceGenerator, MOSS-SoundEffect): model, prompts, generation."""

from __future__ import annotations

from moss_agent.models.delay.config import TTSModelConfig
from moss_agent.models.delay.dialogue import normalize_dialogue
from moss_agent.models.delay.generation import GeneratedSample, StepCallback, generate_delay
from moss_agent.models.delay.model import MossTTSDelayModel
from moss_agent.models.delay.normalize import normalize_tts_text
from moss_agent.models.delay.pattern import apply_delay, remove_delay, rows_to_segments, split_segments
from moss_agent.models.delay.processor import AUDIO_PLACEHOLDER, BatchPrompt, Message, TTSProcessor
from moss_agent.models.delay.requests import (
    FRAMES_PER_SECOND,
    DialogueRequest,
    Request,
    SoundEffectRequest,
    TTSRequest,
    VoiceDesignRequest,
    prepare_batch,
)
from moss_agent.models.delay.tiny import save_tiny_delay

__all__ = [
    "AUDIO_PLACEHOLDER",
    "FRAMES_PER_SECOND",
    "BatchPrompt",
    "DialogueRequest",
    "GeneratedSample",
    "Message",
    "MossTTSDelayModel",
    "Request",
    "SoundEffectRequest",
    "StepCallback",
    "TTSModelConfig",
    "TTSProcessor",
    "TTSRequest",
    "VoiceDesignRequest",
    "apply_delay",
    "generate_delay",
    "normalize_dialogue",
    "normalize_tts_text",
    "prepare_batch",
    "remove_delay",
    "rows_to_segments",
    "save_tiny_delay",
    "split_segments",
]
