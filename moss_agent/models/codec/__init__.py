"""MOSS-Audio-Tokenizer (the codec shared by every MOSS-TTS engine): our own PyTorch implementation.

    codec = load_codec("OpenMOSS-Team/MOSS-Audio-Tokenizer")       # or a local folder
    codes, code_lengths = codec.encode(wav)                          # wav [B, 1, T] at 24 kHz
    wav, wav_lengths = codec.decode(codes)                           # codes [nq, B, N]
    codes, code_lengths, latents = codec.encode_chunked(wav, chunk_duration=8.0)  # long files,
    wav, wav_lengths = codec.decode_chunked(codes, chunk_duration=8.0)            # bounded memory
    state = codec.init_decode_state(batch_size=16)                   # 16 independent streams
    chunk = codec.decode_step(codes_t, state, active)                # [B, 1, T*1920] per step
"""

from __future__ import annotations

from moss_agent.models.codec.checkpoint import build_codec, load_codec
from moss_agent.models.codec.config import CodecConfig, make_config_dict, published_config_dict
from moss_agent.models.codec.model import MossAudioTokenizer
from moss_agent.models.codec.streaming import CodecStreamState, SampleFramer

__all__ = [
    "CodecConfig",
    "CodecStreamState",
    "MossAudioTokenizer",
    "SampleFramer",
    "build_codec",
    "load_codec",
    "make_config_dict",
    "published_config_dict",
]
