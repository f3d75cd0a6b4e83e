"""``cpmlive serve``: one server for a model and its adapters.

* OpenAI-compatible ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``
  (``serve.completions``); native ``/v1/fill``, ``/v1/title``, ``/v1/classify`` (``serve.tasks``);
* ``/healthz`` (readiness: 503 while the model loads), ``/livez`` (liveness), ``/metrics``
  (Prometheus);
* the site (``serve.site``): the playground, the headline app and a run's training dashboard
  under one layout.

Every generation runs on one engine (``infer.engine``), every other piece of model work on its
thread as a job. Every input is bounded: the body (``MAX_BODY_BYTES``, 413 above it), each
field (the request models), the requests in flight (``Settings.max_batch + max_waiting``; one
more is answered 503 with ``Retry-After`` at once), the time a request may take
(``Settings.timeout``, then 504), the open connections and the time their headers take
(``serve.connections``). A client that disconnects cancels its work; so does a shutdown
(Ctrl-C, SIGTERM), which ends every stream in flight with a ``shutdown`` error event.

Security as vLLM and llama.cpp do it: the server binds 127.0.0.1 unless told otherwise; with an
API key (``--api-key`` or ``CPMLIVE_API_KEY``) every ``/v1`` and ``/api`` route needs
``Authorization: Bearer KEY`` (compared in constant time; 401 otherwise); no cross-origin access unless origins are
named; a request names only models and adapters the server loaded, and no field becomes a path.

Errors on ``/v1`` routes are OpenAI's ``{"error": {"message", "type", "param", "code"}}``; the
site's older ``/api`` routes keep ``{"error": "one line"}``. A failure the user can fix is 4xx,
never 500; an unexpected exception (a bug; its traceback goes to the log) is a JSON 500.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict

from cpmlive import __version__
from cpmlive.errors import CpmliveError
from cpmlive.serve import bee, completions, embeddings, site, tasks
from cpmlive.serve.dashboard import bind
from cpmlive.serve.runtime import MAX_WAITING, RETRY_AFTER_SECONDS, ServerError, ServerState, Settings
from cpmlive.serve.tasks import MAX_NAME_CHARS, MAX_REQUEST_CHARS, MAX_TEXT_CHARS, MAX_TEXTS, pick_adapter

if TYPE_CHECKING:
    from cpmlive.api import LM

MAX_BODY_BYTES = 1 << 20  # room for the longest article and a full classify request, JSON-escaped
SHUTDOWN_GRACE_SECONDS = 5  # for answers in flight to end after Ctrl-C (each ends within DISCONNECT_POLL_SECONDS)
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout"}


PYDANTIC_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


def most_relevant(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The problem to report: pydantic lists one per member of a union (``stop``: a string or a
    list), and a member refused only for the input's type ("Input should be a valid string" for a
    list) is the one the client did not mean."""
    meant = [error for error in errors if not str(error.get("type", "")).endswith("_type")]
    return (meant or list(errors))[0]


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """The most relevant problem of a rejected request body, on one line, and the field it is in."""
    if not errors:
        return "invalid request", None
    error = most_relevant(errors)
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # pydantic also names the union member or validator it tried ("str", "function-after[...]"):
    # the field names and list indices are enough
    parts = [str(part) for part in error.get("loc", ()) if part != "body"
             and (isinstance(part, int) or (str(part).isidentifier() and part not in PYDANTIC_TYPE_NAMES))]
    where = ".".join(parts)
    if not where and error.get("type") == "value_error":  # a check of the whole body
        return str(error.get("msg", "invalid request")).removeprefix("Value error, "), None
    if not where:
        return "the request body must be a JSON object", None
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {' '.join(message.split())}", parts[0]


def error_response(path: str, message: str, status: int = 400, kind: str | None = None, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """One error shape per family of routes (see the module docstring)."""
    from fastapi.responses import JSONResponse

    line = " ".join(str(message).split()) or "error"
    if path.startswith("/v1"):
        body: dict[str, Any] = {"error": {"message": line, "type": kind or OPENAI_TYPES.get(status, "server_error"),
                                          "param": param, "code": code}}
    else:
        body = {"error": line}
    return JSONResponse(body, status_code=status, headers=headers)


def too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 in the app's error
    shape, at once when its Content-Length says so, else as soon as the bytes read pass it.
    (Starlette's ``max_body_size`` answers in plain text, whatever the app's handlers say.)
    A body that has not all arrived ``timeout`` seconds after its headers is answered 408: a
    client that trickles its body would otherwise hold a connection, and a slot under
    ``--max-connections``, for ever."""

    def __init__(self, app: Any, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await error_response(scope["path"], too_large(self.limit), 413)(scope, receive, send)
        read, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def counted() -> dict[str, Any]:
            nonlocal read, complete
            if complete:  # after the body only a disconnect comes, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            read += len(message.get("body", b""))
            if read > self.limit:
                raise HTTPException(413, too_large(self.limit))
            return message

        await self.app(scope, counted, send)


class CountRequests:
    """ASGI middleware: each answer counted by route and status (``cpmlive_http_requests``).
    Plain ASGI, not ``@app.middleware("http")``: behind starlette's ``BaseHTTPMiddleware``,
    ``request.is_disconnected()`` never sees a client leave (its ``receive`` must suspend, and
    the poll cancels it first), so a non-streamed request's work ran on after its client left."""

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router on this same scope
            self.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()


GUARDED_PREFIXES = ("/v1", "/api/")  # model work and data; pages, /healthz, /livez and /metrics stay open


class ApiKey:
    """ASGI middleware: every ``/v1`` and ``/api`` route needs ``Authorization: Bearer KEY``
    (a CORS preflight, which carries no credentials, passes to the CORS layer)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        from starlette.datastructures import Headers

        if scope["type"] == "http" and scope["path"].startswith(GUARDED_PREFIXES) and scope["method"] != "OPTIONS":
            given = Headers(scope=scope).get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                response = error_response(scope["path"], "invalid or missing API key (send Authorization: Bearer KEY)",
                                          401, "authentication_error", "invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as ``error_response``: starlette's own (404, 405, 413) would be ``{"detail"}``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(request.url.path, message, 400, param=param)

    @app.exception_handler(CpmliveError)
    async def user_error(request: Request, exc: CpmliveError) -> JSONResponse:
        return error_response(request.url.path, str(exc))

    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(request.url.path, exc.message, exc.status, exc.kind, exc.code, exc.param, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.detail, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # starlette re-raises the exception after this answer, so the server logs its traceback
        return error_response(request.url.path, f"internal error ({type(exc).__name__}); see the server's log", 500)


# ---- the OpenAPI document (/openapi.json, /docs) ---------------------------------------------------

OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
SITE_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the errors as this server answers them: a request it cannot
    parse is 400, not FastAPI's 422, and every route's other answers carry the error shape of
    its family of routes (OpenAI's under ``/v1``, ``{"error": "..."}`` elsewhere)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components.update(OpenAIError=OPENAI_ERROR, SiteError=SITE_ERROR)
        for path, operations in document["paths"].items():
            shape = "OpenAIError" if path.startswith("/v1") else "SiteError"
            for operation in operations.values():
                operation["responses"].pop("422", None)
                operation["responses"]["default"] = {
                    "description": "an error: 4xx for a request the server will not serve (never 5xx for bad input)",
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}}}
        app.openapi_schema = document
    return app.openapi_schema


class Health(BaseModel):
    """``/healthz``: ``ok`` with the engine's counts, or ``loading`` / ``failed`` (503)."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "loading", "failed"]
    model: str | None = None
    error: str | None = None


class Liveness(BaseModel):
    status: Literal["alive"]


def create_app(lm: LM | Callable[[], LM] | None, settings: Settings | None = None,
               max_waiting: int | None = None) -> FastAPI:
    """The server over ``lm`` (or over what ``lm()`` loads, in the background: ``/healthz``
    answers 503 meanwhile; ``None``: the caller attaches one); ``app.state.server`` is its
    :class:`~cpmlive.serve.runtime.ServerState`. Its OpenAPI document is at ``/openapi.json``
    and Swagger UI at ``/docs``, as vLLM serves them (the page loads Swagger UI's script and style
    from a CDN: offline, /openapi.json still answers)."""
    settings = settings or Settings()
    if max_waiting is not None:
        settings.max_waiting = max_waiting
    state = ServerState(settings)
    app = FastAPI(title="cpmlive", version=__version__, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: openapi_document(app)
    app.state.server = state
    if lm is None:
        pass  # the caller loads it (``state.load_here``) and drives the engine
    elif callable(lm) and not hasattr(lm, "model"):
        app.state.loading = state.load_in_background(lm)
    else:
        state.attach(lm)
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, timeout=settings.header_timeout)
    if settings.cors_origins:  # outermost, so that its headers are on every answer, a 401 too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    add_error_handlers(app)

    app.add_middleware(CountRequests, metrics=state.metrics)  # outermost: every answer is counted

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    def healthz() -> JSONResponse:
        if state.lm is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return JSONResponse({"status": "ok", "model": state.base_name, **state.engine.stats()})

    @app.get("/livez", response_model=Liveness)
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(completions.router(state))
    app.include_router(tasks.router(state))
    app.include_router(bee.router(state))
    app.include_router(embeddings.router(state))
    app.include_router(site.router(state))
    return app


def parse_adapter(value: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH`` (named after its directory)."""
    name, sep, path = value.partition("=")
    if sep and name and os.sep not in name and not name.startswith("."):
        return name, path
    return None, value


def server_config(app: FastAPI, settings: Settings) -> Any:
    """uvicorn's configuration for ``app``: connections bounded by ``settings.max_connections``
    (and the open-file limit) and ``settings.header_timeout``, a bounded graceful shutdown."""
    import uvicorn

    from cpmlive.serve.connections import connection_cap, guarded_protocol

    protocol = guarded_protocol(connection_cap(settings.max_connections), settings.header_timeout)
    return uvicorn.Config(app, log_level="warning", http=protocol, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)


def serve(model: str | os.PathLike = "demo", adapters: Sequence[str | os.PathLike] = (),
          host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> None:
    """Load ``model`` with ``adapters`` (``NAME=PATH``, directories or shipped names) and serve until
    Ctrl-C. The port is bound first and the model loads behind it (``/healthz`` says when it is ready).
    The first Ctrl-C (or SIGTERM) once the model is loaded shuts down: what is in flight ends
    with a ``shutdown`` error while the engine goes on driving their cancellation; a second one,
    or one during loading, stops at once."""
    import uvicorn

    from cpmlive.api import load
    from cpmlive.resources import adapter_path

    named = [parse_adapter(str(a)) for a in adapters]
    paths = [(name, adapter_path(path)) for name, path in named]
    settings = settings or Settings()

    def load_model() -> LM:
        lm = load(model, memory_limit=settings.memory_limit)
        for name, path in paths:
            lm.add_adapter(path, name=name)
        if settings.assistant_model is not None:
            lm.set_assistant(settings.assistant_model)
        if settings.bee_prompt_field is not None:
            lm.bee_text_field = settings.bee_prompt_field
        return lm

    check_model(model)
    if settings.assistant_model is not None:
        check_model(settings.assistant_model)
    sock = bind(host, port)
    with sock:
        app = create_app(None, settings)
        state = app.state.server
        server = uvicorn.Server(server_config(app, settings))
        http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cpmlive-http", daemon=True)
        http.start()
        address = f"http://{host}:{sock.getsockname()[1]}"
        print(f"cpmlive serving {model} at {address}/ (OpenAI API at {address}/v1; "
              f"{'API key required' if settings.api_key else 'no API key'}; Ctrl-C to stop)", flush=True)
        previous = _on_stop(lambda: _shut_down(state, server))
        try:
            if state.load_here(load_model):  # the model loads and runs on the main thread
                state.engine.drive(lambda: not http.is_alive())
        except KeyboardInterrupt:  # a second Ctrl-C, or one while the model loads: go now
            server.force_exit = True
        finally:
            state.close()
            server.should_exit = True
            http.join(SHUTDOWN_GRACE_SECONDS + 5)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if state.load_error is not None:
        raise CpmliveError(state.load_error)


def _on_stop(stop: Callable[[], None]) -> dict[int, Any]:
    """Call ``stop`` on Ctrl-C and SIGTERM (a container's stop) instead of raising; the previous
    handlers (none off the main thread, where signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: object) -> None:
        stop()

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def _shut_down(state: ServerState, server: Any) -> None:
    """The first stop signal ends what is in flight with an error and lets uvicorn close
    gracefully, with the engine still driven meanwhile; the second, or one while the model
    loads (nothing to drain yet), interrupts the main thread."""
    if state.closing.is_set() or state.engine is None:
        raise KeyboardInterrupt
    state.close()
    server.should_exit = True


def check_model(model: str | os.PathLike) -> None:
    """Refuse a model that names neither a checkpoint nor a preset before binding the port; a
    directory with no checkpoint of its family in it is refused here too (no weights are read)."""
    from cpmlive.model.registry import check_model as named_model
    from cpmlive.model.registry import family_of

    path = named_model(model)
    if path.exists():
        family_of(model).resolve(path)


__all__ = ["MAX_BODY_BYTES", "MAX_NAME_CHARS", "MAX_REQUEST_CHARS", "MAX_TEXTS", "MAX_TEXT_CHARS", "MAX_WAITING",
           "RETRY_AFTER_SECONDS", "Settings", "create_app", "parse_adapter", "pick_adapter", "serve"]
