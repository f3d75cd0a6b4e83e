"""``cpmlive serve``: the headline app (智取标题) over one loaded model and its adapters.

``POST /api/titles`` turns an article into candidate titles, ``POST /api/classify`` labels texts
with a classification adapter; the adapter is chosen per request over one copy of the base.

Model work runs on one dedicated thread (``ModelWorker``), one request at a time, while the event
loop keeps answering (the page, health checks). One thread and not starlette's thread pool: every
thread that runs torch ops gets a glibc malloc arena of its own, which is never given back, so a
pool of up to 40 threads made the server's memory grow with the number of concurrent requests it
had seen (``benchmarks/serve_memory.py`` measures it).

Every input is bounded:

* ``MAX_BODY_BYTES``: the request body as a whole (413 above it);
* ``MAX_REQUEST_CHARS``: the article (longer ones are refused; those over
  ``cpmlive.apps.headline.MAX_ARTICLE_CHARS`` are titled from their start, with a warning);
* ``MAX_TEXTS`` texts per ``/api/classify`` request, of at most ``MAX_TEXT_CHARS`` each;
* ``MAX_NAME_CHARS``: an adapter name;
* ``MAX_WAITING``: requests waiting for the model besides the one it runs; a request beyond
  them is answered 503 with ``Retry-After: RETRY_AFTER_SECONDS`` at once instead of queueing.

Every error response has one shape, ``{"error": "one line"}``: a failure the user can fix is 400
(413 for a body too large), an unknown path 404, a wrong method 405, a busy model 503, and an
unexpected exception (a bug; its traceback goes to the server's log) 500.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Sequence

from pydantic import BaseModel, BeforeValidator, Field

from cpmlive.errors import CpmliveError
from cpmlive.apps.headline import TitleOptions, suggest_titles
from cpmlive.serve.dashboard import bind

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from cpmlive.api import LM

PAGE = Path(__file__).parent / "pages" / "title.html"
PREFERRED_TITLE_ADAPTER = "headline"
MAX_BODY_BYTES = 1 << 20  # room for the longest article and a full classify request, JSON-escaped
MAX_REQUEST_CHARS = 100_000
MAX_TEXTS = 64
MAX_TEXT_CHARS = 2_000
MAX_NAME_CHARS = 200
MAX_WAITING = 4
RETRY_AFTER_SECONDS = 10


def as_list(value: Any) -> Any:
    """One text as a list of one (``/api/classify`` takes either)."""
    return [value] if isinstance(value, str) else value


AdapterName = Annotated[str | None, Field(max_length=MAX_NAME_CHARS)]
Texts = Annotated[list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]],
                  BeforeValidator(as_list), Field(max_length=MAX_TEXTS)]


class TitleRequest(BaseModel):
    article: str = Field(max_length=MAX_REQUEST_CHARS)
    n: int = Field(5, ge=1, le=10)
    adapter: AdapterName = None
    num_beams: int = Field(TitleOptions.num_beams, ge=1, le=8)
    samples: int = Field(TitleOptions.samples, ge=0, le=16)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class ClassifyRequest(BaseModel):
    text: Texts  # one text or a list of them
    adapter: AdapterName = None


# ---- model work (runs on the model's thread) ------------------------------------------------------


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
    name = pick_adapter(lm, request.adapter, "classify")
    with holding(lm, name):
        labels = lm.classify(request.text)
    return {"labels": labels, "adapter": name}


class ModelWorker:
    """The one thread all model work runs on, and the count of requests it holds (running or
    waiting); ``run`` refuses a request when ``max_waiting`` are already waiting."""

    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self.max_waiting = max_waiting
        self.pending = 0
        self._count_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpmlive-model")

    def _admit(self) -> bool:
        with self._count_lock:
            if self.pending > self.max_waiting:
                return False
            self.pending += 1
            return True

    def _release(self, _: Future) -> None:
        with self._count_lock:
            self.pending -= 1

    async def run(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` on the model's thread; 503 when too many requests wait for it.

        A request is counted until its work has finished or been cancelled before it started
        (a client that went away does not free the model any sooner)."""
        from fastapi import HTTPException

        if not self._admit():
            raise HTTPException(503, f"the model is busy with other requests: try again in {RETRY_AFTER_SECONDS} s",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        future = self._executor.submit(work, *args)
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)


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


def error_response(message: str, status_code: int = 400, headers: dict[str, str] | None = None) -> JSONResponse:
    """The app's one error shape: ``{"error": "one line"}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": " ".join(str(message).split()) or "error"}, status_code=status_code,
                        headers=headers)


def model_label(lm: LM) -> str:
    return Path(lm.name).name or lm.name


def too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 in the app's error
    shape, at once when its Content-Length says so, else as soon as the bytes read pass it.
    (Starlette's ``max_body_size`` answers in plain text, whatever the app's handlers say.)"""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await error_response(too_large(self.limit), 413)(scope, receive, send)
        read = 0

        async def counted() -> dict[str, Any]:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:
                raise HTTPException(413, too_large(self.limit))
            return message

        await self.app(scope, counted, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as ``error_response``: starlette's own (404, 405, 413, 503) would be ``{"detail"}``."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_message(exc.errors()))

    @app.exception_handler(CpmliveError)
    async def user_error(_: Request, exc: CpmliveError) -> JSONResponse:
        return error_response(str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.detail, exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:
        # starlette re-raises the exception after this answer, so the server logs its traceback
        return error_response(f"internal error ({type(exc).__name__}); see the server's log", 500)


def create_app(lm: LM, max_waiting: int = MAX_WAITING) -> FastAPI:
    """The page at ``/`` and the JSON API over ``lm``; at most ``max_waiting`` requests wait for
    the model (``app.state.model_worker``) besides the one it runs."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    page = PAGE.read_text(encoding="utf-8")
    worker = ModelWorker(max_waiting)

    app = FastAPI(title="cpmlive 智取标题", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.model_worker = worker
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    add_error_handlers(app)

    async def timed(work: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        start = time.perf_counter()
        answer = await worker.run(work, *args)
        return {**answer, "seconds": round(time.perf_counter() - start, 3)}

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

    from cpmlive.api import load
    from cpmlive.resources import adapter_path

    paths = [adapter_path(adapter) for adapter in adapters]
    sock = bind(host, port)
    with sock:
        lm = load(model, adapter=paths)
        names = ", ".join(lm.tasks) or "none"
        print(f"智取标题 on {model_label(lm)} (adapters: {names}) at http://{host}:{sock.getsockname()[1]}/ "
              "(Ctrl-C to stop)", flush=True)
        server = uvicorn.Server(uvicorn.Config(create_app(lm), log_level="warning"))
        server.run(sockets=[sock])


__all__ = ["MAX_BODY_BYTES", "MAX_REQUEST_CHARS", "MAX_TEXTS", "MAX_TEXT_CHARS", "MAX_WAITING", "ClassifyRequest",
           "ModelWorker", "TitleRequest", "create_app", "pick_adapter", "serve"]
