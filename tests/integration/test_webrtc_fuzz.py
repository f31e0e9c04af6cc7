"""Fuzzing the WebRTC server's two decoders of network input with hypothesis, bounded in count and time.

Random JSON bodies, random bytes and random SDP-ish offers go to ``POST /offer``; random text,
bytes and JSON go over a real data channel. Nothing but a 4xx JSON error (or, for an offer aiortc
can use, an answer) and one error event per bad message may come out, and afterwards the server
serves a good client normally. The server and its peer live on an event loop in a thread, so each
hypothesis example is a plain call that waits for its answer.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("aiortc")
aiohttp = pytest.importorskip("aiohttp")

from moss_agent.errors import TransportError  # noqa: E402
from moss_agent.transports.connection import Connection, parse_control  # noqa: E402
from moss_agent.transports.webrtc import MAX_CONTROL_BYTES, WebRTCServer  # noqa: E402
from moss_agent.transports.webrtc_client import WebRTCClient  # noqa: E402
from moss_agent.wire import decode_json_object  # noqa: E402

# The server's loop thread (aiortc, aioice) draws from the global random module while hypothesis
# generates an example, which hypothesis reports as if the strategy had done it.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 150
T = TypeVar("T")


async def ping_agent(conn: Connection) -> None:
    """Greets, answers ``ping`` with ``pong`` (echoing its ``marker``) and ignores other controls."""
    await conn.send_event({"type": "hello", "client": conn.client_id})
    async for message in conn.control:
        if message["type"] == "ping":
            await conn.send_event({"type": "pong", "marker": message.get("marker")})
        elif message["type"] == "close":
            return


@dataclass
class Live:
    loop: asyncio.AbstractEventLoop
    server: WebRTCServer
    http: Any = None
    client: WebRTCClient | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-server-loop", daemon=True)
    thread.start()
    server = WebRTCServer(ping_agent, token=TOKEN, loopback_only=True, connect_timeout_s=1.0, max_peers=64)
    state = Live(loop, server)

    async def start() -> None:
        await server.start()
        state.http = aiohttp.ClientSession()
        state.client = WebRTCClient(server.url, token=TOKEN, client_id="fuzzed", loopback_only=True)
        await state.client.connect()
        assert (await anext(state.client.events()))["type"] == "hello"

    async def stop() -> None:
        assert state.client is not None
        await state.client.close()
        await state.http.close()
        await server.stop()

    state.call(start())
    try:
        yield state
    finally:
        state.call(stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def served_normally(server: WebRTCServer) -> None:
    async with asyncio.timeout(30), WebRTCClient(server.url, token=TOKEN, client_id="good", loopback_only=True) as good:
        events = good.events()
        assert (await anext(events))["type"] == "hello"
        await good.send_control({"type": "ping", "marker": "good"})
        assert await anext(events) == {"type": "pong", "marker": "good"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=25,
)
deep_nesting = st.integers(min_value=17, max_value=30_000).map(lambda depth: "[" * depth + "]" * depth)
SDP_LINES = [
    "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0", "c=IN IP4 0.0.0.0", "a=group:BUNDLE 0 1",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111", "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "m=video 9 RTP/AVP 96",
    "a=rtpmap:111 opus/48000/2", "a=mid:0", "a=mid:1", "a=sendrecv", "a=recvonly", "a=rtcp-mux",
    "a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuvwx", "a=setup:actpass", "a=sctp-port:5000",
    "a=fingerprint:sha-256 AB:CD:EF", "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host",
    "a=ssrc:1 cname:x", "a=fmtp:111 minptime=10;useinbandfec=1",
]  # fmt: skip
sdp_ish = st.lists(
    st.sampled_from(SDP_LINES) | st.text(max_size=60), max_size=30
).map(lambda lines: "v=0\r\n" + "".join(line + "\r\n" for line in lines)) | st.text(max_size=300)
offer_shaped = st.fixed_dictionaries(
    {"type": st.sampled_from(["offer", "answer", "pranswer"]) | json_values, "sdp": sdp_ish | json_values}
)
bodies = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    offer_shaped.map(lambda value: json.dumps(value).encode()),
    sdp_ish.map(lambda sdp: json.dumps({"type": "offer", "sdp": sdp}).encode()),
    deep_nesting.map(str.encode),
    st.binary(max_size=2000),
)


def test_random_offers_get_a_json_4xx_or_an_answer(live: Live) -> None:
    outcomes: Counter[str] = Counter()

    async def post(body: bytes) -> tuple[int, str, Any]:
        async with live.http.post(live.server.url + "offer", data=body, headers=AUTH) as response:
            return response.status, response.content_type, await response.json(content_type=None)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(body=bodies)
    def one(body: bytes) -> None:
        status, content_type, answer = live.call(post(body))
        assert content_type == "application/json"
        if status == 200:  # an offer aiortc could use: answered; its peer never connects and is hung up
            assert answer["type"] == "answer" and answer["sdp"].startswith("v=0")
            outcomes["offer answered"] += 1
        else:
            assert 400 <= status < 500 and answer["type"] == "error" and answer["message"], (status, answer)
            outcomes["offer refused"] += 1

    one()
    assert sum(outcomes.values()) >= EXAMPLES
    live.call(served_normally(live.server))
    print(f"fuzzed offers: {dict(outcomes)}")


def rejected(message: str | bytes) -> bool:
    """Whether the server must answer ``message`` with an error (the documented rules)."""
    try:
        decoded = decode_json_object(message, max_bytes=MAX_CONTROL_BYTES)
        if decoded.get("type") != "stats":
            parse_control(decoded)
    except TransportError:
        return True
    return False


control_shaped = st.fixed_dictionaries(
    {"type": st.sampled_from(["interrupt", "text", "ping", "config", "stats", "explode", ""]) | json_values},
    optional={"text": json_values | st.text(max_size=100), "marker": json_values},
).map(json.dumps)
channel_messages = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    json_values.map(json.dumps),
    control_shaped,
    deep_nesting,
    st.binary(max_size=200).map(lambda raw: b'{"type": "ping", "x": "' + raw + b'"}'),
)


def test_random_data_channel_messages_get_one_error_each_and_the_channel_stays_open(live: Live) -> None:
    outcomes: Counter[str] = Counter()
    assert live.client is not None
    client = live.client
    markers = iter(range(1_000_000))

    async def exchange(message: str | bytes) -> list[dict[str, Any]]:
        """Send the message, then a ping; every event up to its pong."""
        marker = f"marker-{next(markers)}"
        await client.send_raw(message)
        await client.send_control({"type": "ping", "marker": marker})
        seen = []
        async for event in client.events():
            if event == {"type": "pong", "marker": marker}:
                return seen
            seen.append(event)
        raise AssertionError(f"the channel closed after {message!r}")

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(message=channel_messages)
    def one(message: str | bytes) -> None:
        events = live.call(exchange(message))
        errors = [event for event in events if event["type"] == "error"]
        assert all(event["type"] in ("error", "pong") for event in events), events
        assert len(errors) == rejected(message), (message, events)
        assert all(error["code"] == "bad_request" and not error["fatal"] for error in errors), errors
        outcomes["message refused" if errors else "message accepted"] += 1

    one()
    assert sum(outcomes.values()) >= EXAMPLES
    live.call(served_normally(live.server))
    print(f"fuzzed data-channel messages: {dict(outcomes)}")
