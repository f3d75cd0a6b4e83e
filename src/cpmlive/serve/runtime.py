"""What every route of the server shares: the loaded model and its engine, the bound on requests
in flight, the metrics, and the bridge from the engine's thread to the event loop.

All model work runs on the engine's one thread (``infer.engine``): generations join its running
batch, other work (fill, titles, classification) runs there as jobs, in slices between the
batch's steps (``infer.engine.Job``). One thread and not starlette's pool: every thread that
runs torch ops keeps a glibc malloc arena of its own, which is never given back, so a pool of 40
threads made memory grow with the number of concurrent requests seen
(``benchmarks/serve_memory.py``).

Whatever a request started ends when the request does: its time is up (504), its client has
gone, or the server shuts down (503 ``shutdown``): :class:`Watch` says which, its generations
are cancelled and its job stops at the job's next model call. Every generation is counted in
the metrics once, when the engine ends it, whatever ended it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from cpmlive.errors import CpmliveError
from cpmlive.infer.engine import MAX_BATCH, TOKEN_BUDGET, Cancelled, Engine, Event, Handle, Request
from cpmlive.serve.metrics import ServerMetrics

if TYPE_CHECKING:
    from fastapi import Request as HttpRequest

    from cpmlive.api import LM

API_KEY_VARIABLE = "CPMLIVE_API_KEY"
MAX_WAITING = 64  # requests in flight beyond a full running batch before 503
RETRY_AFTER_SECONDS = 10
REQUEST_TIMEOUT_SECONDS = 600.0
DISCONNECT_POLL_SECONDS = 0.25
MAX_CONNECTIONS = 1000  # open connections; one more is answered 503 and closed
HEADER_TIMEOUT_SECONDS = 20.0  # for a request's headers to arrive (Apache's RequestReadTimeout: 20 to 40)


def valid_text(value: str) -> str:
    """A request's string, refused when it holds an unpaired surrogate (JSON can escape one; no
    UTF-8 can carry it back)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired surrogate (not valid Unicode text)") from None
    return value


class ServerError(Exception):
    """An answer other than 200: status, one-line message, OpenAI error type and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers


@dataclass
class Settings:
    """How the server runs (``cpmlive serve`` flags)."""

    api_key: str | None = None
    max_batch: int = MAX_BATCH
    token_budget: int = TOKEN_BUDGET
    max_waiting: int = MAX_WAITING
    timeout: float = REQUEST_TIMEOUT_SECONDS
    cors_origins: tuple[str, ...] = ()
    run_dir: Path | None = None  # a training run whose dashboard the site shows
    served_name: str | None = None  # the base model's name in /v1/models (default: its directory's)
    memory_limit: int | None = None  # bytes of weights kept resident (``model.streaming``)
    max_connections: int = MAX_CONNECTIONS
    header_timeout: float = HEADER_TIMEOUT_SECONDS
    assistant_model: str | None = None  # a draft model for speculative decoding (same vocabulary)
    prefix_cache_bytes: int | None = None  # prompt keys and values kept across requests (None: the engine's default)
    bee_prompt_field: str | None = None  # CPM-Bee: the task field a completion prompt fills (None: "input")
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def key_from_environment(given: str | None) -> str | None:
        return given if given is not None else (os.environ.get(API_KEY_VARIABLE) or None)


class ServerState:
    """The model (``None`` while it loads), its engine, admission and metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lm: LM | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.metrics = ServerMetrics(lambda: self.engine.stats() if self.engine is not None else {})
        self.in_flight = 0
        self._count_lock = threading.Lock()
        self.closing = threading.Event()  # set when the server shuts down

    def close(self) -> None:
        """Begin the shutdown: requests in flight end with a ``shutdown`` error at their next
        look (within ``DISCONNECT_POLL_SECONDS``), new ones are refused."""
        self.closing.set()

    # ---- the model ----------------------------------------------------------------------------

    def attach(self, lm: LM, own_thread: bool = True) -> None:
        """Serve ``lm`` on its engine (its own ``generate`` and the server share one scheduler),
        driven by a thread of its own, or (``own_thread=False``) by the caller's
        ``engine.run_forever()``, as ``cpmlive serve`` does from the main thread."""
        engine = lm.engine
        engine.max_batch, engine.token_budget = self.settings.max_batch, self.settings.token_budget
        if self.settings.prefix_cache_bytes is not None:
            engine.set_prefix_cache(self.settings.prefix_cache_bytes)
        if own_thread:
            engine.start()
        self.engine, self.lm = engine, lm

    def load_in_background(self, load: Callable[[], LM]) -> threading.Thread:
        def run() -> None:
            try:
                self.attach(load())
            except CpmliveError as exc:
                self.load_error = str(exc)
            except Exception as exc:  # reported by /healthz rather than lost in a thread
                self.load_error = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=run, name="cpmlive-load", daemon=True)
        thread.start()
        return thread

    def load_here(self, load: Callable[[], LM]) -> bool:
        """Load on this thread (which will drive the engine); whether it worked."""
        try:
            lm = load()
        except CpmliveError as exc:
            self.load_error = str(exc)
            return False
        self.attach(lm, own_thread=False)
        return True

    def ready(self) -> LM:
        if self.lm is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ServerError(503, message, "server_error", "model_not_ready",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return self.lm

    @property
    def base_name(self) -> str:
        lm = self.ready()
        return self.settings.served_name or Path(lm.name).name or lm.name

    def model_names(self) -> list[str]:
        """What a request may name: the base model and each loaded adapter."""
        return [self.base_name, *self.ready().tasks]

    def resolve(self, name: str | None) -> str | None:
        """The adapter a request's ``model`` names (``None``: the base model)."""
        lm = self.ready()
        if name is None or name == self.base_name:
            return None
        if name in lm.tasks:
            return name
        raise ServerError(404, f"the model {name!r} does not exist (served: {', '.join(self.model_names())})",
                          "invalid_request_error", "model_not_found", "model")

    # ---- admission ----------------------------------------------------------------------------

    def admit(self, count: int = 1) -> "Admitted":
        """Count ``count`` generations (or one job) in flight, or refuse with 503 when they would
        pass ``max_batch + max_waiting`` (one request alone is always let in)."""
        limit = self.settings.max_batch + self.settings.max_waiting
        if self.closing.is_set():
            raise shutting_down()
        with self._count_lock:
            if self.in_flight and self.in_flight + count > limit:
                self.metrics.rejected.inc()
                raise ServerError(503, f"the server is busy ({self.in_flight} requests in flight): "
                                  f"try again in {RETRY_AFTER_SECONDS} s", "server_error", "overloaded",
                                  headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            self.in_flight += count
        return Admitted(self, count)

    def _release(self, count: int) -> None:
        with self._count_lock:
            self.in_flight -= count

    # ---- work on the engine ---------------------------------------------------------------------

    async def job(self, work: Callable[..., Any], *args: Any, http: HttpRequest | None = None,
                  admitted: "Admitted | None" = None) -> Any:
        """``work(*args)`` as a job on the engine's thread. When the request's time is up, its
        client (``http``) has gone or the server shuts down, the job is cancelled (it stops at
        its next model call) and this raises; ``admitted`` stays counted until the work has
        stopped, not only until the answer."""
        self.ready()
        job = self.engine.call(work, *args)
        if admitted is not None:
            admitted.hold(job)
        done = asyncio.wrap_future(job)
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even when nobody waits any more
        watch = Watch(self, http)
        try:
            while not done.done():
                reason = await watch.reason()
                if reason is not None:
                    raise reason
                await asyncio.wait({done}, timeout=watch.wait_seconds())
        finally:
            job.cancel()  # nothing when it is done
        try:
            return done.result()
        except Cancelled:  # stopped under it by the server itself (a second Ctrl-C)
            raise shutting_down() from None

    def submit(self, requests: list[Request]) -> "Generations":
        """Queue ``requests`` on the engine now (a bad one raises before any is queued)."""
        self.ready()
        for request in requests:
            self.engine.check(request)
        if self.closing.is_set():
            raise shutting_down()
        return Generations(self, requests)

    def start(self, requests: list[Request]) -> tuple["Generations", "Admitted"]:
        """Admit ``requests`` and queue them; nothing stays counted when queueing fails."""
        admitted = self.admit(len(requests))
        try:
            return self.submit(requests), admitted
        except BaseException:
            admitted.release()
            raise


class Admitted:
    """A request counted in flight until ``release`` (idempotent; a streamed answer releases
    when its stream ends, not when the handler returns) and until the work it ``hold``s is done."""

    def __init__(self, state: ServerState, count: int) -> None:
        self.state, self.count, self.released = state, count, False
        self._asked = False
        self._work: Future | None = None
        self._lock = threading.Lock()

    def hold(self, work: Future) -> None:
        """Stay counted until ``work`` is done too (a job cancelled by a timeout still runs up
        to its next model call after the answer went out)."""
        self._work = work
        work.add_done_callback(lambda _: self._settle())

    def release(self) -> None:
        self._asked = True
        self._settle()

    def _settle(self) -> None:
        with self._lock:
            if self.released or not self._asked or (self._work is not None and not self._work.done()):
                return
            self.released = True
        self.state._release(self.count)


class Watch:
    """What ends a request's work early: its time (``settings.timeout``), its client gone
    (looked at every ``DISCONNECT_POLL_SECONDS``), the server's shutdown."""

    def __init__(self, state: ServerState, http: HttpRequest | None) -> None:
        self.state, self.http = state, http
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + state.settings.timeout
        self.next_check = self.loop.time() + DISCONNECT_POLL_SECONDS

    async def reason(self) -> ServerError | None:
        """The error that ends the request now (status 499: the client has gone), or ``None``."""
        if self.state.closing.is_set():
            return shutting_down()
        now = self.loop.time()
        if now >= self.deadline:
            return ServerError(504, f"the request took longer than {self.state.settings.timeout:g} s", "timeout",
                               "timeout")
        if self.http is not None and now >= self.next_check:  # on a clock: events may never pause
            self.next_check = now + DISCONNECT_POLL_SECONDS
            if await self.http.is_disconnected():
                return ServerError(499, "the client closed the connection", "cancelled", "cancelled")
        return None

    def wait_seconds(self) -> float:
        """How long to wait for work before looking again."""
        return max(0.0, min(DISCONNECT_POLL_SECONDS, self.deadline - self.loop.time()))


def shutting_down() -> ServerError:
    return ServerError(503, "the server is shutting down", "server_error", "shutdown",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class Generations:
    """Several engine requests of one HTTP request, their events merged onto the event loop."""

    def __init__(self, state: ServerState, requests: list[Request]) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[Handle] = []
        for index, request in enumerate(requests):
            self.handles.append(state.engine.submit(request, self._sink(index), on_finish=state.metrics.observe))

    def _sink(self, index: int) -> Callable[[Event], None]:
        def deliver(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone: nobody listens any more
                self.handles[index].cancel()

        return deliver

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self, request: HttpRequest | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Every event, in the order the engine produced them, until all requests finished; a
        client that disconnects ends them silently, the timeout and the shutdown with their
        error (see :class:`Watch`); either way what still runs is cancelled."""
        watch = Watch(self.state, request)
        remaining = len(self.handles)
        try:
            while remaining:
                reason = await watch.reason()
                if reason is not None and reason.status == 499:
                    return
                if reason is not None:
                    raise reason
                try:
                    index, event = self.queue.get_nowait() if not self.queue.empty() else \
                        await asyncio.wait_for(self.queue.get(), watch.wait_seconds())
                except asyncio.TimeoutError:
                    continue
                remaining -= event.finish_reason is not None
                yield index, event
        finally:
            self.cancel()


__all__ = ["Admitted", "Generations", "ServerError", "ServerState", "Settings", "Watch", "shutting_down",
           "valid_text"]
