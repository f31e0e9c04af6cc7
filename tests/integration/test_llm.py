"""OpenAIChatLLM against a real local HTTP server speaking the OpenAI streaming protocol."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from moss_agent.config import LLMConfig
from moss_agent.errors import LLMError
from moss_agent.events import ErrorEvent
from moss_agent.streaming.llm import EchoResponder, LLMRequestError, OpenAIChatLLM
from moss_agent.streaming.session import Session
from moss_agent.testing.backend import FakeSpeechBackend
from moss_agent.testing.openai_server import FakeOpenAIServer, ScriptedReply

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def llm_for(server: FakeOpenAIServer, **overrides: object) -> OpenAIChatLLM:
    settings: dict[str, object] = {"base_url": server.base_url, "model": "tiny", "idle_timeout_s": 1.0}
    return OpenAIChatLLM(LLMConfig(**(settings | overrides)))  # type: ignore[arg-type]


async def test_deltas_stream_in_order_with_the_configured_request() -> None:
    async with FakeOpenAIServer(["Hello there, friend."]) as server:
        llm = llm_for(server, temperature=0.2, max_tokens=33, extra_body={"top_k": 5})
        deltas = [d async for d in llm.stream(MESSAGES)]
        await llm.aclose()
    assert deltas == ["Hello", " there,", " friend."]
    request = server.chat_requests[0]
    assert request["model"] == "tiny" and request["stream"] is True
    assert request["messages"] == MESSAGES
    assert request["temperature"] == 0.2 and request["max_tokens"] == 33 and request["top_k"] == 5


async def test_deltas_arrive_before_the_reply_is_complete() -> None:
    # The server stalls after two tokens: a client that buffered the reply would yield nothing.
    async with FakeOpenAIServer([ScriptedReply("one two three four", fail="stall", fail_after=2)]) as server:
        llm = llm_for(server, idle_timeout_s=0.5)
        seen: list[str] = []
        with pytest.raises(LLMRequestError) as info:
            async for delta in llm.stream(MESSAGES):
                seen.append(delta)
        await llm.aclose()
    assert seen == ["one", " two"]
    assert info.value.kind == "timeout"


@pytest.mark.parametrize(("failure", "kind"), [("reset", "connection"), ("http500", "status")])
async def test_server_failures_become_llm_errors(failure: str, kind: str) -> None:
    async with FakeOpenAIServer([ScriptedReply("a b c d", fail=failure, fail_after=1)]) as server:  # type: ignore[arg-type]
        llm = llm_for(server)
        seen: list[str] = []
        with pytest.raises(LLMRequestError) as info:
            async for delta in llm.stream(MESSAGES):
                seen.append(delta)
        await llm.aclose()
    assert info.value.kind == kind
    assert seen == ([] if failure == "http500" else ["a"])
    if failure == "http500":
        assert info.value.status == 500


async def test_nothing_listening_is_a_connection_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    llm = OpenAIChatLLM(LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", idle_timeout_s=2.0))
    with pytest.raises(LLMError, match="connection"):
        async for _ in llm.stream(MESSAGES):
            pass
    await llm.aclose()


async def test_transcription_endpoint_decodes_the_upload_for_the_recognizer() -> None:
    import io

    import numpy as np
    import openai
    import soundfile as sf

    heard: list[float] = []

    def transcribe(pcm: np.ndarray, rate: int) -> str:
        heard.append(len(pcm) / rate)
        return "a half second tone"

    tone = (0.3 * np.sin(np.arange(12000) * 0.1)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, tone, 24000, format="WAV", subtype="PCM_16")
    async with FakeOpenAIServer(transcribe=transcribe) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        result = await client.audio.transcriptions.create(
            model="whisper-1", file=("t.wav", buffer.getvalue())
        )
        await client.close()
    assert result.text == "a half second tone"
    assert heard == [pytest.approx(0.5, abs=0.01)]


async def test_echo_responder_repeats_the_last_user_message() -> None:
    words = [d async for d in EchoResponder().stream([*MESSAGES, {"role": "assistant", "content": "x"}])]
    assert "".join(words) == "You said: hi"
    assert [d async for d in EchoResponder().stream([])] != []


class FixedAnswerServer:
    """A real local HTTP server whose chat-completions endpoint always gives one fixed answer: what
    a misconfigured --llm-url meets (a web page, a plain-text proxy, a non-streaming JSON server)."""

    def __init__(self, content_type: str, body: bytes, status: int = 200) -> None:
        self.content_type, self.body, self.status = content_type, body, status

    async def __aenter__(self) -> str:
        from aiohttp import web

        async def answer(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(
                status=self.status, body=self.body, headers={"Content-Type": self.content_type}
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


async def _stream_from(base_url: str) -> list[str]:
    llm = OpenAIChatLLM(LLMConfig(base_url=base_url, model="tiny", idle_timeout_s=2.0))
    try:
        return [delta async for delta in llm.stream(MESSAGES)]
    finally:
        await llm.aclose()


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (
            "text/html; charset=utf-8",
            b"<html><body>Welcome to nginx!</body></html>" * 20,
            "answered HTTP 200 with 'text/html', not a chat completion stream (text/event-stream); "
            "the answer begins b'<html><body>Welcome to nginx!",
        ),
        ("text/plain", b"upstream connect error", "answered HTTP 200 with 'text/plain'"),
        ("application/json", b'{"status": "ok"}', "with 'application/json', not a chat completion"),
        ("application/json", b"[" * 5000 + b"]" * 5000, "nests 5000 levels deep; at most 16 are accepted"),
    ],
    ids=["html", "plain text", "json without choices", "nested json"],
)
async def test_an_answer_that_is_not_a_stream_is_an_llm_error_quoting_it(
    content_type: str, body: bytes, expected: str
) -> None:
    async with FixedAnswerServer(content_type, body) as base_url:
        with pytest.raises(LLMRequestError) as info:
            await _stream_from(base_url)
    assert info.value.kind == "protocol"
    assert expected in str(info.value)
    assert len(str(info.value)) < 400  # the first bytes of a page, never all of it


async def test_a_complete_json_completion_is_one_delta_and_an_error_object_is_an_error() -> None:
    completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there."}}]}
    async with FixedAnswerServer("application/json", json.dumps(completion).encode()) as base_url:
        assert await _stream_from(base_url) == ["Hi there."]
    error = {"error": {"message": "model 'tiny' not found", "type": "invalid_request_error"}}
    async with FixedAnswerServer("application/json", json.dumps(error).encode()) as base_url:
        with pytest.raises(LLMRequestError, match="answered with an error: model 'tiny' not found"):
            await _stream_from(base_url)


async def test_a_stream_event_that_is_not_json_is_an_llm_error() -> None:
    async with FixedAnswerServer("text/event-stream", b"data: {not json\n\n") as base_url:
        with pytest.raises(LLMRequestError, match="stream event that is not JSON"):
            await _stream_from(base_url)


async def test_check_refuses_a_server_that_answers_a_web_page() -> None:
    async with FixedAnswerServer("text/html", b"<html>router login</html>") as base_url:
        llm = OpenAIChatLLM(LLMConfig(base_url=base_url, model="tiny"))
        with pytest.raises(
            LLMRequestError, match=r"answered HTTP 200 with 'text/html' where .* b'<html>router login"
        ):
            await llm.check()
        await llm.aclose()


async def test_a_turn_on_a_web_page_llm_ends_with_the_error_and_an_error_event() -> None:
    """Issue 15: a session turn whose LLM URL answered 200 text/html was a silent empty turn."""
    page = b"<html><body>Welcome to nginx!</body></html>"
    async with FixedAnswerServer("text/html", page) as base_url:
        llm = OpenAIChatLLM(LLMConfig(base_url=base_url, model="tiny", idle_timeout_s=2.0))
        async with Session(FakeSpeechBackend(), llm=llm) as session:
            events = session.events()
            result = await asyncio.wait_for(session.respond(user_text="hello"), 10)
            errors = [event for event in events.drain() if isinstance(event, ErrorEvent)]
        await llm.aclose()
    assert result.error is not None and "'text/html'" in result.error and "Welcome to nginx!" in result.error
    assert result.text == "" and result.audio_s == 0.0
    assert [(e.turn_id, e.fatal) for e in errors] == [(result.turn_id, False)], errors
    assert "'text/html'" in errors[0].message


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/event-stream", b"data: [DONE]\n\n"),
        ("text/event-stream", b"<html><body>Welcome to nginx!</body></html>\n"),
        ("application/json", json.dumps({"choices": [{"message": {"content": "  "}}]}).encode()),
    ],
    ids=["empty stream", "html labelled a stream", "json with no text"],
)
async def test_an_answer_with_no_text_is_an_llm_error(content_type: str, body: bytes) -> None:
    """A voice agent would speak silence (and print a blank reply): the answer is an error instead."""
    async with FixedAnswerServer(content_type, body) as base_url:
        with pytest.raises(LLMRequestError, match=r"answered with a .* no text") as info:
            await _stream_from(base_url)
    assert info.value.kind == "empty"


async def test_the_model_comes_from_the_server_when_none_is_given() -> None:
    async with FakeOpenAIServer(["Hello there."]) as server:
        llm = OpenAIChatLLM(LLMConfig(base_url=server.base_url), model_from_server=True)
        assert llm.model is None
        assert "".join([d async for d in llm.stream(MESSAGES)]) == "Hello there."
        assert llm.model == "fake-model" and server.chat_requests[-1]["model"] == "fake-model"
        await llm.aclose()
    several = {"object": "list", "data": [{"id": "qwen3-8b", "object": "model"}, {"id": "llama-3", "object": "model"}]}
    async with FixedAnswerServer("application/json", json.dumps(several).encode()) as base_url:
        llm = OpenAIChatLLM(LLMConfig(base_url=base_url), model_from_server=True)
        with pytest.raises(LLMRequestError, match=r"serves several models \(qwen3-8b, llama-3\); choose one with --llm-model"):
            await llm.check()
        await llm.aclose()
    async with FixedAnswerServer("application/json", b'{"detail": "Not Found"}', status=404) as base_url:
        llm = OpenAIChatLLM(LLMConfig(base_url=base_url.removesuffix("/v1")), model_from_server=True)
        with pytest.raises(LLMRequestError, match=r"does not list its models \(HTTP 404 .*is /v1 missing"):
            await llm.check()
        await llm.aclose()
