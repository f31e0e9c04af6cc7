"""Adapters that put MOSS-TTS-Realtime into other voice-agent frameworks (optional extras).

- ``moss_agent.integrations.pipecat``: a pipecat TTS service (``pip install "moss-agent[pipecat]"``).
- ``moss_agent.integrations.livekit``: a LiveKit Agents TTS plugin (``pip install "moss-agent[livekit]"``).

Import the submodule you need; this package imports no framework, and none of it imports torch.
"""
