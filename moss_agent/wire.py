"""The one guarded entry point for JSON that comes from outside: network messages, HTTP bodies,
data-channel messages and JSONL lines.

Everything a hostile sender can do to ``json.loads`` is stopped before or while parsing and comes
out as one exception type chosen by the caller (``TransportError`` on the network, ``ConfigError``
for files): too many bytes, nesting deep enough to exhaust the recursion limit, invalid UTF-8,
NaN/Infinity, duplicate keys (which would let two parsers disagree on a message), and anything but
an object at the top. No other exception escapes.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from moss_agent.errors import MossError, TransportError

JsonDict = dict[str, Any]

MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSE = np.frombuffer(b"]}", dtype=np.uint8)


def json_depth(data: bytes) -> int:
    """How deeply ``data``'s arrays and objects nest (strings ignored), without recursing."""
    structure = np.frombuffer(_STRING.sub(b"", data), dtype=np.uint8)
    if structure.size == 0:
        return 0
    steps = np.isin(structure, _OPEN).astype(np.int32) - np.isin(structure, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> JsonDict:
    result: JsonDict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode_json_object(
    data: bytes | str,
    *,
    what: str = "message",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[MossError] = TransportError,
) -> JsonDict:
    """A JSON object from untrusted ``data``, or ``error`` saying what is wrong with it.

    ``what`` names the input in the message ("offer body", "requests.jsonl:12").
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise error(f"{what} is larger than {max_bytes} bytes ({len(raw)})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"{what} nests {depth} levels deep; at most {max_depth} are accepted")
    try:
        message = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(message, dict):
        raise error(f"{what} must be a JSON object, got {type(message).__name__}")
    return message
