"""Run a FastAPI app with uvicorn in a thread for browser tests."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import uvicorn
from fastapi import FastAPI

from cpmlive.serve.dashboard import bind

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def serving(app: FastAPI, stop_timeout: float = 30, config: uvicorn.Config | None = None) -> Iterator[str]:
    """The app's base URL while it serves on a free local port (with ``config``, uvicorn's
    configuration of that app, e.g. ``serve.app.server_config``'s)."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(config or uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout)
        sock.close()


@contextmanager
def chromium_page(width: int, height: int) -> Iterator[tuple[Any, list[str]]]:
    """A page of headless Chromium and the list its JavaScript errors go to."""
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it (apt-get install -y chromium), as .ci/run does")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()
