"""The realtime engine on tiny random checkpoints: batched slots, isolation, interrupts, overload."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from moss_agent.engine.realtime import RealtimeEngine, RealtimeEngineConfig
from moss_agent.errors import EngineError, OverloadError
from moss_agent.models.codec import load_codec
from moss_agent.models.realtime import SamplingConfig
from moss_agent.streaming.tts import Conversation, SpeechBackend, SpeechStream, UserTurn

GREEDY = SamplingConfig(greedy=True)
TEXT = "Hello there, this is a test of the realtime engine."


@pytest.fixture(scope="module")
def codec(tiny_codec_dir: Path):
    return load_codec(tiny_codec_dir, device="cpu")


def make_engine(tiny_realtime_dir: Path, codec, **overrides) -> RealtimeEngine:
    settings = {"num_slots": 4, "max_context": 512, "max_frames_per_turn": 24, "sampling": GREEDY}
    settings.update(overrides)
    return RealtimeEngine.load(tiny_realtime_dir, codec, device="cpu", config=RealtimeEngineConfig(**settings))


async def speak(conversation, text: str, turn_id: int, user: UserTurn | None = None) -> list:
    stream = await conversation.start_turn(user, turn_id)
    for word in text.split(" "):
        await stream.push_text(word + " ")
    await stream.end_input()
    return [chunk async for chunk in stream]


def pcm(chunks) -> np.ndarray:
    return np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.float32)


async def test_engine_implements_the_speech_protocols(tiny_realtime_dir, codec):
    async with make_engine(tiny_realtime_dir, codec) as engine:
        assert isinstance(engine, SpeechBackend)
        conversation = await engine.open_conversation()
        assert isinstance(conversation, Conversation)
        stream = await conversation.start_turn(None, turn_id=1)
        assert isinstance(stream, SpeechStream)
        await stream.aclose()
        await conversation.aclose()


async def test_one_turn_streams_80ms_chunks_tagged_with_the_turn(tiny_realtime_dir, codec):
    async with make_engine(tiny_realtime_dir, codec) as engine:
        conversation = await engine.open_conversation()
        chunks = await speak(conversation, TEXT, turn_id=7)
        assert chunks, "no audio came out"
        assert all(c.turn_id == 7 and c.sample_rate == 24000 and len(c.pcm) == 1920 for c in chunks)
        assert [c.frame_index for c in chunks] == list(range(len(chunks)))
        assert len(chunks) <= 24
        audio = pcm(chunks)
        assert np.isfinite(audio).all() and float(np.abs(audio).max()) > 0
        await conversation.aclose()
        assert engine.free_slots == 4


async def test_concurrent_sessions_get_exactly_their_solo_audio(tiny_realtime_dir, codec):
    texts = ["Good morning to you.", TEXT, "One two three four five six.", "Short one."]
    async with make_engine(tiny_realtime_dir, codec) as engine:
        solo = []
        for text in texts:
            conversation = await engine.open_conversation()
            solo.append(pcm(await speak(conversation, text, 1)))
            await conversation.aclose()

        conversations = [await engine.open_conversation() for _ in texts]
        together = await asyncio.gather(*(speak(c, t, 1) for c, t in zip(conversations, texts, strict=True)))
        for alone, joint in zip(solo, together, strict=True):
            assert np.array_equal(alone, pcm(joint)), "a slot's audio changed when other slots ran beside it"
        for conversation in conversations:
            await conversation.aclose()


async def test_interrupt_cuts_context_to_heard_frames_and_next_turn_works(tiny_realtime_dir, codec):
    async with make_engine(tiny_realtime_dir, codec, max_frames_per_turn=200) as engine:
        conversation = await engine.open_conversation()
        before = conversation.context_length()
        stream = await conversation.start_turn(UserTurn("What is the weather like?"), turn_id=1)
        await stream.push_text(TEXT + " " + TEXT)
        got = []
        async for chunk in stream:
            got.append(chunk)
            if len(got) == 5:
                break
        heard = await stream.interrupt(heard_s=0.2)  # 2.5 frames heard: the third frame counts
        assert heard.frames == 3
        assert heard.audio_s == pytest.approx(0.24)
        assert [c async for c in stream] == []  # nothing stale comes out after the interrupt
        assert heard.text and TEXT.startswith(heard.text.strip()[:5])
        assert conversation.context_length() > before

        chunks = await speak(conversation, "And now the next turn.", turn_id=2)
        assert chunks and all(c.turn_id == 2 for c in chunks)
        await conversation.aclose()


async def test_user_audio_is_encoded_into_the_turn(tiny_realtime_dir, codec):
    rng = np.random.default_rng(0)
    user_audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)  # 1 s at 16 kHz
    async with make_engine(tiny_realtime_dir, codec) as engine:
        plain = await engine.open_conversation()
        with_audio = await engine.open_conversation()
        await speak(plain, "Fine.", 1, UserTurn("Hello?"))
        await speak(with_audio, "Fine.", 1, UserTurn("Hello?", user_audio, sample_rate=16000))
        # 1 s of user speech is 12 codec frames (floor), each one more row of context
        assert with_audio.context_length() - plain.context_length() >= 12
        await plain.aclose()
        await with_audio.aclose()


async def test_full_engine_queues_then_overloads(tiny_realtime_dir, codec):
    async with make_engine(tiny_realtime_dir, codec, num_slots=1, max_waiting=1) as engine:
        first = await engine.open_conversation()
        waiting = asyncio.create_task(engine.open_conversation())
        await asyncio.sleep(0)
        while engine.waiting == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(OverloadError, match="slots are busy"):
            await engine.open_conversation()
        await first.aclose()
        second = await asyncio.wait_for(waiting, 10)
        assert second.slot == first.slot
        assert (await speak(second, "Still works.", 1))
        await second.aclose()


async def test_generation_waits_for_a_slow_listener(tiny_realtime_dir, codec):
    async with make_engine(tiny_realtime_dir, codec, max_ahead_s=0.24, max_frames_per_turn=40) as engine:
        conversation = await engine.open_conversation()
        stream = await conversation.start_turn(None, turn_id=1)
        await stream.push_text(TEXT)
        await stream.end_input()
        first = await stream.__anext__()
        for _ in range(20):  # give the device thread ample time to run ahead if it would
            await asyncio.sleep(0.01)
        assert stream.produced_frames - stream.consumed_frames <= 3
        rest = [chunk async for chunk in stream]
        assert first.frame_index == 0 and [c.frame_index for c in rest] == list(range(1, len(rest) + 1))
        await conversation.aclose()


async def test_a_failing_turn_does_not_take_the_engine_down(tiny_realtime_dir, codec):
    async with make_engine(tiny_realtime_dir, codec, max_context=256) as engine:
        doomed = await engine.open_conversation()
        healthy = await engine.open_conversation()
        stream = await doomed.start_turn(None, turn_id=1)
        await stream.push_text("word " * 400)  # more text than the context can hold
        with pytest.raises(EngineError):
            async for _ in stream:
                pass
        assert await speak(healthy, "I am fine.", 1)
        await doomed.aclose()
        await healthy.aclose()


def test_engine_rejects_a_mismatched_config(tiny_realtime_dir, codec):
    from moss_agent.errors import ConfigError
    from moss_agent.models.realtime import RealtimeGenerator, load_realtime

    model, tokenizer = load_realtime(tiny_realtime_dir, device="cpu")
    generator = RealtimeGenerator(model, tokenizer, num_slots=2, max_context=256)
    with pytest.raises(ConfigError, match="slots"):
        RealtimeEngine(generator, codec, RealtimeEngineConfig(num_slots=3))
    # Sampling the generator's buffers cannot hold is refused when the engine is built, not at a turn.
    for sampling, words in ((SamplingConfig(top_k=65), "max_top_k 64"), (SamplingConfig(repetition_window=65), "window")):
        with pytest.raises(ConfigError, match=words):
            RealtimeEngine(generator, codec, RealtimeEngineConfig(num_slots=2, sampling=sampling))


async def test_long_conversations_drop_old_turns_but_keep_the_prefix(tiny_realtime_dir, codec):
    async with make_engine(tiny_realtime_dir, codec, max_context=320, max_frames_per_turn=16) as engine:
        conversation = await engine.open_conversation(system_prompt="You are a calm narrator.")
        generator, slot = engine.generator, conversation.slot
        prefix_rows = generator.context_layout(slot).prefix_rows
        lengths, prefix = [], None
        for turn in range(14):
            chunks = await speak(conversation, f"Turn number {turn}, a few words.", turn + 1,
                                 UserTurn(f"Question {turn} from the user?"))
            assert chunks, f"turn {turn} produced no audio"
            rows = generator.context_rows(slot)
            prefix = rows[:prefix_rows] if prefix is None else prefix
            assert torch.equal(rows[:prefix_rows], prefix), "the system prompt rows were lost"
            lengths.append(len(rows))
        assert max(lengths) <= 320
        assert any(b < a for a, b in itertools.pairwise(lengths)), "the context was never trimmed"
        await conversation.aclose()
