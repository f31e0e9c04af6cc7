"""OpenAIChatLLM against a real local HTTP server speaking the OpenAI streaming protocol."""

from __future__ import annotations

import socket

import pytest

from moss_agent.config import LLMConfig
from moss_agent.errors import LLMError
from moss_agent.streaming.llm import EchoResponder, LLMRequestError, OpenAIChatLLM
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
        result = await client.audio.transcriptions.create(model="whisper-1", file=("t.wav", buffer.getvalue()))
        await client.close()
    assert result.text == "a half second tone"
    assert heard == [pytest.approx(0.5, abs=0.01)]


async def test_echo_responder_repeats_the_last_user_message() -> None:
    words = [d async for d in EchoResponder().stream([*MESSAGES, {"role": "assistant", "content": "x"}])]
    assert "".join(words) == "You said: hi"
    assert [d async for d in EchoResponder().stream([])] != []
