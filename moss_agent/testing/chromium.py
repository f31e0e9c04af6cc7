"""Headless Chromium driven over the DevTools protocol, for tests and benchmarks of the voice page.

``async with Chromium(binary, profile, fake_audio=wav) as browser`` starts one browser whose fake
microphone plays ``wav`` (looped); ``tab = await browser.open(url)`` opens a tab;
``await tab.evaluate(js)`` runs JavaScript in it (promises are awaited; the value comes back as
JSON), ``await tab.wait_for(js)`` waits until an expression is truthy. Needs the ``[webrtc]`` extra
(aiohttp) and a Chromium binary.

The flags keep WebRTC on 127.0.0.1 (loopback candidates allowed, no mDNS names, no DNS) and let the
page play audio without a user gesture.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from moss_agent._optional import require
from moss_agent.errors import TransportError

_START_TIMEOUT_S = 30.0


def chromium_flags(profile: Path, fake_audio: Path | None = None) -> list[str]:
    """Headless Chromium for the voice page on this machine; ``fake_audio`` is the microphone."""
    flags = [
        "--headless=new",
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns,NetworkTimeServiceQuerying",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--autoplay-policy=no-user-gesture-required",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-gpu",
    ]
    if fake_audio is not None:
        flags.append(f"--use-file-for-fake-audio-capture={fake_audio}")
    return flags


class Tab:
    """One page, over its DevTools WebSocket."""

    def __init__(self, browser: Chromium, target_id: str, socket: Any) -> None:
        self._browser = browser
        self.target_id = target_id
        self._socket = socket
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` (a promise is awaited); a page exception raises."""
        async with self._lock:
            request_id = next(self._ids)
            params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
            await self._socket.send_json({"id": request_id, "method": "Runtime.evaluate", "params": params})
            while True:
                message = json.loads(await self._socket.receive_str())
                if message.get("id") == request_id:
                    break
        if "error" in message:
            raise TransportError(f"DevTools refused the evaluation: {message['error']}")
        result = message["result"]
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise TransportError(
                f"the page raised: {details.get('exception', {}).get('description', details)}"
            )
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Wait (in the page, every 50 ms) until ``expression`` is truthy; its value."""
        waiter = (
            "new Promise((resolve) => { const check = () => { let v; try { v = (" + expression + "); }"
            " catch (err) { v = undefined; } if (v) resolve(v); else setTimeout(check, 50); }; check(); })"
        )
        try:
            async with asyncio.timeout(timeout_s):
                return await self.evaluate(waiter)
        except TimeoutError:
            raise TimeoutError(f"the page did not reach {expression!r} within {timeout_s} s") from None

    async def close(self) -> None:
        await self._socket.close()
        await self._browser.close_target(self.target_id)


class Chromium:
    """A headless Chromium process and its DevTools endpoint; closing it ends the process group."""

    def __init__(self, binary: str, profile: Path, *, fake_audio: Path | None = None) -> None:
        self._command = [
            binary,
            *chromium_flags(profile, fake_audio),
            "--remote-debugging-port=0",
            "about:blank",
        ]
        self._profile = profile
        self._process: subprocess.Popen[bytes] | None = None
        self._http: Any = None
        self._endpoint = ""

    async def start(self) -> None:
        aiohttp = require("aiohttp", "webrtc")
        self._profile.mkdir(parents=True, exist_ok=True)
        port_file = self._profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not port_file.is_file() or not port_file.read_text().strip():
                if self._process.poll() is not None:
                    raise TransportError(f"Chromium exited with status {self._process.returncode} at start")
                await asyncio.sleep(0.05)  # Chromium writes the file; there is nothing to wait on
        port = port_file.read_text().split()[0]
        self._endpoint = f"http://127.0.0.1:{port}"
        self._http = aiohttp.ClientSession()

    async def open(self, url: str) -> Tab:
        async with self._http.put(
            f"{self._endpoint}/json/new?{urllib.parse.quote(url, safe='')}"
        ) as response:
            target = await response.json()
        socket = await self._http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        tab = Tab(self, target["id"], socket)
        # The tab starts on about:blank; evaluating there, or while the page loads, would run in the
        # wrong document (or one that is going away).
        async with asyncio.timeout(_START_TIMEOUT_S):
            while True:
                with contextlib.suppress(TransportError):
                    if await tab.evaluate(
                        f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
                    ):
                        return tab
                await asyncio.sleep(0.05)

    async def close_target(self, target_id: str) -> None:
        async with self._http.get(f"{self._endpoint}/json/close/{target_id}") as response:
            await response.read()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._process is not None:
            await asyncio.to_thread(_stop, self._process)
            self._process = None

    async def __aenter__(self) -> Chromium:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM the browser alone first (it shuts its helpers down), then sweep its process group.
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=8)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
