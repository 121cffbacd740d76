"""A real headless Chromium driven over the DevTools protocol: open a page, wait for it, read the DOM, screenshot."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import websockets

from tests.integration.services import free_port

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@contextlib.contextmanager
def chromium() -> Iterator[int]:
    """Start Chromium with a DevTools port; yields the port."""
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no chromium on PATH")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="fedscan-chromium-")
    proc = subprocess.Popen(
        [exe, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2)
                break
            time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


async def _session(port: int, url: str, script: str, screenshot: Path | None, timeout: float) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?{url}", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        target = json.loads(resp.read())
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=64 * 2**20) as ws:
        counter = 0

        async def call(method: str, **params: Any) -> dict[str, Any]:
            nonlocal counter
            counter += 1
            my_id = counter
            await ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == my_id:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return dict(msg.get("result", {}))

        deadline = time.monotonic() + timeout
        result: Any = None
        while time.monotonic() < deadline:
            out = await call("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
            result = out.get("result", {}).get("value")
            if result:
                break
            await asyncio.sleep(0.5)
        if screenshot is not None:
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return result


def evaluate_when_ready(
    port: int, url: str, script: str, *, screenshot: Path | None = None, timeout: float = 60
) -> Any:
    """Open ``url``, poll the JS expression ``script`` until it is truthy (or time runs out), screenshot."""
    return asyncio.run(_session(port, url, script, screenshot, timeout))
