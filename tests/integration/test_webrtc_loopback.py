"""WebRTCServer against real aiortc peers on 127.0.0.1: audio both ways, pacing, clear(), signaling errors."""

from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest

pytest.importorskip("aiortc")
aiohttp = pytest.importorskip("aiohttp")

from transport_signals import (  # noqa: E402
    agent_tone_hz,
    dominant_hz,
    mic_tone_hz,
    tone_agent,
    tone_chunks,
    windows_dominated_by,
)

from moss_agent.errors import ConfigError, TransportError  # noqa: E402
from moss_agent.transports.connection import Connection  # noqa: E402
from moss_agent.transports.webrtc import WebRTCServer, ice_servers_from_urls  # noqa: E402
from moss_agent.transports.webrtc_client import WebRTCClient  # noqa: E402

TOKEN = "test-token-123"
RATE = 24_000
TIMEOUT_S = 30


@pytest.fixture
async def server():
    async with WebRTCServer(tone_agent, token=TOKEN, loopback_only=True, input_rate=RATE) as srv:
        yield srv


async def next_event(client: WebRTCClient, kind: str) -> dict:
    async for event in client.events():
        if event["type"] == kind:
            return event
    raise AssertionError(f"connection closed before a {kind!r} event")


async def collect_until(client: WebRTCClient, store: list[np.ndarray], done) -> None:
    async for chunk in client.input:
        store.append(chunk.pcm)
        if done(np.concatenate(store)):
            return


async def run_call(url: str, client_id: str) -> tuple[np.ndarray, dict, list[tuple[int, int, int]]]:
    frames: list[tuple[int, int, int]] = []
    client = WebRTCClient(
        url,
        token=TOKEN,
        client_id=client_id,
        loopback_only=True,
        on_frame=lambda f: frames.append((f.pts, f.samples, f.sample_rate)),
    )
    async with client:
        hello = await next_event(client, "hello")
        assert hello["client"] == client_id
        mic = asyncio.create_task(
            _write_all(client, tone_chunks(mic_tone_hz(client_id), 6.0, 48_000, turn_id=-1))
        )
        received: list[np.ndarray] = []
        freq = agent_tone_hz(client_id)
        await collect_until(client, received, lambda pcm: windows_dominated_by(pcm, RATE, freq) >= 10)
        report: dict = {}
        while report.get("seconds", 0.0) < 0.5:
            await client.send_control({"type": "text", "text": "report"})
            report = await next_event(client, "report")
        mic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await mic
        await client.send_control({"type": "close"})
    return np.concatenate(received), report, frames


async def _write_all(client: WebRTCClient, chunks) -> None:
    for chunk in chunks:
        await client.output.write(chunk)


async def test_three_peers_each_get_their_own_audio_both_ways(server: WebRTCServer) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        results = await asyncio.gather(*(run_call(server.url, str(i)) for i in range(3)))
    for i, (received, report, frames) in enumerate(results):
        client_id = str(i)
        # Agent -> peer: this client's own tone, nobody else's.
        assert windows_dominated_by(received, RATE, agent_tone_hz(client_id)) >= 10
        for other in {"0", "1", "2"} - {client_id}:
            assert windows_dominated_by(received, RATE, agent_tone_hz(other)) == 0
        # Peer -> agent: the client's microphone tone reached its own handler.
        assert abs(report["hz"] - mic_tone_hz(client_id)) < 20, report
        assert report["rms"] > 0.05, report
        # Timestamps: 20 ms frames at 48 kHz whose pts advance by one frame (a resync may skip ahead).
        assert all(samples == 960 and rate == 48_000 for _, samples, rate in frames)
        steps = np.diff([pts for pts, _, _ in frames])
        assert np.all(steps > 0)
        assert np.mean(steps == 960) > 0.9


async def test_clear_drops_stale_audio_of_the_interrupted_turn(server: WebRTCServer) -> None:
    async with asyncio.timeout(TIMEOUT_S), WebRTCClient(
        server.url, token=TOKEN, client_id="2", loopback_only=True
    ) as client:
        first, second = agent_tone_hz("2"), 2 * agent_tone_hz("2")
        received: list[np.ndarray] = []
        await collect_until(client, received, lambda pcm: windows_dominated_by(pcm, RATE, first) >= 5)
        await client.send_control({"type": "interrupt"})
        interrupted = await next_event(client, "interrupted")
        # Turn 2 plays, and once it has played for a while the 8 s turn 1 never comes back.
        await collect_until(client, received, lambda pcm: windows_dominated_by(pcm, RATE, second) >= 12)
        pcm = np.concatenate(received)
        first_windows = windows_dominated_by(pcm, RATE, first)
        # What turn 1 played: what the server counted as heard plus the network/jitter-buffer pipeline.
        assert first_windows * 0.1 < interrupted["heard_s"] + 1.0
        assert interrupted["heard_s"] < 4.0
        tail = pcm[-RATE // 2 :]
        assert abs(dominant_hz(tail, RATE) - second) < 20


async def test_bad_token_is_refused_with_401(server: WebRTCServer) -> None:
    with pytest.raises(TransportError, match="401"):
        await WebRTCClient(server.url, token="wrong", loopback_only=True).connect()
    async with aiohttp.ClientSession() as http, http.post(server.url + "offer", json={"type": "offer", "sdp": "v=0"}) as r:
        assert r.status == 401
    assert server.connections == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (json.dumps([1, 2]).encode(), 400),
        (json.dumps({"type": "answer", "sdp": "v=0\r\n"}).encode(), 400),
        (json.dumps({"type": "offer", "sdp": "v=0\r\no=garbage\r\nm=nonsense\r\n"}).encode(), 400),
        (json.dumps({"type": "offer", "sdp": "v=0\r\n" + "a=x\r\n" * 40_000}).encode(), 413),
    ],
)
async def test_malformed_or_oversized_offers_get_4xx_and_the_server_keeps_serving(
    server: WebRTCServer, body: bytes, status: int
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(server.url + "offer", data=body, headers=headers) as r:
        assert r.status == status
        assert (await r.json())["type"] == "error"
    async with asyncio.timeout(TIMEOUT_S), WebRTCClient(
        server.url, token=TOKEN, client_id="1", loopback_only=True
    ) as client:
        assert (await next_event(client, "hello"))["client"] == "1"


async def test_malformed_control_message_gets_an_error_event(server: WebRTCServer) -> None:
    async with asyncio.timeout(TIMEOUT_S), WebRTCClient(
        server.url, token=TOKEN, client_id="0", loopback_only=True
    ) as client:
        await client.send_raw("{not json")
        assert "JSON" in (await next_event(client, "error"))["message"]
        await client.send_control({"type": "explode"})
        assert "explode" in (await next_event(client, "error"))["message"]
        await client.send_control({"type": "text", "text": "report"})
        assert (await next_event(client, "report"))["type"] == "report"


async def test_an_offer_whose_peer_never_connects_is_hung_up_without_starting_the_handler() -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection

    seen: list[Connection] = []

    async def waiter(conn: Connection) -> None:
        seen.append(conn)
        await conn.closed.wait()

    async with WebRTCServer(waiter, token=TOKEN, loopback_only=True, connect_timeout_s=1.0) as srv:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as http, http.post(
            srv.url + "offer", json={"type": "offer", "sdp": pc.localDescription.sdp}, headers=headers
        ) as r:
            assert r.status == 200
        await pc.close()  # vanish without ever applying the answer
        assert srv.peers_held == 1
        async with asyncio.timeout(TIMEOUT_S):
            while srv.peers_held:
                await asyncio.sleep(0.05)
        assert srv.connections == []
        assert seen == []  # no session was ever built for it
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("webrtc-")]


async def test_the_page_gets_the_ice_servers_only_with_the_token() -> None:
    servers = ice_servers_from_urls(
        ["stun:stun.example.org:3478", "turn:turn.example.org:3478?transport=udp"], "agent", "s3cret"
    )
    async with WebRTCServer(tone_agent, token=TOKEN, ice_servers=servers) as srv, aiohttp.ClientSession() as http:
        async with http.get(srv.url + "ice") as response:
            assert response.status == 401
        async with http.get(srv.url + "ice", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
            body = await response.json()
    assert body == {
        "iceServers": [
            {"urls": "stun:stun.example.org:3478"},
            {"urls": "turn:turn.example.org:3478?transport=udp", "username": "agent", "credential": "s3cret"},
        ]
    }


@pytest.mark.parametrize(
    ("urls", "username", "credential", "message"),
    [
        (["http://stun.example.org"], None, None, "stun:, turn: or turns:"),
        (["turn:turn.example.org:3478"], "agent", None, "needs a username and a credential"),
    ],
)
def test_bad_ice_servers_are_refused(urls: list[str], username, credential, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ice_servers_from_urls(urls, username, credential)


async def test_events_sent_just_before_the_handler_returns_reach_the_client() -> None:
    """A handler that says goodbye and returns at once (before the client's data channel is even
    open): the server flushes its events before hanging up."""

    async def brief(conn: Connection) -> None:
        for index in range(3):
            await conn.send_event({"type": "note", "index": index, "padding": "x" * 20_000})

    async with WebRTCServer(brief, token=TOKEN, loopback_only=True) as srv:
        client = WebRTCClient(srv.url, token=TOKEN, loopback_only=True)
        async with asyncio.timeout(TIMEOUT_S), client:
            notes = [event["index"] async for event in client.events() if event["type"] == "note"]
    assert notes == [0, 1, 2]
