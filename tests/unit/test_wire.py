"""The guarded JSON decoder: every hostile input becomes the caller's error type, nothing else."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moss_agent.errors import ConfigError, TransportError
from moss_agent.wire import MAX_JSON_DEPTH, decode_json_object, json_depth


def test_a_plain_object_decodes() -> None:
    assert decode_json_object(b'{"type": "ping", "n": [1, {"a": "[[["}]}') == {"type": "ping", "n": [1, {"a": "[[["}]}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"[" * 20000 + b"]" * 20000, "levels deep"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "levels deep"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": Infinity}', "Infinity is not a JSON number"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'"text"', "must be a JSON object, got str"),
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"x": "' + b"a" * 70000 + b'"}', "larger than"),
    ],
)
def test_hostile_json_is_the_callers_error(data: bytes, words: str) -> None:
    with pytest.raises(TransportError, match=words):
        decode_json_object(data, what="control message")


def test_the_error_type_and_name_are_the_callers() -> None:
    with pytest.raises(ConfigError, match=r"requests\.jsonl:3 must be a JSON object"):
        decode_json_object("[]", what="requests.jsonl:3", error=ConfigError)


def test_depth_ignores_brackets_inside_strings() -> None:
    assert json_depth(b'{"a": "[[[[{{{{\\"]]]"}') == 1
    assert json_depth(b'[[["x"]]]') == 3
    nested = json.dumps(json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)).encode()
    assert json_depth(nested) == MAX_JSON_DEPTH


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_give_an_object_or_the_error(data: bytes) -> None:
    with contextlib.suppress(TransportError):
        assert isinstance(decode_json_object(data), dict)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json_round_trips_when_it_is_a_shallow_object(value: object) -> None:
    data = json.dumps({"v": value}).encode()
    if json_depth(data) <= MAX_JSON_DEPTH:
        assert decode_json_object(data) == {"v": value}
    else:
        with pytest.raises(TransportError, match="levels deep"):
            decode_json_object(data)
