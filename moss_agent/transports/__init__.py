"""Transports: where the user's audio comes from and the agent's audio goes.

- ``LocalAudio`` (``[local]``): microphone and speaker through sounddevice/PortAudio.
- ``WebRTCServer`` / ``WebRTCClient`` (``[webrtc]``): browsers or Python peers over aiortc.
- ``MqttWorker`` / ``MqttClient`` (``[mqtt]``): devices through an MQTT 5 broker, workers scale out.

Network servers call an injected ``async def handler(conn: Connection)`` once per client. The
transport classes are imported lazily, so ``import moss_agent.transports`` needs no extra.
"""

from __future__ import annotations

from moss_agent._lazy import lazy_exports
from moss_agent.transports.base import AudioInput, AudioOutput, PlaybackCallback
from moss_agent.transports.capture import QueueAudioInput
from moss_agent.transports.connection import Connection, ConnectionHandler, event_to_json
from moss_agent.transports.playback import FramePacer, PlaybackBuffer

_LAZY = {
    "LocalAudio": "moss_agent.transports.local",
    "list_devices": "moss_agent.transports.local",
    "WebRTCServer": "moss_agent.transports.webrtc",
    "restrict_ice_to_loopback": "moss_agent.transports.webrtc",
    "WebRTCClient": "moss_agent.transports.webrtc_client",
    "MqttWorker": "moss_agent.transports.mqtt",
    "MqttClient": "moss_agent.transports.mqtt",
    "MqttClientSession": "moss_agent.transports.mqtt",
    "MqttSettings": "moss_agent.transports.mqtt",
}

__all__ = [
    "AudioInput",
    "AudioOutput",
    "Connection",
    "ConnectionHandler",
    "FramePacer",
    "LocalAudio",
    "MqttClient",
    "MqttClientSession",
    "MqttSettings",
    "MqttWorker",
    "PlaybackBuffer",
    "PlaybackCallback",
    "QueueAudioInput",
    "WebRTCClient",
    "WebRTCServer",
    "event_to_json",
    "list_devices",
    "restrict_ice_to_loopback",
]


__getattr__ = lazy_exports(__name__, _LAZY)
