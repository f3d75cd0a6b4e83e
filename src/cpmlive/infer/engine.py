"""The engine: one scheduler under ``LM.generate`` / ``LM.stream`` and every server route.

One thread owns the model. Requests arrive on a queue and wait; every iteration of the loop

1. drops what was cancelled, runs queued jobs (fill, beam search, titles, classification: work
   that needs the whole model) one at a time, in slices: before each of a job's model calls the
   running requests take one decoding step, so a long job slows the streams but never stalls
   them, and a cancelled job (a timeout, a client gone) stops at its next model call,
2. admits waiting requests into the running batch while rows are free and the step's prefill
   token budget lasts (the first one always), prefills them grouped by adapter and picks each
   one's first token,
3. runs one decoding step for every running request at once, each row at its own length in the
   KV pool (:class:`cpmlive.infer.kv.KVPool`) and through its own adapter
   (:func:`cpmlive.tune.delta.adapters_by_row`), and picks each row's next token with the
   request's own sampling parameters and generator. A CPM-Bee model's rows are tasks
   (:class:`TaskSequence`): each feeds its answer's position and segment and chooses among its
   own extra columns.

A request that finishes (end of text, a stop string, ``max_new_tokens``, cancellation) leaves
the batch at once and its KV rows are reused or given back. A prompt is prefilled whole, never
in chunks: CPM-Ant's prompt is bidirectional (every prompt token sees every other), so a chunked
prefill would compute something else.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from cpmlive.data.bee import advanced
from cpmlive.data.layout import GENERATION, build_batch
from cpmlive.errors import CpmliveError
from cpmlive.infer import bee, prefix, speculative, structured
from cpmlive.infer.generate import (GenerationConfig, apply_repetition_penalty, choose_tokens, prefill,
                                    process_logits, sampling_filter, stop_ids_of)
from cpmlive.infer.kv import KVPool
from cpmlive.model.registry import family
from cpmlive.model.stack import Transformer
from cpmlive.tune import delta

MAX_BATCH = 32  # running requests
TOKEN_BUDGET = 4096  # prompt positions prefilled per iteration (one request always goes in)
STOP_REASONS = ("stop", "length", "cancelled", "error")
IDLE_WAIT_SECONDS = 0.05  # a driver with nothing to do waits this long for work before looking again
HANDOFF_SECONDS = 0.02  # a waiter checks this often whether the driving thread has let go
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()
_LOG = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a cancelled job at its next model call: the job's work stops there."""


@dataclass
class Request:
    """One generation: prompt ids (starting with ``<s>``), decoding options, and what the engine
    needs to serve it (its adapter, the adapter's prompt task, stop strings, stop ids besides the
    tokenizer's, logprobs)."""

    ids: list[int]
    options: GenerationConfig = field(default_factory=GenerationConfig)
    adapter: str | None = None
    prompt_task: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top alternatives reported per token (0: only the chosen one's)
    stop_ids: frozenset[int] = frozenset()  # e.g. the end-of-turn token of a chat template
    assistant: "speculative.Assistant | None" = None  # a draft model (speculative decoding)
    constraint: "structured.Constraint | None" = None  # JSON, a regex or a grammar the text must follow
    task: "bee.Task | None" = None  # a CPM-Bee task whose <ans> leaves it fills (``ids``: its prompt's)


@dataclass
class Event:
    """What one step produced for a request: a token (``None`` on the final event of a request
    that ended without one), the text it released, and at the end the finish reason."""

    token: int | None
    text: str = ""
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None
    error: str | None = None
    internal: bool = False  # the error is a fault of ours (a bug, an exhausted machine), not the request's
    answer: int | None = None  # a CPM-Bee task's answer (1-based, in the task's order) the token belongs to


@dataclass
class Completion:
    ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]
    answers: list[int | None] = field(default_factory=list)  # a CPM-Bee task's: each token's answer number

    def add(self, event: Event) -> None:
        """Take one more event of the request."""
        if event.token is not None:
            self.ids.append(event.token)
            self.logprobs.append(event.logprob)
            self.top_logprobs.append(event.top_logprobs)
            self.answers.append(event.answer)
        self.text += event.text
        self.finish_reason = event.finish_reason or self.finish_reason


class Handle:
    """A submitted request: iterate it for its events, ``result()`` for the whole completion,
    ``cancel()`` to stop it (it leaves the batch at the next step)."""

    def __init__(self, request: Request, sink: Callable[[Event], None] | None = None,
                 engine: "Engine | None" = None, on_finish: Callable[["Handle"], None] | None = None) -> None:
        self.request, self.engine = request, engine
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._sink = sink
        self._on_finish = on_finish
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.ids)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        if self.done.is_set():
            return  # a request ends once
        if event.token is not None:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
        if event.finish_reason is not None:
            self.finished_at, self.finish_reason = time.monotonic(), event.finish_reason
            self._observe()  # before the last event leaves: whoever reads it finds the request counted
        try:
            (self._sink or self._events.put)(event)
        except Exception:  # a caller's sink failed: nobody can take this request's events any more
            self.cancel()
        if event.finish_reason is not None:
            self.done.set()

    def _observe(self) -> None:
        """Tell ``on_finish`` (once: every request ends exactly once, whatever ended it)."""
        if self._on_finish is not None:
            try:
                self._on_finish(self)
            except Exception:  # an observer's failure must not stop the engine
                _LOG.exception("on_finish of a request failed")

    def __iter__(self) -> Iterator[Event]:
        """The events as they come; while none is there and no other thread drives the engine,
        this thread drives it (see :meth:`Engine.drive`)."""
        if self._sink is not None:
            raise RuntimeError("this request's events go to its sink")
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                if self.engine is None or not self.engine.drive(lambda: not self._events.empty(), wait=False):
                    try:
                        event = self._events.get(timeout=HANDOFF_SECONDS)
                    except queue.Empty:
                        continue
                else:
                    continue
            yield event
            if event.finish_reason is not None:
                return

    def result(self) -> Completion:
        """Wait for the end; a request that failed raises its error."""
        completion = Completion([], "", "stop", [], [])
        for event in self:
            if event.error is not None:
                raise CpmliveError(event.error)
            completion.add(event)
        return completion


class Job(Future):
    """Model work that :meth:`Engine.call` runs between two steps; a future of its result.

    ``cancel()`` stops it wherever it is: a queued job never starts, a running one raises
    :class:`Cancelled` at its next model call (its own ``finally`` blocks run as usual), and
    the job is done once its work has stopped. ``steps`` counts the model calls it made."""

    def __init__(self, work: Callable[..., Any], args: tuple) -> None:
        super().__init__()
        self.work, self.args = work, args
        self.stop_asked = threading.Event()
        self.steps = 0

    def cancel(self) -> bool:
        self.stop_asked.set()
        return super().cancel()


class IncrementalText:
    """The text of a growing list of ids, extended a token at a time as ``tokenizer.decode`` of
    the whole list reads it (TGI's and vLLM's detokenization): each new token's text is what
    decoding a short window of the last ids adds to decoding the window without it, so a piece
    that depends on its neighbours (SentencePiece's leading space, a character split over
    byte-level tokens) comes out right. Text that ends in an unfinished character (U+FFFD) waits
    for the next token; :meth:`flush` gives it up at the end. For a tokenizer that decodes by
    concatenating token strings (CPM's) each token adds its own string."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0  # the window starts at ids[prefix]; ids[read:] are not in text yet

    def _pending(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.ids[self.prefix:self.read]), decode(self.ids[self.prefix:])

    def add(self, token: int) -> str:
        """The text with ``token`` appended (held back while it ends in an unfinished character)."""
        self.ids.append(token)
        before, after = self._pending()
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def flush(self) -> str:
        """The whole text, what was held back included."""
        before, after = self._pending()
        self.text += after[len(before):]
        self.prefix = self.read = len(self.ids)
        return self.text


class Running:
    """What every running row has: its request and handle, the KV columns it may need, its
    generator, the text it has released and the stop strings that may end it."""

    def __init__(self, handle: Handle, width: int, tokenizer: Any, device: torch.device) -> None:
        self.handle, self.request, self.tokenizer = handle, handle.request, tokenizer
        options = self.request.options
        self.limit = width + options.max_new_tokens  # KV columns it may need
        self.finished = False
        self.generator = torch.Generator(device).manual_seed(options.seed) if options.seed is not None else None
        self.text = ""  # the text so far
        self.released = 0  # characters of it already emitted
        self.stops = tuple(s for s in self.request.stop if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def finish(self, reason: str, text: str = "", token: int | None = None, **extra: Any) -> None:
        self.finished = True
        self.handle.emit(Event(token, text, finish_reason=reason, **extra))

    def _stop_at(self, text: str) -> int | None:
        """Where the earliest stop string starts in ``text`` (only where it can be new)."""
        start = max(0, self.released - self.hold)
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None


class Sequence(Running):
    """A running request: what it generated, the text it released, its drafts and grammar."""

    def __init__(self, handle: Handle, width: int, tokenizer: Any, device: torch.device, rows: int) -> None:
        super().__init__(handle, width, tokenizer, device)
        options = self.request.options
        self.history = list(self.request.ids)
        self.generated: list[int] = []
        self.detokenizer = IncrementalText(tokenizer)  # self.text: the generated text (see IncrementalText)
        self.pending: int | None = None  # the chosen token, fed at the next step
        self.draft_count = options.prompt_lookup_num_tokens or options.num_assistant_tokens \
            or speculative.DEFAULT_ASSISTANT_TOKENS  # k: drafted tokens a step (an assistant's adapts)
        self.draft_state: speculative.DraftState | None = None
        self.drafted = self.kept = 0  # drafted tokens, and those the model kept
        constraint = self.request.constraint
        self.rows = rows  # the model's vocabulary rows
        self.matcher = structured.Matcher(constraint, tokenizer, rows) if constraint is not None else None

    @property
    def speculates(self) -> bool:
        """Whether this sequence drafts (a constrained one does not: its drafts would need the
        grammar's mask at every drafted position)."""
        return (self.request.options.speculates or self.request.assistant is not None) and self.matcher is None

    def propose(self, stop_ids: frozenset[int]) -> tuple[list[int], Tensor | None]:
        """This step's drafts (at most the new tokens it may still take, less the one a step
        always adds) and, for an assistant's sampled drafts, their distributions."""
        options = self.request.options
        count = min(self.draft_count, options.max_new_tokens - len(self.generated) - 1)
        if count < 1:
            return [], None
        if options.prompt_lookup_num_tokens:
            ngram = options.max_matching_ngram_size or speculative.DEFAULT_NGRAM
            return speculative.lookup_draft(self.history, count, ngram), None
        assistant = self.request.assistant
        if self.draft_state is None:
            self.draft_state = assistant.start(self.request.ids, len(self.request.ids) + options.max_new_tokens)
        return assistant.draft(self.draft_state, self.history, count, options, self.generator,
                               stop_ids | self.request.stop_ids, self.rows)

    def record(self, drafted: int, kept: int) -> None:
        self.drafted += drafted
        self.kept += kept
        if self.request.assistant is not None and not self.request.options.prompt_lookup_num_tokens:
            self.draft_count = speculative.next_count(self.draft_count, drafted, kept,
                                                      self.request.options.num_assistant_tokens_schedule)

    def accept(self, token: int, stop_ids: frozenset[int], logprob: float | None,
               top: dict[int, float] | None) -> None:
        """Take the chosen token: emit what it releases, finish when it ends the request (a stop
        id, the tokenizer's or the request's, ends it without being part of its text)."""
        if token in stop_ids or token in self.request.stop_ids:
            self.text = self.detokenizer.flush()
            cut = self._stop_at(self.text)
            self.finish("stop", self.text[self.released:cut], logprob=None)
            return
        self.generated.append(token)
        self.history.append(token)
        self.text = self.detokenizer.add(token)
        cut = self._stop_at(self.text)
        if cut is None and len(self.generated) >= self.request.options.max_new_tokens:
            self.text = self.detokenizer.flush()
            cut = self._stop_at(self.text)
            if cut is None:
                self.finish("length", self.text[self.released:], token, logprob=logprob, top_logprobs=top)
                return
        text = self.text
        if cut is not None:
            self.finish("stop", text[self.released:cut], token, logprob=logprob, top_logprobs=top)
            return
        safe = max(self.released, len(text) - self.hold)
        self.handle.emit(Event(token, text[self.released:safe], logprob, top))
        self.released = safe
        self.pending = token


class TaskSequence(Running):
    """A running CPM-Bee task (``Request.task``): it decodes its ``<ans>`` leaves in turn as
    :mod:`cpmlive.infer.bee` does (``<s>`` at position 0 of a leaf's segment starts it, ``</s>``
    moves to the next), greedily or by sampling; each event carries its answer number."""

    def __init__(self, handle: Handle, width: int, tokenizer: Any, device: torch.device) -> None:
        super().__init__(handle, width, tokenizer, device)  # self.text: the current answer's text
        self.task: bee.Task = self.request.task
        self.beam = self.task.first_beam(tokenizer.bos_id)
        self.fed: list[int] = []  # what each step fed (the repetition penalty's history, as in the job path)

    speculates = False

    def choose(self, logits: Tensor) -> int:
        """The column this step takes from the row's ``logits`` ``[1, columns]`` (barred ones
        already out)."""
        options = self.request.options
        logits = logits.clone()
        if options.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, torch.tensor([self.fed], device=logits.device),
                                              options.repetition_penalty)
        if len(self.fed) <= options.min_new_tokens:
            logits[:, self.tokenizer.eos_id] = float("-inf")
        return int(choose_tokens(logits, options, self.generator))

    def accept(self, column: int, logprob: float | None, top: dict[int, float] | None) -> None:
        """Take ``column``: its text joins the answer it belongs to; the last answer's ``</s>``,
        a stop string or the last step ends the task, another ``</s>`` starts the next answer
        (the text a stop string might start is held back until it cannot)."""
        prompt, tokenizer = self.task.prompt, self.tokenizer
        number = prompt.answers[self.beam.answer][1]
        eos = column == tokenizer.eos_id
        self.text += "" if eos else self.task.text_of(tokenizer, column)
        cut = self._stop_at(self.text)
        event = dict(logprob=logprob, top_logprobs=top, answer=number)
        ended = eos and self.beam.answer + 1 == len(prompt.answers)
        if cut is not None or ended or len(self.fed) >= self.request.options.max_new_tokens:
            reason = "stop" if cut is not None or ended else "length"
            self.finish(reason, self.text[self.released:cut], column, **event)
            return
        safe = len(self.text) if eos else max(self.released, len(self.text) - self.hold)
        self.handle.emit(Event(column, self.text[self.released:safe], **event))
        self.released = safe
        if eos:
            self.text, self.released = "", 0
        self.beam = advanced(self.beam, column, prompt, self.task.batch, tokenizer.eos_id, tokenizer.bos_id,
                             tokenizer.vocab_size)


class Engine:
    """The scheduler (see the module docstring).

    The engine has no thread of its own unless :meth:`start` gives it one: whichever thread
    waits for a result drives it (:meth:`drive`), one at a time. This matters on a CPU: each
    thread that runs OpenMP regions keeps a team of its own, and once there are more OpenMP
    threads than cores libgomp stops spinning between regions, which made a decoding step on a
    second thread twice as slow as on the main one. ``cpmlive serve`` drives the engine from the
    main thread and answers HTTP on another. ``submit`` and ``call`` are safe from any thread.
    """

    def __init__(self, model: Transformer, tokenizer: Any, max_batch: int = MAX_BATCH,
                 token_budget: int = TOKEN_BUDGET, prefix_cache_bytes: int = prefix.DEFAULT_BYTES) -> None:
        if max_batch < 1 or token_budget < 1:
            raise CpmliveError("max_batch and token_budget must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.token_budget = max_batch, token_budget
        self.eos_id = tokenizer.eos_id
        self.stop_ids = stop_ids_of(tokenizer)
        self.decodes_tasks = family(model.config.model_type).can("bee")  # its requests are CPM-Bee tasks
        device = model.input_embedding.weight.device
        self.pool = KVPool(model.cache_layers, model.config.max_length, device, model.cache_kind.inputs)
        self.waiting: deque[Handle] = deque()
        self.running: list[Running] = []
        self._inbox: queue.SimpleQueue[Handle | Job] = queue.SimpleQueue()
        self._jobs: deque[Job] = deque()
        self._running_jobs: list[Job] = []  # the job running now, and any job it called in turn
        self._between = False  # the running requests' step between a job's model calls is under way
        self._drive_lock = threading.Lock()
        self._driver: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.steps = 0
        self.drafted_tokens = self.kept_tokens = 0  # speculative decoding: drafted, and kept by the model
        self._assistants: "weakref.WeakSet[speculative.Assistant]" = weakref.WeakSet()  # vocabularies checked
        self.prefix: prefix.PrefixCache | None = None
        self.set_prefix_cache(prefix_cache_bytes)

    # ---- from any thread ----------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Refuse a request the model cannot hold (before it waits)."""
        options = request.options
        if options.num_beams != 1:
            raise CpmliveError("the engine decodes greedily or by sampling; beam search runs as a job (call)")
        if not request.ids:
            raise CpmliveError("empty prompt")
        self._check_kind(request)
        config = self.model.config
        needed = config.prompt_length + len(request.ids) + options.max_new_tokens
        if needed > config.max_length:
            limit = config.max_length - config.prompt_length - len(request.ids)
            raise CpmliveError(f"the prompt's {len(request.ids)} tokens and max_new_tokens {options.max_new_tokens} "
                               f"exceed the model's {config.max_length - config.prompt_length} positions: "
                               f"ask for at most {max(limit, 0)} new tokens")
        vocab = config.vocab_size
        if any(not 0 <= t < vocab for key in (options.sequence_bias or {}) for t in key):
            raise CpmliveError(f"sequence_bias names a token id outside the vocabulary [0, {vocab})")
        if request.adapter is not None:
            state = delta.delta_state(self.model)
            if state is None or request.adapter not in state.configs:
                raise CpmliveError(f"no adapter named {request.adapter!r}")
        if request.constraint is not None:
            structured.check_constraint(request.constraint, self.tokenizer, config.vocab_size)
        if request.assistant is not None and request.assistant not in self._assistants:
            request.assistant.check(self.tokenizer, self.model)
            self._assistants.add(request.assistant)

    def _check_kind(self, request: Request) -> None:
        """A CPM-Bee model decodes tasks, every other model text; a task drafts nothing and
        follows no grammar (its answers' columns differ per task)."""
        if (request.task is not None) != self.decodes_tasks:
            raise CpmliveError("a CPM-Bee model fills tasks (Request.task)" if self.decodes_tasks
                               else "only a CPM-Bee model fills tasks")
        if request.task is not None and (request.options.speculates or request.assistant is not None
                                         or request.constraint is not None):
            raise CpmliveError("a CPM-Bee task decodes without drafts or grammars")

    def submit(self, request: Request, sink: Callable[[Event], None] | None = None,
               on_finish: Callable[[Handle], None] | None = None) -> Handle:
        """Queue ``request``; its events go to ``sink`` (called on the driving thread) or, without
        one, to the returned handle's iterator (which drives the engine while it waits).
        ``on_finish(handle)`` is called on the driving thread once the request has ended, for
        whatever reason (its end, an error, a cancellation)."""
        self.check(request)
        if self.is_driving():
            raise CpmliveError("a job running on the engine cannot wait for the engine: decode directly")
        handle = Handle(request, sink, self, on_finish)
        self._inbox.put(handle)
        return handle

    def call(self, work: Callable[..., Any], *args: Any) -> Job:
        """Run ``work(*args)`` as a job (see :class:`Job`): now, on this thread, when no other
        thread drives the engine, else on the driving thread. The running requests take a
        decoding step before each of its model calls. The job holds its result or exception."""
        job = Job(work, args)
        if self.is_driving():
            self._run(job)
        elif self._drive_lock.acquire(blocking=False):
            try:
                self._driver = threading.current_thread()
                with torch.inference_mode():
                    self._run(job)
            finally:
                self._driver = None
                self._drive_lock.release()
        else:
            self._inbox.put(job)
        return job

    def is_driving(self) -> bool:
        """Whether this thread is the one running the engine (a job's model work then runs directly)."""
        return self._driver is threading.current_thread()

    def drive(self, until: Callable[[], bool], wait: bool = True) -> bool:
        """Run the engine on this thread until ``until()`` holds; with ``wait=False``, only if no
        other thread drives it (returns whether this one did)."""
        if self.is_driving():
            raise CpmliveError("the engine is already driven by this thread")
        if not self._drive_lock.acquire(blocking=wait):
            return False
        self._driver = threading.current_thread()
        try:
            while not until():
                self._iterate()
        finally:
            self._driver = None
            self._drive_lock.release()
        return True

    def run_forever(self) -> None:
        """Drive the engine on this thread until :meth:`stop`."""
        self._stopping.clear()
        self.drive(self._stopping.is_set)

    def start(self) -> None:
        """Give the engine a thread of its own that drives it until :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self.drive, args=(self._stopping.is_set,), name="cpmlive-engine",
                                        daemon=True)
        self._thread.start()
        _ENGINES.add(self)

    def stop(self, timeout: float = 10.0) -> None:
        """Make the driving thread let go after its current iteration (queued requests stay)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            self._thread = None

    def set_prefix_cache(self, capacity: int) -> None:
        """Keep up to ``capacity`` bytes of prompt keys and values across requests (0: none; see
        :mod:`cpmlive.infer.prefix`). Safe between iterations: a lookup sees one cache or the other."""
        if capacity < 0:
            raise CpmliveError("the prefix cache size must be at least 0")
        self.prefix = prefix.PrefixCache(capacity, self.model.causal_prompt) if capacity > 0 else None

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting) + self._inbox.qsize(),
                "kv_bytes_used": self.pool.bytes_used(), "kv_bytes_reserved": self.pool.bytes_reserved(),
                "steps": self.steps, "drafted_tokens": self.drafted_tokens, "kept_tokens": self.kept_tokens,
                **(self.prefix.stats() if self.prefix is not None else {})}

    # ---- the driving thread -----------------------------------------------------------------------

    def _iterate(self) -> None:
        idle = not (self.running or self.waiting or self._jobs)
        self._take(block=idle)
        try:
            with torch.inference_mode():
                self._drop_cancelled()
                self._run_jobs()
                self._admit()
                if self.running:
                    self._step()
        except Exception as exc:  # a bug or an exhausted machine: fail what runs, keep serving
            self._fail_running(f"{type(exc).__name__}: {exc}")

    def _take(self, block: bool) -> None:
        """Move what arrived to the queues (waiting a moment for something when ``block``)."""
        try:
            item = self._inbox.get(block=block, timeout=IDLE_WAIT_SECONDS if block else None)
            while True:
                if isinstance(item, Handle):
                    self.waiting.append(item)
                else:
                    self._jobs.append(item)  # run by _run_jobs, never inside another job
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _run_jobs(self) -> None:
        while self._jobs:
            self._run(self._jobs.popleft())

    def _run(self, job: Job) -> None:
        """Run ``job`` with :meth:`_between_steps` before each of its model calls (a job that a
        job calls shares the outer one's hook)."""
        if not job.set_running_or_notify_cancel():
            return
        hook = self.model.register_forward_pre_hook(self._between_steps) if not self._running_jobs else None
        self._running_jobs.append(job)
        try:
            job.set_result(job.work(*job.args))
        except Exception as exc:  # the caller gets it (Cancelled too)
            job.set_exception(exc)
        except BaseException:  # Ctrl-C on the driving thread: the job ends, the interrupt goes on
            if not job.done():
                job.set_exception(Cancelled("interrupted"))
            raise
        finally:
            self._running_jobs.pop()
            if hook is not None:
                hook.remove()

    def _between_steps(self, module: Any, args: Any) -> None:
        """Before a job's model call: stop a cancelled job, else give the running requests one
        decoding step (and admit waiting ones), so that they go on while the job runs."""
        if self._between or not self.is_driving():
            return  # the requests' own model calls, or another thread's use of the model
        if any(job.stop_asked.is_set() for job in self._running_jobs):
            raise Cancelled("the job was cancelled")
        self._running_jobs[-1].steps += 1
        self._take(block=False)
        self._between = True
        try:
            self._drop_cancelled()
            self._admit()
            if self.running:
                self._step()
        except Exception as exc:  # as in _iterate: what runs fails, the job goes on
            self._fail_running(f"{type(exc).__name__}: {exc}")
        finally:
            self._between = False

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self.waiting if h.cancelled.is_set()]:
            self.waiting.remove(handle)
            handle.emit(Event(None, finish_reason="cancelled"))
        for seq in self.running:
            if seq.handle.cancelled.is_set() and not seq.finished:
                seq.finish("cancelled")
        self._remove_finished()

    def _fail_running(self, message: str) -> None:
        for seq in self.running:
            if not seq.finished:
                seq.finish("error", error=message, internal=True)
        self.running = []
        self.pool.release()

    # ---- admission and prefill ------------------------------------------------------------------

    def _admit(self) -> None:
        chosen: list[Handle] = []
        budget = self.token_budget
        prompt_length = self.model.config.prompt_length
        while self.waiting and len(self.running) + len(chosen) < self.max_batch:
            cost = prompt_length + len(self.waiting[0].request.ids)
            if chosen and cost > budget:
                break
            chosen.append(self.waiting.popleft())
            budget -= cost
        for handles, adapter, prompt_task in self._prefill_groups(chosen):
            self._guarded(handles, lambda h=handles, a=adapter, t=prompt_task: self._prefill(h, a, t))

    def _guarded(self, handles: list[Handle], prefill: Callable[[], None]) -> None:
        """Run ``prefill`` of ``handles``: if it fails, these requests fail; the running ones go on."""
        try:
            prefill()
        except Exception as exc:
            message, internal = error_of(exc)
            for seq in self.running:
                if seq.handle in handles:
                    seq.finished = True  # leaves the batch below; its handle gets the error here
            for handle in handles:
                if not handle.done.is_set():
                    handle.emit(Event(None, finish_reason="error", error=message, internal=internal))
            self._remove_finished()

    def _prefill_groups(self, handles: list[Handle]) -> list[tuple[list[Handle], str | None, int | None]]:
        """Requests prefilled together: the same adapter and prompt task, and each one's new
        tokens still fit after the group's left padding (else it goes alone)."""
        config = self.model.config
        groups: dict[tuple[str | None, int | None], list[Handle]] = {}
        for handle in handles:
            groups.setdefault((handle.request.adapter, handle.request.prompt_task), []).append(handle)
        result = []
        for (adapter, prompt_task), members in groups.items():
            width = config.prompt_length + max(len(h.request.ids) for h in members)
            fits = [h for h in members if width + h.request.options.max_new_tokens <= config.max_length]
            if fits:
                result.append((fits, adapter, prompt_task))
            result += [([h], adapter, prompt_task) for h in members if h not in fits]
        return result

    def _adapter(self, name: str | None) -> Any:
        return delta.active_adapter(self.model, name) if delta.delta_state(self.model) is not None else nullcontext()

    def _prefill(self, handles: list[Handle], adapter: str | None, prompt_task: int | None) -> None:
        """Prefill ``handles`` (one adapter and prompt task) and start them: those whose prompt
        begins with cached blocks (``infer.prefix``) one by one from them, the others together."""
        if handles[0].request.task is not None:
            self._guarded(handles, lambda: self._prefill_tasks(handles, adapter))
            return
        cache = self.prefix
        scope = self._scope(adapter, prompt_task) if cache is not None else None
        reused = {id(h): cache.lookup(scope, h.request.ids) for h in handles} if scope is not None else {}
        fresh = [h for h in handles if not reused.get(id(h))]
        if fresh:
            self._guarded(fresh, lambda: self._prefill_together(fresh, adapter, prompt_task, scope))
        for handle in handles:
            if reused.get(id(handle)):
                self._guarded([handle], lambda h=handle: self._prefill_after(h, reused[id(h)], adapter, prompt_task,
                                                                              scope))

    def _scope(self, adapter: str | None, prompt_task: int | None) -> tuple | None:
        """What prompt keys and values depend on besides the tokens: the adapter, its prompt task,
        the weights as they are now (any change in place or attached layer makes a new scope)
        and the dtype they compute in; ``None`` where the weights cannot say (no prefix reuse)."""
        try:
            weights = hash(tuple((id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers())))
        except RuntimeError:  # inference tensors keep no version: their changes cannot be seen
            return None
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return adapter, prompt_task, weights, dtype

    def _prefill_together(self, handles: list[Handle], adapter: str | None, prompt_task: int | None,
                          scope: tuple | None) -> None:
        model = self.model
        rows = [h.request.ids for h in handles]
        batch = build_batch(rows, GENERATION, model.config.prompt_length, model.input_embedding.weight.device,
                            prompt_task=prompt_task)
        width = batch.input_ids.size(1)
        cache = model.new_cache(len(rows), width)
        with self._adapter(adapter):
            hidden = prefill(model, batch, cache, [len(r) for r in rows])
            logits = model.logits(hidden)
        kept = self.prefix
        if kept is not None and scope is not None:
            for row, ids in enumerate(rows):
                start = width - len(ids)  # where the row's text starts (after the group's left padding)
                if kept.causal or start == model.config.prompt_length:  # CPM-Ant: an unpadded row only
                    kept.store(scope, ids, cache, row, start, hidden[row])
        self._start(handles, cache, width, logits)

    def _prefill_after(self, handle: Handle, blocks: list, adapter: str | None, prompt_task: int | None,
                       scope: tuple) -> None:
        """Prefill one prompt from the cached blocks it begins with: only the rest is computed."""
        model, ids = self.model, handle.request.ids
        batch = build_batch([ids], GENERATION, model.config.prompt_length, model.input_embedding.weight.device,
                            prompt_task=prompt_task)
        width = batch.input_ids.size(1)
        cache = model.new_cache(1, width)
        done = prefix.restore(blocks, cache)
        with self._adapter(adapter):
            if done == width:  # CPM-Ant: the identical prompt, with its last hidden state
                hidden = blocks[-1].hidden[None]
            else:
                inputs = {name: value[:, done:] for name, value in batch.as_inputs().items()}
                hidden = model(**inputs, cache=cache, last=1)[:, -1]
            logits = model.logits(hidden)
        kept = self.prefix
        if kept is not None and kept.causal:
            kept.store(scope, ids, cache, 0, 0)
        self._start([handle], cache, width, logits)

    def _prefill_tasks(self, handles: list[Handle], adapter: str | None) -> None:
        """Read CPM-Bee tasks' prompts (no prefix reuse: a task's prompt is read both ways) and
        start them: their first step feeds ``<s>``, so nothing is chosen yet."""
        with self._adapter(adapter):
            cache = bee.prefill_tasks(self.model, [h.request.task for h in handles])
        width = cache.length
        fresh = [TaskSequence(h, width, self.tokenizer, self.pool.device) for h in handles]
        self._enter(fresh, cache, width)

    def _enter(self, fresh: list, cache: Any, width: int) -> None:
        """Move prefilled rows into the KV pool and the running batch."""
        need = max(s.limit for s in self.running + fresh)
        self.pool.reserve(len(self.running) + len(fresh), need)
        for index, seq in enumerate(fresh):
            self.pool.insert(cache, index, width)
            self.running.append(seq)

    def _start(self, handles: list[Handle], cache: Any, width: int, logits: Tensor) -> None:
        """Move prefilled rows into the KV pool and the running batch, and pick their first tokens."""
        fresh = [Sequence(h, width, self.tokenizer, self.pool.device, self.model.config.vocab_size) for h in handles]
        self._enter(fresh, cache, width)
        self._choose(fresh, logits)

    # ---- decoding ---------------------------------------------------------------------------------

    def _step(self) -> None:
        """One decoding step of every running sequence: its pending token, and for a speculating
        one the tokens drafted after it (rows with fewer drafts padded with invalid positions)."""
        seqs = self.running
        if self.decodes_tasks:
            self._task_step(seqs)
            return
        old = self.pool.lengths[:len(seqs)].clone()
        drafts = self._drafts(seqs, int(old.max()))
        width = 1 + max(len(draft) for draft, _ in drafts)
        ids = [[s.pending, *draft] + [s.pending] * (width - 1 - len(draft)) for s, (draft, _) in zip(seqs, drafts)]
        valid = [[True] * (1 + len(draft)) + [False] * (width - 1 - len(draft)) for draft, _ in drafts]
        device = self.pool.device
        tokens, valid_tensor = torch.tensor(ids, device=device), torch.tensor(valid, device=device)
        names = [s.request.adapter for s in seqs]
        by_row = delta.adapters_by_row(self.model, names) if any(names) else self._adapter(None)
        with by_row:
            hidden = self.model(**speculative.text_inputs(tokens, valid_tensor), cache=self.pool.view())
            logits = self.model.logits(hidden)
        self.steps += 1
        if width == 1:
            self._choose(seqs, logits[:, 0])
        else:
            self._verify(seqs, drafts, logits, old.tolist(), width)

    def _task_step(self, seqs: list[TaskSequence]) -> None:
        """One step of running CPM-Bee tasks, each with its own extra columns and answer."""
        names = [s.request.adapter for s in seqs]
        for seq in seqs:
            seq.fed.append(seq.beam.feed)
        with delta.adapters_by_row(self.model, names) if any(names) else self._adapter(None):
            logits = bee.batch_logits(self.model, [s.task for s in seqs], [s.beam for s in seqs], self.pool.view())
        self.steps += 1
        for row, seq in enumerate(seqs):
            try:
                column = seq.choose(logits[row:row + 1])
                logprob, top = self._logprobs(seq, logits[row], column)
                seq.accept(column, logprob, top)
            except Exception as exc:  # as in _choose: this request alone ends
                fail(seq, exc)
        self._remove_finished()

    def _drafts(self, seqs: list[Sequence], longest: int) -> list[tuple[list[int], Tensor | None]]:
        """Each sequence's drafts for this step, cut to what the KV pool's columns can take."""
        room = self.pool.max_width - longest - 1
        drafts = []
        for seq in seqs:
            draft: tuple[list[int], Tensor | None] = ([], None)
            if seq.speculates and room > 0:
                try:
                    draft = seq.propose(self.stop_ids)
                except Exception as exc:  # a failing draft model fails its requests, the batch goes on
                    seq.finish("error", error=f"{type(exc).__name__}: {exc}", internal=True)
            tokens, probs = draft
            drafts.append((tokens[:room], None if probs is None else probs[:room]))
        if any(tokens for tokens, _ in drafts):
            self.pool.reserve(len(seqs), longest + 1 + max(len(tokens) for tokens, _ in drafts))
        return drafts

    def _verify(self, seqs: list[Sequence], drafts: list[tuple[list[int], Tensor | None]], logits: Tensor,
                old: list[int], width: int) -> None:
        """Keep each row's drafts as far as the model agrees (``infer.speculative``), move its KV
        row back to what it kept and hide the rest, then take the kept tokens in order."""
        kept_by_row = []
        for row, (seq, (draft, probs)) in enumerate(zip(seqs, drafts)):
            try:
                kept = [] if seq.finished else self._kept(seq, logits[row], draft, probs)
            except Exception as exc:  # as in _choose: this request alone ends
                fail(seq, exc)
                kept = []
            end = old[row] + max(len(kept), 1)
            self.pool.lengths[row] = end
            self.pool.masks["valid"][row, end:old[row] + width] = False
            if draft and kept:
                seq.record(len(draft), len(kept) - 1)
                self.drafted_tokens += len(draft)
                self.kept_tokens += len(kept) - 1
            kept_by_row.append(kept)
        for row, (seq, kept) in enumerate(zip(seqs, kept_by_row)):
            for position, token in enumerate(kept):
                if seq.finished:
                    break
                logprob, top = self._logprobs(seq, logits[row, position], token)
                seq.accept(token, self.stop_ids, logprob, top)
        self._remove_finished()

    def _kept(self, seq: Sequence, logits: Tensor, draft: list[int], probs: Tensor | None) -> list[int]:
        """The drafts the model keeps and its own next token (``logits``: ``[positions, vocab]``)."""
        if seq.matcher is not None:  # it drafts nothing: its one token, under its grammar
            return [self._chosen(seq, logits[:1].clone())]
        options = seq.request.options
        if not options.do_sample and _plain(options):
            return speculative.verify_greedy(lambda position: logits[position], draft)
        stop_ids = self.stop_ids | seq.request.stop_ids

        def processed(position: int) -> Tensor:
            return process_logits(logits[position:position + 1].clone(), [seq.history + draft[:position]],
                                  len(seq.generated) + position, options, stop_ids)

        if not options.do_sample:
            return speculative.verify_greedy(processed, draft)
        return speculative.verify_sampled(lambda position: sampling_filter(processed(position), options).softmax(-1)[0],
                                          draft, probs, seq.generator)

    def _choose(self, seqs: list[Sequence], logits: Tensor) -> None:
        """Each sequence's next token from its row of ``logits`` (masked by its grammar where it
        has one); finished ones leave."""
        greedy = [not s.request.options.do_sample and _argmax_after_stops(s.request.options) and s.matcher is None
                  for s in seqs]
        fast = self._greedy_tokens(seqs, logits, greedy) if any(greedy) else None
        for row, seq in enumerate(seqs):
            try:
                if greedy[row]:
                    token = fast[row]
                else:
                    token = self._chosen(seq, logits[row:row + 1].clone())
                logprob, top = self._logprobs(seq, logits[row], token)
                seq.accept(token, self.stop_ids, logprob, top)
            except Exception as exc:  # this request's own options failed (a logits_processor...): it alone ends
                fail(seq, exc)
        self._remove_finished()

    def _greedy_tokens(self, seqs: list[Sequence], logits: Tensor, greedy: list[bool]) -> list[int]:
        """Every row's argmax at once; a greedy row still below its ``min_new_tokens`` takes it
        with its stop ids ruled out, as ``process_logits`` would."""
        early = [row for row, seq in enumerate(seqs)
                 if greedy[row] and len(seq.generated) < seq.request.options.min_new_tokens]
        if early:
            logits = logits.clone()
            for row in early:
                logits[row, sorted(self.stop_ids | seqs[row].request.stop_ids)] = float("-inf")
        return logits.argmax(-1).tolist()

    def _chosen(self, seq: Sequence, logits: Tensor) -> int:
        """The token ``seq`` takes from its ``logits`` ``[1, vocab]`` after its grammar's mask and
        its options' processing; where they leave nothing (the grammar is complete, or
        ``min_new_tokens`` forbids the end it allows) the text ends: the end-of-text id."""
        options = seq.request.options
        allowed = seq.matcher is None or seq.matcher.mask(logits[0])
        processed = process_logits(logits, [seq.history], len(seq.generated), options,
                                   self.stop_ids | seq.request.stop_ids)
        if not allowed or (seq.matcher is not None and not bool(torch.isfinite(processed).any())):
            return self.eos_id  # (a grammar's mask and min_new_tokens together can leave nothing)
        token = int(choose_tokens(processed, options, seq.generator))
        if seq.matcher is not None:
            seq.matcher.consume(token)
        return token

    def _logprobs(self, seq: Sequence, logits: Tensor, token: int) -> tuple[float | None, dict[int, float] | None]:
        """The model's log-probability of ``token`` and of its ``logprobs`` best alternatives."""
        wanted = seq.request.logprobs
        if wanted is None:
            return None, None
        logprobs = logits.float().log_softmax(-1)
        top = None
        if wanted > 0:
            values, ids = logprobs.topk(min(wanted, logprobs.numel()))
            top = dict(zip(ids.tolist(), values.tolist()))
        return float(logprobs[token]), top

    def _remove_finished(self) -> None:
        gone = [i for i, s in enumerate(self.running) if s.finished]
        for slot in reversed(gone):
            moved = self.pool.remove(slot)
            if moved is not None:
                self.running[slot] = self.running[moved]
            self.running.pop()
        if gone:
            self.pool.fit(max((s.limit for s in self.running), default=0))


@atexit.register
def _stop_engines() -> None:
    """Stop every engine's own thread before the interpreter (and torch's thread pools) goes away."""
    for engine in list(_ENGINES):
        engine.stop(timeout=5.0)


def error_of(exc: Exception) -> tuple[str, bool]:
    """What a request that failed with ``exc`` is told, and whether the fault is ours (not a
    :class:`CpmliveError` about the request itself)."""
    internal = not isinstance(exc, CpmliveError)
    return (f"{type(exc).__name__}: {exc}" if internal else str(exc)), internal


def fail(seq: Running, exc: Exception) -> None:
    """End ``seq`` with ``exc``'s error; the rest of the batch goes on."""
    message, internal = error_of(exc)
    seq.finish("error", error=message, internal=internal)


def _plain(options: GenerationConfig) -> bool:
    """Whether greedy decoding with ``options`` is a bare argmax (no logits processing)."""
    return options.min_new_tokens == 0 and _argmax_after_stops(options)


def _argmax_after_stops(options: GenerationConfig) -> bool:
    """Whether greedy decoding with ``options`` is an argmax once ``min_new_tokens`` has ruled
    out the stop ids (which ``_greedy_tokens`` does for all rows at once)."""
    return (options.repetition_penalty == 1.0 and not options.sequence_bias and not options.no_repeat_ngram_size
            and options.logits_processor is None)


def request_for(ids: list[int], options: GenerationConfig, index: int = 0, **fields: Any) -> Request:
    """A request for row ``index`` of a batch: a seeded batch gives each row its own seed."""
    if options.seed is not None and index:
        options = replace(options, seed=options.seed + index)
    return Request(ids, options, **fields)


__all__ = ["Cancelled", "Completion", "Engine", "Event", "Handle", "Job", "Request", "STOP_REASONS", "request_for"]
