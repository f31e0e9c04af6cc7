"""PocketSphinx free dictation in a child process, and the parent's handle on it.

Why a process: PocketSphinx holds the GIL for the whole of each decoder call, and free dictation
(the language-model search) takes 1-3 s of CPU for a 4 s utterance. In the serving process that
froze the event loop for as long, and with it every WebRTC peer's outbound audio (Chromium concealed
50-130k samples per turn); fed in small blocks the loop still only got the GIL in 5 ms slices
between blocks. In a child the search has its own interpreter and, on a multi-core machine, its own
core. Grammar and keyphrase searches take tens of ms and stay in the calling process.

The child runs this file as a script (it imports nothing of moss_agent, so it needs no package
path). Messages both ways are a 4-byte big-endian length and a payload: requests are 16 kHz s16 mono
bytes; answers are JSON, first ``{"ready": true}`` or ``{"error": ...}`` once the model has loaded,
then ``{"text": ...}`` or ``{"error": ...}`` per request. The child exits at EOF on its stdin, so it
never outlives its parent.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import subprocess
import sys
import weakref
from typing import IO, Any

_HEADER = struct.Struct(">I")
_RATE = 16000
_STOP_TIMEOUT_S = 5.0


def _send(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> bytes | None:
    """One message, or None at EOF (also for a message cut short)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def _answer(stream: IO[bytes], **message: Any) -> None:
    _send(stream, json.dumps(message).encode())


def main() -> int:
    """The child: load the model, then decode utterances until stdin closes."""
    # Ctrl-C reaches the whole process group; the parent decides when to stop (it closes stdin).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    try:
        import pocketsphinx

        decoder = pocketsphinx.Decoder(samprate=_RATE, loglevel="FATAL")
    except Exception as exc:  # reported to the parent, which raises STTError
        _answer(answers, error=f"could not load the PocketSphinx English model: {exc}")
        return 1
    _answer(answers, ready=True)
    while (raw := _receive(requests)) is not None:
        try:
            decoder.start_utt()
            decoder.process_raw(raw, full_utt=True)
            decoder.end_utt()
        except RuntimeError as exc:
            _answer(answers, error=f"PocketSphinx failed to decode the utterance: {exc}")
            continue
        hypothesis = decoder.hyp()
        _answer(answers, text="" if hypothesis is None else hypothesis.hypstr)
    return 0


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Close the child's stdin (it exits at EOF); kill it if it does not."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


class DecoderProcess:
    """The parent's handle: ``decode`` sends one utterance and blocks for its text (call it from a
    worker thread, one call at a time). Failures come back as ``RuntimeError`` with the child's
    message; a child that died is replaced on the next call. ``close`` (or garbage collection, or
    the parent's exit) ends the child."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._start()

    def _start(self) -> None:
        process = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
        )
        self._process = process
        self._finalizer = weakref.finalize(self, _stop, process)
        reply = self._reply(process)
        if "ready" not in reply:
            self.close()
            raise RuntimeError(str(reply.get("error", "the PocketSphinx worker process did not start")))

    def decode(self, raw: bytes) -> str:
        """Text of one utterance of 16 kHz s16 mono audio ``raw``."""
        if self._process is None or self._process.poll() is not None:
            self.close()
            self._start()
        process = self._process
        assert process is not None and process.stdin is not None
        try:
            _send(process.stdin, raw)
        except OSError:
            self.close()
            raise RuntimeError(
                "the PocketSphinx worker process went away; it is restarted on the next utterance"
            ) from None
        reply = self._reply(process)
        if "text" not in reply:
            raise RuntimeError(str(reply.get("error", "the PocketSphinx worker process answered nothing")))
        return str(reply["text"])

    def _reply(self, process: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert process.stdout is not None
        payload = _receive(process.stdout)
        if payload is None:
            code = process.wait()
            self.close()
            return {
                "error": f"the PocketSphinx worker process exited (status {code}); it is restarted on the next utterance"
            }
        message = json.loads(payload)
        return message if isinstance(message, dict) else {}

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer = None
        self._process = None


if __name__ == "__main__":
    sys.exit(main())
