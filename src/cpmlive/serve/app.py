"""``cpmlive serve``: the headline app (智取标题) over one loaded model and its adapters.

``POST /api/titles`` turns an article into candidate titles, ``POST /api/classify`` labels texts
with a classification adapter; the adapter is chosen per request over one copy of the base.
Model work runs in a worker thread under ``lm.using(name)``, whose lock lets one request at a
time use the model while the event loop keeps answering (the page, health checks).
Every failure the user can fix is HTTP 400 with ``{"error": "one line"}``.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from pydantic import BaseModel, Field

from cpmlive.errors import CpmliveError
from cpmlive.infer.headline import TitleOptions, suggest_titles
from cpmlive.serve.dashboard import bind

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cpmlive.api import LM

PAGE = Path(__file__).parent / "pages" / "title.html"
MAX_REQUEST_CHARS = 1_000_000
PREFERRED_TITLE_ADAPTER = "headline"


class TitleRequest(BaseModel):
    article: str = Field(max_length=MAX_REQUEST_CHARS)
    n: int = Field(5, ge=1, le=10)
    adapter: str | None = None
    num_beams: int = Field(TitleOptions.num_beams, ge=1, le=8)
    samples: int = Field(TitleOptions.samples, ge=0, le=16)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class ClassifyRequest(BaseModel):
    text: str | list[str]
    adapter: str | None = None


# ---- model work (runs in a worker thread) ---------------------------------------------------------


def adapter_tasks(lm: LM) -> dict[str, str]:
    return {name: spec.task for name, spec in lm.tasks.items()}


def pick_adapter(lm: LM, requested: str | None, task: str) -> str | None:
    """The request's adapter (checked to do ``task``), else a loaded one that does; for
    titles, "headline" first and the base model when none does."""
    tasks = adapter_tasks(lm)
    if requested is not None:
        if requested not in tasks:
            raise CpmliveError(f"no adapter named {requested!r} (loaded: {', '.join(tasks) or 'none'})")
        if tasks[requested] != task:
            raise CpmliveError(f"adapter {requested!r} is for {tasks[requested]}, not {task}")
        return requested
    fitting = [name for name, kind in tasks.items() if kind == task]
    if task == "classify" and not fitting:
        raise CpmliveError("no classification adapter loaded (start the server with --adapter NAME_OR_PATH)")
    if PREFERRED_TITLE_ADAPTER in fitting and task == "generate":
        return PREFERRED_TITLE_ADAPTER
    return fitting[0] if fitting else None


@contextmanager
def holding(lm: LM, name: str | None) -> Iterator[LM]:
    """``lm.using(name)``; a model without any adapter is only locked (there is nothing to switch)."""
    if name is None and not lm.tasks:
        with lm.lock:
            yield lm
        return
    with lm.using(name) as held:
        yield held


def warning_text(caught: Sequence[warnings.WarningMessage]) -> str | None:
    messages = dict.fromkeys(str(w.message) for w in caught)
    return "; ".join(messages) or None


def titles_for(lm: LM, request: TitleRequest) -> dict[str, Any]:
    options = TitleOptions(n=request.n, num_beams=request.num_beams, samples=request.samples, seed=request.seed)
    name = pick_adapter(lm, request.adapter, "generate")
    with holding(lm, name), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        titles = suggest_titles(lm, request.article, options)
    return {"titles": titles, "warning": warning_text(caught), "adapter": name}


def labels_for(lm: LM, request: ClassifyRequest) -> dict[str, Any]:
    texts = [request.text] if isinstance(request.text, str) else request.text
    name = pick_adapter(lm, request.adapter, "classify")
    with holding(lm, name):
        labels = lm.classify(texts)
    return {"labels": labels, "adapter": name}


# ---- the web app ----------------------------------------------------------------------------------


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """The first problem of a rejected request body, on one line."""
    if not errors:
        return "invalid request"
    error = errors[0]
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    if not where:
        return "the request body must be a JSON object"
    return f"{where}: {' '.join(str(error.get('msg', 'invalid value')).split())}"


def error_response(message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": " ".join(message.split())}, status_code=400)


def model_label(lm: LM) -> str:
    return Path(lm.name).name or lm.name


async def timed(work: Any, *args: Any) -> dict[str, Any]:
    from starlette.concurrency import run_in_threadpool

    start = time.perf_counter()
    answer = await run_in_threadpool(work, *args)
    return {**answer, "seconds": round(time.perf_counter() - start, 3)}


def create_app(lm: LM) -> FastAPI:
    """The page at ``/`` and the JSON API over ``lm``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse

    page = PAGE.read_text(encoding="utf-8")
    app = FastAPI(title="cpmlive 智取标题", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> Any:
        return error_response(validation_message(exc.errors()))

    @app.exception_handler(CpmliveError)
    async def user_error(_: Request, exc: CpmliveError) -> Any:
        return error_response(str(exc))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"model": model_label(lm), "adapters": list(lm.tasks), "tasks": adapter_tasks(lm)}

    @app.post("/api/titles")
    async def titles(request: TitleRequest) -> dict[str, Any]:
        return await timed(titles_for, lm, request)

    @app.post("/api/classify")
    async def classify(request: ClassifyRequest) -> dict[str, Any]:
        return await timed(labels_for, lm, request)

    return app


def serve(model: str | os.PathLike = "demo", adapters: Sequence[str | os.PathLike] = (),
          host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load ``model`` with ``adapters`` (directories or shipped names) and serve the app until Ctrl-C."""
    import uvicorn

    from cpmlive.api import load, resolve_adapter

    paths = [resolve_adapter(adapter) for adapter in adapters]
    sock = bind(host, port)
    with sock:
        lm = load(model, adapter=paths)
        names = ", ".join(lm.tasks) or "none"
        print(f"智取标题 on {model_label(lm)} (adapters: {names}) at http://{host}:{sock.getsockname()[1]}/ "
              "(Ctrl-C to stop)", flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(lm), log_level="warning"))
        server.run(sockets=[sock])


__all__ = ["ClassifyRequest", "TitleRequest", "create_app", "pick_adapter", "serve"]
