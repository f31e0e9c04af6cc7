"""One place that loads shared model components once per process.

    registry = ModelRegistry()
    realtime = registry.realtime_engine("OpenMOSS-Team/MOSS-TTS-Realtime")
    batch = registry.batch_engine("OpenMOSS-Team/MOSS-TTS")
    assert realtime.codec is batch.codec          # MOSS-Audio-Tokenizer held once on the device

Components are keyed by (resolved folder, device, dtype): asking again with the same key returns
the same instance, so a realtime agent and batch jobs in one process share the codec's weights.
Every engine of one device gets that device's one ``DeviceThread``: realtime ticks, codec steps and
batch jobs all run there (batch work yields to realtime ticks), so no two threads touch a model.
``close()`` ends those threads.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moss_agent.engine.device import DeviceThread
from moss_agent.model_ids import CODEC_MODEL_ID, REALTIME_MODEL_ID
from moss_agent.models.loading import pick_device, pick_dtype, resolve_checkpoint

if TYPE_CHECKING:
    from moss_agent.engine.batch import BatchEngine
    from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
    from moss_agent.models.codec import MossAudioTokenizer
    from moss_agent.models.tts_loading import LoadedTTS

log = logging.getLogger(__name__)


_Key = tuple[str, str, str]


class ModelRegistry:
    """Loads each codec / batch model once per (folder, device, dtype) and hands out the same object.

    ``device`` and ``dtype`` are the defaults for components asked for without them (CUDA and
    bf16 when present, else CPU and fp32). Thread-safe: concurrent requests load once.
    """

    def __init__(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> None:
        self.device = _indexed(pick_device(device))
        self.dtype = dtype
        self._codecs: dict[_Key, MossAudioTokenizer] = {}
        self._tts: dict[_Key, LoadedTTS] = {}
        self._threads: dict[str, DeviceThread] = {}
        self._lock = threading.Lock()

    def device_thread(self, device: str | torch.device | None = None) -> DeviceThread:
        """The one thread that owns ``device``'s models (made on first use, started by its engines)."""
        key = str(_indexed(pick_device(device)) if device is not None else self.device)
        with self._lock:
            if key not in self._threads:
                self._threads[key] = DeviceThread(f"moss-device-{key}")
            return self._threads[key]

    def close(self) -> None:
        """End the device threads (after their engines are closed); queued work fails with EngineError."""
        with self._lock:
            threads, self._threads = list(self._threads.values()), {}
        for thread in threads:
            thread.stop()

    def _key(
        self, path_or_id: str | Path, device: str | torch.device | None, dtype: str | torch.dtype | None
    ) -> _Key:
        folder = resolve_checkpoint(path_or_id).resolve()
        torch_device = _indexed(pick_device(device)) if device is not None else self.device
        torch_dtype = pick_dtype(dtype if dtype is not None else self.dtype, torch_device)
        return str(folder), str(torch_device), str(torch_dtype).removeprefix("torch.")

    def codec(
        self,
        path_or_id: str | Path = CODEC_MODEL_ID,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> MossAudioTokenizer:
        """The MOSS-Audio-Tokenizer for this key, loaded on first use."""
        from moss_agent.models.codec import load_codec

        key = self._key(path_or_id, device, dtype)
        with self._lock:
            if key not in self._codecs:
                self._codecs[key] = load_codec(key[0], device=key[1], dtype=key[2])
                log.info("codec loaded", extra={"folder": key[0], "device": key[1], "dtype": key[2]})
            return self._codecs[key]

    def tts(
        self,
        path_or_id: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> LoadedTTS:
        """A batch TTS model (Delay or Local) for this key, loaded on first use."""
        from moss_agent.models.tts_loading import load_tts

        key = self._key(path_or_id, device, dtype)
        with self._lock:
            if key not in self._tts:
                self._tts[key] = load_tts(key[0], device=key[1], dtype=key[2])
            return self._tts[key]

    def batch_engine(
        self,
        model: str | Path,
        codec: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        codec_dtype: str | torch.dtype | None = None,
        **options: Any,
    ) -> BatchEngine:
        """A BatchEngine on the registry's model and codec. ``codec`` defaults to the one the
        checkpoint names (processor_config.json), else MOSS-Audio-Tokenizer. ``options`` go to BatchEngine."""
        from moss_agent.engine.batch import BatchEngine

        tts = self.tts(model, device=device, dtype=dtype)
        codec_model = self.codec(
            codec or tts.codec_name_or_path or CODEC_MODEL_ID, device=tts.model.device, dtype=codec_dtype
        )
        return BatchEngine(tts, codec_model, device_thread=self.device_thread(tts.model.device), **options)

    def realtime_engine(
        self,
        model: str | Path = REALTIME_MODEL_ID,
        codec: str | Path = CODEC_MODEL_ID,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        codec_dtype: str | torch.dtype | None = None,
        config: RealtimeEngineConfig | None = None,
        attn_implementation: str | None = None,
    ) -> RealtimeEngine:
        """A new RealtimeEngine (engines own their slots, so each call builds one) on the shared codec."""
        from moss_agent.engine.realtime import RealtimeEngine

        torch_device = pick_device(device) if device is not None else self.device
        return RealtimeEngine.load(
            model,
            self.codec(codec, device=torch_device, dtype=codec_dtype),
            device=torch_device,
            dtype=dtype if dtype is not None else self.dtype,
            config=config,
            attn_implementation=attn_implementation,
            device_thread=self.device_thread(torch_device),
        )

    def loaded(self) -> dict[str, list[_Key]]:
        """What is held: {"codec": [keys], "tts": [keys]}."""
        with self._lock:
            return {"codec": list(self._codecs), "tts": list(self._tts)}


def _indexed(device: torch.device) -> torch.device:
    """ "cuda" and "cuda:0" name one device: key by the explicit index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


__all__ = ["ModelRegistry"]
