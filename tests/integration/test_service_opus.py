"""The session protocol's ``opus`` encoding over real sockets, on one tiny engine (greedy, so the same
conversation gives the same samples whatever its encoding): the decoded audio follows the PCM audio,
frame by frame, across an interrupted turn; hostile or broken Opus costs a typed error, never the
socket; ``Session`` runs unchanged on ``RemoteSpeechBackend(encoding="opus")``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from service_engine import endless_engine

from moss_agent import speech_protocol as sp
from moss_agent.client import RemoteSpeechBackend
from moss_agent.engine.realtime import RealtimeEngine
from moss_agent.errors import AudioError, ConfigError
from moss_agent.events import AudioChunk
from moss_agent.opus import OpusFrameDecoder, OpusFrameEncoder, opus_available
from moss_agent.service.sessions import session_server
from moss_agent.streaming.session import Session
from moss_agent.streaming.tts import UserTurn

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not opus_available(), reason="this PyAV has no libopus"),
]

FRAME_S = 0.08
FRAME = 1920
CAP = 16
LAG = 156  # libopus's lookahead at 24 kHz (6.5 ms): decoded audio trails the input by it
RNG = np.random.default_rng(11)
VOICE = (0.1 * RNG.standard_normal(12000)).astype(np.float32)
USER_AUDIO = (0.1 * RNG.standard_normal(9600)).astype(np.float32)
TEXT = ["The opus ", "stream carries ", "the same speech."]


def correlation(reference: np.ndarray, decoded: np.ndarray) -> float:
    """Normalised correlation of ``reference`` with ``decoded`` shifted back by the codec's lookahead."""
    a, b = reference[: len(reference) - LAG], decoded[LAG:]
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_realtime_endless_dir: Path, tiny_codec_dir: Path) -> AsyncIterator[RealtimeEngine]:
    async with endless_engine(tiny_realtime_endless_dir, tiny_codec_dir, CAP) as loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url(engine: RealtimeEngine) -> AsyncIterator[str]:
    async with session_server(engine) as address:
        yield address


async def cut_then_full(
    backend: RemoteSpeechBackend, voice: np.ndarray, user_audio: np.ndarray
) -> tuple[list[AudioChunk], list[AudioChunk]]:
    """Turn 1 is read for 5 frames and interrupted there; turn 2 (after user audio) plays to its cap."""
    conversation = await backend.open_conversation(system_prompt="Be brief.", voice_prompt=voice)
    first = await conversation.start_turn(None, turn_id=1)
    for delta in TEXT:
        await first.push_text(delta)
    await first.end_input()
    cut = [await anext(first) for _ in range(5)]
    heard = await first.interrupt(5 * FRAME_S)
    assert heard.frames == 5
    second = await conversation.start_turn(UserTurn("Go on.", user_audio), turn_id=2)
    await second.push_text("And the second turn follows it.")
    await second.end_input()
    full = [chunk async for chunk in second]
    await conversation.aclose()
    return cut, full


async def test_opus_audio_follows_the_pcm_audio_frame_by_frame_across_an_interrupt(url: str) -> None:
    # The reference is pcm_f32le (pcm_s16le would clip the tiny model's loud samples, Opus does not).
    # An opus conversation uploads its voice and user audio as pcm_s16le: the reference uploads them
    # already rounded to 16 bits, so the engine gets the same input and makes the same samples.
    voice, user_audio = sp.quantize(VOICE, "pcm_s16le"), sp.quantize(USER_AUDIO, "pcm_s16le")
    async with RemoteSpeechBackend(url, encoding="pcm_f32le") as pcm_backend:
        pcm_cut, pcm_full = await cut_then_full(pcm_backend, voice, user_audio)
    async with RemoteSpeechBackend(url, encoding="opus", opus_bitrate=128_000) as opus_backend:
        opus_cut, opus_full = await cut_then_full(opus_backend, VOICE, USER_AUDIO)
    for opus_chunks, pcm_chunks, turn in ((opus_cut, pcm_cut, 1), (opus_full, pcm_full, 2)):
        assert [c.frame_index for c in opus_chunks] == [c.frame_index for c in pcm_chunks]
        assert [c.frame_index for c in opus_chunks] == list(range(len(pcm_chunks)))
        assert all(
            c.turn_id == turn and c.pcm.dtype == np.float32 and len(c.pcm) == FRAME for c in opus_chunks
        )
        reference = np.concatenate([c.pcm for c in pcm_chunks])
        decoded = np.concatenate([c.pcm for c in opus_chunks])
        # The tiny random model makes loud broadband noise (peaks near 5), the hardest input for a
        # perceptual codec: measured 0.54 at 32 kbit/s and 0.999 at 128 kbit/s, hence 128 here. Turn 2
        # matching as well as turn 1 shows its fresh encoder and decoder: a decoder carried over from
        # the cut turn gives about 0.62 on such noise at 128 kbit/s.
        assert correlation(reference, decoded) > 0.98, f"turn {turn}: {correlation(reference, decoded):.3f}"
    assert len(opus_full) == CAP


async def test_speech_round_trips_at_the_default_bitrate() -> None:
    """The codec itself on speech-like audio (harmonics under a syllable envelope), not the model's noise."""
    t = np.arange(40 * FRAME) / 24000
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 24000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    speech = (0.2 * voiced * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2).astype(np.float32)
    encoder, decoder = OpusFrameEncoder(24000, FRAME), OpusFrameDecoder(24000, FRAME)
    sizes, encode_s, decoded = [], 0.0, []
    for start in range(0, len(speech), FRAME):
        began = time.perf_counter()
        packet = encoder.encode(speech[start : start + FRAME])
        encode_s += time.perf_counter() - began
        sizes.append(len(packet))
        decoded.append(decoder.decode(packet))
    # 32 kbit/s is 320 bytes per 80 ms (VBR: some more, some less) against 3,840 as pcm_s16le
    assert 150 < np.mean(sizes) < 400, sizes
    # measured 0.989 on this signal (0.94-0.99 on espeak-ng sentences); 0.95 leaves room for other libopus builds
    assert correlation(speech, np.concatenate(decoded)) > 0.95


async def test_opus_frames_on_the_wire_and_bad_opus_gets_typed_errors(url: str) -> None:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url + sp.PATH)
    hello = json.loads((await ws.receive()).data)
    assert "opus" in hello["encodings"]

    async def reply() -> dict[str, Any]:
        while True:
            msg = await asyncio.wait_for(ws.receive(), 5)
            if msg.type == aiohttp.WSMsgType.TEXT:
                message = json.loads(msg.data)
                if message["type"] != "words":
                    return message  # type: ignore[no-any-return]

    # a bitrate out of bounds; an opus-labelled upload (uploads are pcm_s16le): errors, the socket lives
    await ws.send_json({"type": "open", "id": 1, "encoding": "opus", "opus_bitrate": 1000})
    refused = await reply()
    assert (
        refused["code"] == "bad_message"
        and "'opus_bitrate' must be an integer in [6000, 128000]" in refused["message"]
    )
    await ws.send_json({"type": "open", "id": 2, "encoding": "opus",
                        "voice_audio": {"samples": 4800, "sample_rate": 24000}})  # fmt: skip
    await ws.send_bytes(sp.pack_frame(sp.KIND_UPLOAD, "opus", 2, 0, 0, b"\xff\xff\xff"))
    refused = await reply()
    assert (refused["id"], refused["code"]) == (2, "bad_message") and "in pcm_s16le" in refused["message"]

    await ws.send_json({"type": "open", "id": 3, "encoding": "opus", "opus_bitrate": 24000})
    opened = await reply()
    assert (opened["type"], opened["encoding"], opened["opus_bitrate"]) == ("opened", "opus", 24000)
    turn = {"conversation": opened["conversation"], "turn": 1}
    await ws.send_json({"type": "turn.start", "id": 4, **turn, "window": CAP})
    await ws.send_json({"type": "text", "id": 5, **turn, "delta": "Twenty-four kilobits."})
    await ws.send_json({"type": "end_input", "id": 6, **turn})
    decoder, frames, sizes = OpusFrameDecoder(24000, FRAME), [], []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type == aiohttp.WSMsgType.TEXT:
            if json.loads(msg.data)["type"] == "turn.end":
                break
            continue
        frame = sp.unpack_frame(msg.data)
        assert (frame.kind, frame.encoding, frame.a, frame.b) == (
            sp.KIND_AUDIO,
            "opus",
            turn["conversation"],
            1,
        )
        frames.append(frame.c)
        await ws.send_json({"type": "credit", **turn, "frames": 1})  # the server waits for credit to end
        sizes.append(len(frame.payload))
        assert len(decoder.decode(frame.payload)) == FRAME
    assert frames == list(range(CAP))
    assert np.mean(sizes) < 24000 * FRAME_S / 8 * 1.5, sizes  # about 240 bytes a frame (VBR)
    await ws.send_json({"type": "ping", "id": 7})
    assert (await reply())["type"] == "pong"
    await ws.close()
    await http.close()


async def test_the_decoder_refuses_broken_packets_and_goes_on() -> None:
    encoder, decoder = OpusFrameEncoder(24000, FRAME), OpusFrameDecoder(24000, FRAME)
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(FRAME) / 24000)).astype(np.float32)
    twenty_ms = OpusFrameEncoder(24000, 480).encode(tone[:480])
    for bad, words in [(b"", "empty"), (b"\xff\xff\xff", "malformed"), (twenty_ms, "of 20 ms")]:
        with pytest.raises(AudioError, match=words):
            decoder.decode(bad)
        assert len(decoder.decode(encoder.encode(tone))) == FRAME  # still usable
    with pytest.raises(ConfigError, match="opus_bitrate"):
        OpusFrameEncoder(24000, FRAME, bitrate=1_000_000)
    with pytest.raises(ConfigError, match="Opus cannot carry"):
        OpusFrameDecoder(22050, 1764)


async def test_a_bad_packet_from_the_server_fails_its_turn_not_the_socket(url: str) -> None:
    async with RemoteSpeechBackend(url, encoding="opus") as backend:
        conversation = await backend.open_conversation()
        stream = await conversation.start_turn(None, turn_id=1)
        await stream.push_text("A turn whose audio gets corrupted on the way.")
        await stream.end_input()
        assert len((await anext(stream)).pcm) == FRAME
        conn = conversation.conn
        conn._on_audio(
            sp.unpack_frame(sp.pack_frame(sp.KIND_AUDIO, "opus", conversation.cid, 1, 1, b"\xff\xff\xff"))
        )
        with pytest.raises(AudioError, match="malformed Opus packet"):
            async for _chunk in stream:
                pass
        await stream.interrupt(FRAME_S)
        assert conn.alive
        after = await conversation.start_turn(None, turn_id=2)
        await after.push_text("And the next turn decodes.")
        await after.end_input()
        assert [c.frame_index for c in [chunk async for chunk in after]] == list(range(CAP))
        await conversation.aclose()


class InstantOutput:
    """A speaker that plays at once and keeps what it played, per turn."""

    sample_rate = 24000

    def __init__(self) -> None:
        self.played: dict[int, list[np.ndarray]] = {}

    async def write(self, chunk: AudioChunk) -> None:
        self.played.setdefault(chunk.turn_id, []).append(chunk.pcm)

    async def flush(self) -> None:
        return None

    def clear(self) -> None:
        return None

    def played_s(self, turn_id: int) -> float:
        return sum(len(pcm) for pcm in self.played.get(turn_id, [])) / self.sample_rate

    def on_progress(self, callback: Any) -> None:
        return None


async def test_a_session_runs_unchanged_on_an_opus_backend(url: str) -> None:
    output = InstantOutput()
    async with (
        RemoteSpeechBackend(url, encoding="opus") as backend,
        Session(backend, output=output) as session,
    ):
        result = await asyncio.wait_for(session.say("Spoken through Opus, end to end."), 20)
    assert result.error is None and not result.interrupted
    assert result.audio_s == pytest.approx(CAP * FRAME_S)
    played = np.concatenate(next(iter(output.played.values())))
    assert len(played) == CAP * FRAME and np.abs(played).max() > 0.01
