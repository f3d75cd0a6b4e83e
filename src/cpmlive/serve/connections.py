"""Bounds on the server's connections, which uvicorn does not set itself: at most
``max_connections`` open at once (one more is answered 503 and closed at once, so that a flood
of idle connections never exhausts the process's file descriptors), and each request's
headers must arrive within ``header_timeout`` seconds of the connection opening or of the
previous response on it (a client that trickles them, as slowloris does, is cut off).
nginx (``worker_connections``, ``client_header_timeout``) and Apache (``MaxRequestWorkers``,
``RequestReadTimeout``) bound both the same way.
"""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Any

from cpmlive.serve.runtime import RETRY_AFTER_SECONDS

RESERVED_FILES = 64  # descriptors kept for the model's files, logs and the listening socket


def busy_response(limit: int) -> bytes:
    """A whole HTTP answer, written before the request is read (OpenAI's error shape)."""
    body = json.dumps({"error": {"message": f"the server has too many open connections (at most {limit})",
                                 "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"retry-after: {RETRY_AFTER_SECONDS}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def connection_cap(requested: int) -> int:
    """``requested``, lowered to what the open-file limit leaves after ``RESERVED_FILES``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - RESERVED_FILES))


def guarded_protocol(max_connections: int, header_timeout: float) -> type[asyncio.Protocol]:
    """The HTTP protocol uvicorn would pick (``uvicorn.Config(http=...)``), with both bounds."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            self.header_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy_response(max_connections))
                transport.close()
                return
            self.await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_timer()
            super().connection_lost(exc)

        def await_headers(self) -> None:
            """The next request's headers are due within ``header_timeout``."""
            self.stop_timer()
            self.header_timer = self.loop.call_later(header_timeout, self.headers_late)

        def stop_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_late(self) -> None:
            self.header_timer = None
            running = self.cycle is not None and not self.cycle.response_complete
            if not running and not self.transport.is_closing():  # no request began in time
                self.transport.close()

    return GuardedProtocol


__all__ = ["connection_cap", "guarded_protocol"]
