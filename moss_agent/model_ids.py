"""Hugging Face hub ids of the released MOSS checkpoints: the one place the SDK, the CLI and the
examples take their defaults from. Any of them can be replaced by a local checkpoint folder."""

from __future__ import annotations

REALTIME_MODEL_ID = "OpenMOSS-Team/MOSS-TTS-Realtime"
"""MOSS-TTS-Realtime: streaming text-to-speech for voice agents (RealtimeEngine)."""

CODEC_MODEL_ID = "OpenMOSS-Team/MOSS-Audio-Tokenizer"
"""MOSS-Audio-Tokenizer: the 24 kHz codec every engine shares."""

TTS_MODEL_ID = "OpenMOSS-Team/MOSS-TTS"
"""MOSS-TTS (Delay, 8B): batch text-to-speech with voice cloning."""

TTS_LOCAL_MODEL_ID = "OpenMOSS-Team/MOSS-TTS-Local-Transformer"
"""MOSS-TTS Local (1.7B): the smaller batch text-to-speech model."""

DIALOGUE_MODEL_ID = "OpenMOSS-Team/MOSS-TTSD-v1.0"
"""MOSS-TTSD: multi-speaker dialogue."""

VOICE_DESIGN_MODEL_ID = "OpenMOSS-Team/MOSS-VoiceGenerator"
"""MOSS-VoiceGenerator: a voice made from a text description."""

SOUND_EFFECT_MODEL_ID = "OpenMOSS-Team/MOSS-SoundEffect"
"""MOSS-SoundEffect: sound effects from a text description."""
