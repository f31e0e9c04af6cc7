"""Streaming text -> token ids: growing-text tokenization is chunking-invariant; upstream segmentation."""

from __future__ import annotations

import random

from moss_agent.models.realtime.text import GrowingTextTokenizer, UpstreamSegmentTokenizer

TEXTS = [
    "Hello, world! It's a test of the realtime voice... really?  Yes:  12,345.67 dollars.\n\nNew line; café — (x) [y] don't",
    "你好，世界！这是一个测试。没有标点的中文文本也应该正确处理吗",
    "   leading spaces and trailing   ",
    "emoji 😀👍🏽 and URLs https://example.com/a?b=1&c=2 #hash @user",
    "a\tb\r\nc  \n  d",
    "Ünïcödé cafe\u0301 combining and NFC forms",
]


def _stream(tokenizer, text: str, rng: random.Random, max_chunk: int) -> list[int]:
    growing = GrowingTextTokenizer(tokenizer)
    ids: list[int] = []
    start = 0
    while start < len(text):
        size = rng.randint(1, max_chunk)
        ids += growing.push(text[start : start + size])
        start += size
    return ids + growing.finish()


def test_fixed_texts_any_chunking(tokenizer) -> None:
    rng = random.Random(0)
    for text in TEXTS:
        whole = tokenizer.encode(text, add_special_tokens=False)
        for trial in range(40):
            assert _stream(tokenizer, text, rng, max_chunk=1 + trial % 7) == whole, text


def test_random_texts_any_chunking(tokenizer) -> None:
    rng = random.Random(1)
    pieces = [*"ab c,.!?  \n\t'-—1234éü你好😀()[]", " the", "don't", "  ", "\n\n", "...", "’", "\u0301"]
    for _ in range(100):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(3, 50)))
        whole = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(4):
            assert _stream(tokenizer, text, rng, max_chunk=5) == whole, repr(text)


def test_ids_are_committed_early(tokenizer) -> None:
    growing = GrowingTextTokenizer(tokenizer)
    assert growing.push("Hello") == []  # the word may still grow
    assert growing.push(" wor") == tokenizer.encode("Hello", add_special_tokens=False)
    assert growing.push("ld and") == tokenizer.encode(" world", add_special_tokens=False)
    assert growing.finish() == tokenizer.encode(" and", add_special_tokens=False)


def test_upstream_segmentation_tokenizes_each_segment_alone(tokenizer) -> None:
    upstream = UpstreamSegmentTokenizer(tokenizer)
    assert upstream.push("Hi, ") == []  # a cut must end at character 8 or later: wait
    ids = upstream.push("there, world") + upstream.finish()
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces == ["Hi", ",", " there", ",", " ", "world"]  # the cut leaves the space as its own token
    long_upstream = UpstreamSegmentTokenizer(tokenizer)
    cut = long_upstream.push("abcdefghij klmnopqrstuvwxyz abcdefg more")  # 32+ chars, no punctuation
    assert tokenizer.decode(cut) == "abcdefghij klmnopqrstuvwxyz abcdefg "
