"""``cpmlive dashboard RUN_DIR``: a live web page over a run's ``metrics.jsonl``.

The page (``pages/dashboard.html``, self-contained: no CDN) polls ``/api/metrics?since=N``.
``N`` is a byte offset into the log: each answer carries only the complete lines written
since, plus the offset to ask from next, so polling a long run stays cheap. A torn last
line is left for a later poll; a line that never parses is skipped, as ``read_records`` does.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpmlive.errors import CpmliveError
from cpmlive.train.metrics import METRICS_FILE

if TYPE_CHECKING:
    from fastapi import FastAPI

PAGE = Path(__file__).parent / "pages" / "dashboard.html"
CHUNK_BYTES = 4 << 20


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    """JSON records of complete lines; NaN / Infinity become None so the answer stays valid JSON."""
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line, parse_constant=lambda _: None)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def file_id(stat: os.stat_result) -> str:
    return f"{stat.st_dev}-{stat.st_ino}"


def read_complete_lines(path: Path, start: int, limit: int) -> tuple[bytes, bool]:
    """Bytes from ``start`` to the last newline within ``limit`` (further if one line is longer),
    and whether the limit cut the read short."""
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(limit)
        full = len(data) == limit
        if full and b"\n" not in data:
            data += handle.readline()
    return data[: data.rfind(b"\n") + 1], full


def read_since(run_dir: Path, since: int = 0, file: str | None = None, limit: int = CHUNK_BYTES) -> dict[str, Any]:
    """The records written after byte ``since``; starts over when the log was replaced or truncated."""
    path = run_dir / METRICS_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {"exists": False, "records": [], "next": 0, "file": None, "reset": since > 0, "more": False}
    reset = since > stat.st_size or since < 0 or (file is not None and file != file_id(stat))
    start = 0 if reset else since
    data, full = read_complete_lines(path, start, limit)
    end = start + len(data)
    return {"exists": True, "records": parse_lines(data), "next": end, "file": file_id(stat), "reset": reset,
            "more": full and end < stat.st_size}


def create_app(run_dir: str | os.PathLike) -> FastAPI:
    from fastapi import FastAPI, Query
    from fastapi.responses import HTMLResponse, JSONResponse

    run = Path(run_dir)
    page = PAGE.read_text(encoding="utf-8")
    app = FastAPI(title="cpmlive dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/metrics")
    def metrics(since: int = Query(0, ge=0), file: str | None = None) -> JSONResponse:
        answer = read_since(run, since, file)
        return JSONResponse({"run": run.resolve().name, "now": time.time(), **answer},
                            headers={"Cache-Control": "no-store"})

    return app


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if not path.exists():
        raise CpmliveError(f"{run_dir}: no such run directory")
    if not path.is_dir():
        raise CpmliveError(f"{run_dir}: not a directory")
    return path


def bind(host: str, port: int) -> socket.socket:
    try:
        sock = socket.create_server((host, port), family=_family(host))
    except OSError as exc:
        raise CpmliveError(f"cannot listen on {host}:{port} ({os.strerror(exc.errno) if exc.errno else exc})") from None
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    path = check_run_dir(run_dir)
    sock = bind(host, port)
    print(f"dashboard for {path} at http://{host}:{sock.getsockname()[1]}/ (Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(path), log_level="warning"))
    server.run(sockets=[sock])


__all__ = ["create_app", "read_since", "serve"]
