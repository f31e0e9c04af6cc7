"""The speech server on Ray Serve: two replicas of the tiny engine on a local Ray instance (CPU).

Requests spread over both replicas (each takes ``slots`` ongoing requests); killing one replica
mid-stream ends its streams with an error the client sees, and new requests go to the survivor.
Also the replica's ASGI adapter on its own (no Ray): HTTP and WebSocket forwarded unchanged.

Needs ``pip install "moss-agent[ray]"`` for the Ray part (skipped without it; Ray is not in
``[all]``: a large install, and a Ray instance plus two replicas take about a minute to start on
two CPU cores).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from moss_agent import speech_protocol as sp
from moss_agent.service.ray_serve import REPLICA_HEADER, RayServeOptions, ReplicaASGI, read_voices

TOKEN = "ray-token"
HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello.wav"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOTS = 2
# Long greedy turns of the tiny model (20 s, never an earlier stop), so a stream is still
# running when its replica is killed.
RAY_OPTIONS = dict(
    slots=SLOTS, greedy=True, min_seconds=20.0, max_seconds=20.0, token=TOKEN, device="cpu",
    min_replicas=2, max_replicas=2, cpus_per_replica=0.5, max_uploaded_voices=2,
)  # fmt: skip
BATCH_MODEL = "moss-tts"
SPEECH = {
    "model": "tts-1",
    "voice": "default",
    "input": "a long story for the replicas",
    "response_format": "pcm",
}


def test_options_from_serve_run_and_cli_arguments() -> None:
    import argparse

    from moss_agent.errors import ConfigError
    from moss_agent.service.ray_serve import options_from_cli

    options = RayServeOptions.from_args({"tiny": "true", "slots": "4", "max_replicas": "3", "seed": "none"})
    assert (options.tiny, options.slots, options.max_replicas, options.seed) == (True, 4, 3, None)
    with pytest.raises(ConfigError, match="unknown options"):
        RayServeOptions.from_args({"tiny": "true", "replicas": "2"})
    with pytest.raises(ConfigError, match="model= and codec="):
        RayServeOptions.from_args({"slots": "4"})
    with pytest.raises(ConfigError, match="slots"):
        RayServeOptions.from_args({"tiny": "true", "slots": "many"})
    args = argparse.Namespace(tiny=False, model="m", codec="c", slots=8, max_seconds=30.0, min_seconds=None,
                              greedy=False, seed=1, device="cuda:0")  # fmt: skip
    options = options_from_cli(args, "tok", (1, 4), read_voices([f"hello={HELLO}"]))
    assert (options.model, options.device, options.token, options.max_replicas) == ("m", "cuda", "tok", 4)
    assert [name for name, _ in options.voices] == ["hello"] and options.voices[0][1].dtype.name == "float32"
    options = RayServeOptions.from_args({"tiny": "true", "voices": f"a={HELLO},b={HELLO}", "dtype": "float32"})
    assert [name for name, _ in options.voices] == ["a", "b"] and options.dtype == "float32"
    with pytest.raises(ConfigError, match="NAME=PATH"):
        RayServeOptions.from_args({"tiny": "true", "voices": str(HELLO)})
    # Batch models as speech-server --batch-model takes them (the first unnamed one is moss-tts).
    options = RayServeOptions.from_args({"tiny": "true", "batch_models": "tiny,small=tiny"})
    assert options.batch_models == (("moss-tts", "tiny"), ("small", "tiny"))
    assert options_from_cli(args, None, batch_models=(("moss-tts", "/ckpt/delay"),)).batch_models == (
        ("moss-tts", "/ckpt/delay"),
    )
    with pytest.raises(ConfigError, match="goes with tiny=true"):
        RayServeOptions(model="m", codec="c", batch_models=(("moss-tts", "tiny"),))


# -- the ASGI adapter without Ray -----------------------------------------------------------------


class AsgiClient:
    """Drives an ASGI app the way a server would, from queues."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def http(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else await asyncio.Event().wait()  # type: ignore[func-returns-value]

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"authorization", AUTH["Authorization"].encode()), (b"content-type", b"application/json")]
        scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": headers}
        await self.app(scope, receive, send)
        start = sent[0]
        return (
            start["status"],
            {k.decode(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent[1:]),
        )


def tiny(model: Path, codec: Path, **fields: Any) -> RayServeOptions:
    return RayServeOptions(model=str(model), codec=str(codec), **fields)


@pytest_asyncio.fixture
async def replica(tiny_realtime_dir: Path, tiny_codec_dir: Path) -> AsyncIterator[ReplicaASGI]:
    options = tiny(tiny_realtime_dir, tiny_codec_dir, slots=1, greedy=True, max_seconds=0.8, token=TOKEN,
                   device="cpu", voices=read_voices([f"hello={HELLO}"]))  # fmt: skip
    app = ReplicaASGI(options, replica="r1")
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def test_replica_adapter_forwards_http_and_websocket(replica: ReplicaASGI) -> None:
    client = AsgiClient(replica)
    status, headers, body = await client.http("GET", "/readyz")
    assert status == 200 and headers[REPLICA_HEADER.lower()] == "r1", (status, body)
    status, _, body = await client.http("POST", "/v1/audio/speech", json.dumps(SPEECH).encode())
    assert status == 200 and len(body) > 0 and len(body) % 2 == 0
    status, _, body = await client.http("GET", "/v1/audio/voices")  # the voice given to the deployment
    assert status == 200 and {voice["id"] for voice in json.loads(body)["data"]} == {"default", "hello"}
    status, _, body = await client.http("POST", "/v1/audio/speech", json.dumps(dict(SPEECH, voice="hello")).encode())
    assert status == 200 and len(body) > 0, body[:200]
    status, _, body = await client.http("POST", "/v1/audio/speech", b'{"model": "tts-1"}')
    assert status == 400 and json.loads(body)["error"]["param"] == "input"

    # WebSocket: the hello, an open, a close, relayed both ways.
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "websocket.connect"})
    scope = {"type": "websocket", "path": sp.PATH, "query_string": b"",
             "headers": [(b"authorization", AUTH["Authorization"].encode())]}  # fmt: skip
    relay = asyncio.create_task(replica(scope, inbox.get, outbox.put))
    accept = await asyncio.wait_for(outbox.get(), 10)
    assert accept["type"] == "websocket.accept"
    hello = json.loads((await asyncio.wait_for(outbox.get(), 10))["text"])
    assert hello["type"] == "hello" and hello["protocol"] == sp.PROTOCOL
    await inbox.put(
        {"type": "websocket.receive", "text": json.dumps({"type": "open", "id": 1, "system_prompt": None})}
    )
    opened = json.loads((await asyncio.wait_for(outbox.get(), 10))["text"])
    assert opened["type"] == "opened" and opened["id"] == 1
    await inbox.put({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(relay, 10)
    for _ in range(100):  # the server saw the socket go and freed the slot
        if replica.engine.free_slots == 1:
            break
        await asyncio.sleep(0.05)
    assert replica.engine.free_slots == 1

    # A refused upgrade (wrong token) is refused, not relayed.
    outbox2: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox2: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox2.put({"type": "websocket.connect"})
    bad = dict(scope, headers=[(b"authorization", b"Bearer wrong")])
    await asyncio.wait_for(replica(bad, inbox2.get, outbox2.put), 10)
    refusal = await outbox2.get()
    assert refusal["type"] == "websocket.close" and "401" in refusal["reason"]


# -- two replicas on Ray Serve --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def ray_url(
    tiny_realtime_endless_dir: Path, tiny_codec_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    ray = pytest.importorskip("ray", reason='Ray Serve is an optional extra: pip install "moss-agent[ray]"')
    serve = pytest.importorskip("ray.serve", reason='pip install "moss-agent[ray]"')
    from moss_agent.service.ray_serve import deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from moss_agent.options import ensure_tiny_batch_checkpoint

        voices = read_voices([f"hello={HELLO}"])  # decoded here, shipped to every replica
        # The tiny Delay on the tiny codec, loaded by every replica (speech-server --ray --tiny --batch-model tiny).
        delay = str(ensure_tiny_batch_checkpoint(tmp_path_factory.mktemp("batch")))
        options = tiny(tiny_realtime_endless_dir, tiny_codec_dir, voices=voices,
                       batch_models=((BATCH_MODEL, delay),), **RAY_OPTIONS)  # fmt: skip
        serve.run(deployment(options), name="speech", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def kill_replica(unique_id: str) -> None:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(unique_id):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no replica actor named ...{unique_id}")


async def open_speech(http: aiohttp.ClientSession, url: str) -> tuple[aiohttp.ClientResponse, str]:
    """A speech stream, once its first audio arrived; and the replica serving it."""
    response = await http.post(url + "/v1/audio/speech", json=SPEECH, headers=AUTH)
    assert response.status == 200, await response.text()
    assert await asyncio.wait_for(response.content.readany(), 60)
    return response, response.headers[REPLICA_HEADER]


async def drain(response: aiohttp.ClientResponse) -> int:
    total = 0
    async for data in response.content.iter_any():
        total += len(data)
    return total


async def open_session(url: str) -> tuple[Any, Any, Any]:
    """A session over the Python client with a turn whose audio is flowing (first chunk read)."""
    from moss_agent.client import RemoteSpeechBackend
    from moss_agent.streaming.tts import UserTurn

    backend = await RemoteSpeechBackend(url, token=TOKEN, request_timeout_s=60.0).start()
    conversation = await backend.open_conversation()
    stream = await conversation.start_turn(UserTurn("hello"), 1)
    await stream.push_text("a long answer for the replicas")
    await stream.end_input()
    await asyncio.wait_for(anext(stream), 60)
    return backend, conversation, stream


async def read_all(stream: Any) -> int:
    return len([chunk async for chunk in stream])


async def on_both(
    http: aiohttp.ClientSession, method: str, url: str, tries: int = 40, **kwargs: Any
) -> dict[str, tuple[int, Any]]:
    """The same request until both replicas answered it: replica -> (status, JSON body)."""
    answers: dict[str, tuple[int, Any]] = {}
    for _ in range(tries):
        async with http.request(method, url, headers=AUTH, **kwargs) as response:
            answers[response.headers[REPLICA_HEADER]] = (response.status, await response.json())
        if len(answers) == 2:
            return answers
    raise AssertionError(f"{tries} requests all went to {sorted(answers)}")


async def speak_on_both(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, int]:
    """Speech requests until both replicas took one: replica -> status (a stream is closed once its
    first audio arrived)."""
    statuses: dict[str, int] = {}
    for _ in range(40):
        async with http.post(url + "/v1/audio/speech", json=body, headers=AUTH) as response:
            statuses[response.headers[REPLICA_HEADER]] = response.status
            if response.status == 200:
                assert await asyncio.wait_for(response.content.readany(), 60)
            else:
                assert (await response.json())["error"]["code"] == "voice_not_found"
        if len(statuses) == 2:
            return statuses
    raise AssertionError(f"40 requests all went to {sorted(statuses)}")


def voice_ids(answers: dict[str, tuple[int, Any]]) -> set[frozenset[str]]:
    """The voice lists the replicas answered (one set when they agree)."""
    return {frozenset(voice["id"] for voice in body["data"]) for _, body in answers.values()}


@pytest.mark.slow
async def test_every_replica_serves_the_batch_models_and_every_uploaded_voice(ray_url: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        # Both replicas loaded the batch model beside their engine.
        for status, body in (await on_both(http, "GET", ray_url + "/v1/models")).values():
            batch = [model["id"] for model in body["data"] if model.get("engine") == "batch"]
            assert status == 200 and batch == [BATCH_MODEL], body

        # A voice uploaded through one replica speaks on both, through the realtime and the batch model.
        async with http.post(ray_url + "/v1/audio/voices?name=carol", data=HELLO.read_bytes(),
                             headers={**AUTH, "Content-Type": "audio/wav"}) as response:  # fmt: skip
            assert response.status == 200, await response.text()
            uploaded = await response.json()
        assert uploaded["id"] == "carol" and uploaded["uploaded"]
        statuses = await speak_on_both(http, ray_url, dict(SPEECH, voice="carol"))
        assert set(statuses.values()) == {200}, statuses
        batch_body = dict(SPEECH, model=BATCH_MODEL, voice="carol", input="hello")
        async with http.post(ray_url + "/v1/audio/speech", json=batch_body, headers=AUTH) as response:
            assert response.status == 200, await response.text()
            assert len(await response.read()) >= 2 * 1920  # whole codec frames of 16-bit pcm
        listed = await on_both(http, "GET", ray_url + "/v1/audio/voices")
        assert voice_ids(listed) == {frozenset({"default", "hello", "carol"})}
        created = {next(v["created_at"] for v in body["data"] if v["id"] == "carol") for _, body in listed.values()}
        assert created == {uploaded["created_at"]}  # one voice, mirrored

        # The bound on uploaded voices is the deployment's, whichever replica takes the upload.
        async with http.post(ray_url + "/v1/audio/voices?name=dave", data=HELLO.read_bytes(),
                             headers={**AUTH, "Content-Type": "audio/wav"}) as response:  # fmt: skip
            assert response.status == 200, await response.text()
        for _, (status, body) in (
            await on_both(http, "POST", ray_url + "/v1/audio/voices?name=erin", data=HELLO.read_bytes())
        ).items():
            assert status == 400 and "already holds 2 uploaded voices" in body["error"]["message"], body

        # A delete through one replica is seen by both; the voice is gone from every replica.
        for name in ("carol", "dave"):
            async with http.delete(ray_url + f"/v1/audio/voices/{name}", headers=AUTH) as response:
                assert response.status == 200, await response.text()
        listed = await on_both(http, "GET", ray_url + "/v1/audio/voices")
        assert voice_ids(listed) == {frozenset({"default", "hello"})}
        statuses = await speak_on_both(http, ray_url, dict(SPEECH, voice="carol"))
        assert set(statuses.values()) == {400}, statuses

        # Leave both replicas idle for the next test.
        for _ in range(100):
            ready = await on_both(http, "GET", ray_url + "/readyz")
            if all(body.get("free_slots") == SLOTS for _, body in ready.values()):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the replicas still hold slots: {ready}")


@pytest.mark.slow
async def test_two_replicas_share_the_load_and_survive_a_killed_one(ray_url: str) -> None:
    from moss_agent.errors import EngineError

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        # 2 replicas x 2 slots (max_ongoing_requests): a session socket, then three concurrent speech
        # streams, must use both replicas, two requests each: the socket's replica takes one stream.
        backend, _conversation, session_stream = await open_session(ray_url)
        streams = await asyncio.gather(*(open_speech(http, ray_url) for _ in range(2 * SLOTS - 1)))
        replicas = [replica for _, replica in streams]
        assert sorted(replicas.count(r) for r in set(replicas)) == [1, 2], replicas
        victim = next(r for r in replicas if replicas.count(r) == 1)  # also holds the session socket
        survivor = next(r for r in replicas if r != victim)

        kill_replica(victim)
        for response, replica in streams:
            if replica == victim:
                # The stream ends short with a connection error: never a hang, never a clean end.
                with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                                    aiohttp.ClientConnectionError)):  # fmt: skip
                    await asyncio.wait_for(drain(response), 60)
            else:
                response.close()  # the survivor's streams were fine; free their slots
        # The session's turn fails with the client's EngineError (the connection was lost).
        with pytest.raises(EngineError, match=r"connection|close"):
            await asyncio.wait_for(read_all(session_stream), 60)
        await backend.aclose()

        # New requests go to the survivor (the replacement replica takes its time to load).
        served = []
        for _ in range(4):
            async with http.get(ray_url + "/readyz", headers=AUTH) as response:
                assert response.status == 200, await response.text()
                served.append(response.headers[REPLICA_HEADER])
        assert victim not in served and survivor in served, served
        response, replica = await open_speech(http, ray_url)
        assert replica != victim
        response.close()
        async with http.get(ray_url + "/v1/audio/voices", headers=AUTH) as response:  # the deployment's voice
            assert {voice["id"] for voice in (await response.json())["data"]} == {"default", "hello"}
        backend, _conversation, session_stream = await open_session(ray_url)  # a new session works too
        await session_stream.aclose()
        await backend.aclose()
