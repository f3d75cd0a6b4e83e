"""``/v1/bee``: fill the ``<ans>`` fields of CPM-Bee JSON tasks (one task or several). Greedy and
sampled tasks join the engine's continuous batch, one request each, and may stream their answers
as server-sent events; beam search runs as a job on the engine's thread. The site's ``/bee`` page
calls it."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Iterator

from fastapi import Request as HttpRequest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from cpmlive.data.bee import ANSWER_KEY, MAX_DEPTH, check_example, check_task
from cpmlive.errors import CpmliveError
from cpmlive.infer.engine import Completion
from cpmlive.infer.generate import GenerationConfig
from cpmlive.serve.completions import GuardedStream, collect, error_event, event_error, sse
from cpmlive.serve.runtime import ServerError, ServerState, valid_text
from cpmlive.serve.tasks import MAX_NAME_CHARS, Integer, holding, needs, timed_answer

if TYPE_CHECKING:
    from fastapi import APIRouter

    from cpmlive.api import LM

MAX_TASKS = 16
MAX_EXAMPLES = 8
MAX_BEE_TOKENS = 512
MAX_TASK_CHARS = 20_000  # a task's keys and values together, as /v1/completions bounds a prompt
MAX_TASK_KEYS = 512  # each key is a segment (2+ tokens) and the relation table is the segments' square
MAX_ANSWERS = 256  # <ans> leaves; each costs at least one of max_tokens' steps


def strings_of(value: dict[str, Any]) -> Iterator[str]:
    """Every key and string value of a checked task (nested at most ``MAX_DEPTH`` levels)."""
    for key, child in value.items():
        yield key
        if isinstance(child, dict):
            yield from strings_of(child)
        else:
            yield child


def count_keys(value: dict[str, Any]) -> int:
    return sum(1 + (count_keys(child) if isinstance(child, dict) else 0) for child in value.values())


def count_leaves(value: dict[str, Any] | str) -> int:
    return sum(map(count_leaves, value.values())) if isinstance(value, dict) else 1


def bounded_task(task: dict[str, Any]) -> dict[str, Any]:
    """A task CPM-Bee can answer (``check_task``: strings and objects, ``<ans>`` at the top, at
    most ``MAX_DEPTH`` levels) within the request's bounds on characters, keys and answers, with
    no unpaired surrogate in any key or value: checked while the request is parsed, so that no
    oversized task reaches the model's thread (the prompt's relation table grows with the square
    of its keys)."""
    try:
        check_task(task, "task")
    except CpmliveError as exc:
        raise ValueError(str(exc).removeprefix("task: ")) from None
    keys = count_keys(task)
    if keys > MAX_TASK_KEYS:
        raise ValueError(f"the task has {keys} keys; at most {MAX_TASK_KEYS}")
    answers = count_leaves(task[ANSWER_KEY])
    if not answers:
        raise ValueError("no answer to predict: the <ans> field holds an empty object")
    if answers > MAX_ANSWERS:
        raise ValueError(f"the task has {answers} <ans> fields to fill; at most {MAX_ANSWERS}")
    chars = 0
    for text in strings_of(task):
        chars += len(valid_text(text))
    if chars > MAX_TASK_CHARS:
        raise ValueError(f"the task's keys and values hold {chars} characters; at most {MAX_TASK_CHARS}")
    return task


BeeTask = Annotated[dict[str, Any], AfterValidator(bounded_task), Field(
    description=f'a CPM-Bee task: an object of strings and objects (at most {MAX_DEPTH} levels) with an "<ans>" field '
                f"at the top, whose string leaves are filled; at most {MAX_TASK_KEYS} keys, {MAX_ANSWERS} answers and "
                f"{MAX_TASK_CHARS} characters of keys and values")]


class BeeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"task": {"input": "北京是中国的首都", "prompt": "中翻英", "<ans>": ""}, "max_tokens": 16}]})
    task: BeeTask | None = None
    tasks: list[BeeTask] | None = Field(None, min_length=1, max_length=MAX_TASKS)
    max_tokens: Integer = Field(64, ge=1, le=MAX_BEE_TOKENS)
    num_beams: Integer = Field(1, ge=1, le=8)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Integer = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: Integer | None = Field(None, ge=0, le=2**32 - 1)
    adapter: str | None = Field(None, max_length=MAX_NAME_CHARS)
    stream: bool = Field(False, description="send each answer's text as it is decoded (server-sent events)")
    examples: list[BeeTask] = Field([], max_length=MAX_EXAMPLES, description="in-context examples every task reads "
                                    "first: tasks with their <ans> filled")

    @model_validator(mode="after")
    def one_of(self) -> "BeeRequest":
        if (self.task is None) == (self.tasks is None):
            raise ValueError("give either task (one object) or tasks (a list of objects)")
        if self.temperature > 0 and self.num_beams > 1:
            raise ValueError("sampling (temperature > 0) and num_beams > 1 do not combine")
        for number, example in enumerate(self.examples):
            try:
                check_example(example, f"examples.{number}")
            except CpmliveError as exc:
                raise ValueError(str(exc)) from None
        if self.stream and self.num_beams > 1:
            raise ValueError("beam search cannot stream (its best hypothesis is known only at the end)")
        return self

    @property
    def task_list(self) -> list[dict[str, Any]]:
        return self.tasks if self.tasks is not None else [self.task]

    def options(self) -> dict[str, Any]:
        sample = self.temperature > 0
        return dict(num_beams=self.num_beams, do_sample=sample, temperature=self.temperature if sample else 1.0,
                    top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed)


class BeeResponse(BaseModel):
    """``result`` (for ``task``) or ``results`` (for ``tasks``): each task with its ``<ans>``
    leaves filled (a leaf decoding never reached is null)."""

    result: dict[str, Any] | None = None
    results: list[dict[str, Any]] | None = None
    adapter: str | None
    seconds: float


def check_adapter(lm: LM, name: str | None) -> None:
    if name is not None and name not in lm.tasks:
        raise CpmliveError(f"no adapter named {name!r} (loaded: {', '.join(lm.tasks) or 'none'})")


def answers_for(lm: LM, request: BeeRequest) -> dict[str, Any]:
    """Beam search: the tasks as one job."""
    check_adapter(lm, request.adapter)
    with holding(lm, request.adapter):
        filled = lm.bee(request.task_list, request.max_tokens, examples=request.examples, **request.options())
    return answer_of(request, filled)


def answer_of(request: BeeRequest, filled: list[dict[str, Any]]) -> dict[str, Any]:
    key = "results" if request.tasks is not None else "result"
    return {key: filled if request.tasks is not None else filled[0], "adapter": request.adapter}


async def answers_in_batch(state: ServerState, body: BeeRequest, http: HttpRequest) -> Any:
    """Greedy or sampled tasks as requests of the continuous batch (streamed when asked)."""
    lm = state.ready()
    check_adapter(lm, body.adapter)
    options = GenerationConfig.from_kwargs(max_new_tokens=body.max_tokens, **body.options())
    requests = [lm.bee_request(task, options, index, adapter=body.adapter, examples=body.examples)
                for index, task in enumerate(body.task_list)]
    start = time.perf_counter()
    generations, admitted = state.start(requests)
    if body.stream:
        return GuardedStream(streamed_answers(lm, body, requests, generations, http), generations, admitted)
    results = await collect(generations, admitted, http)
    filled = [lm.bee_filled(request, result) for request, result in zip(requests, results)]
    return {**answer_of(body, filled), "seconds": round(time.perf_counter() - start, 3)}


async def streamed_answers(lm: LM, body: BeeRequest, requests: list, generations: Any,
                           http: HttpRequest) -> AsyncIterator[str]:
    """The SSE body: ``{"index", "answer", "path", "text"}`` for each decoded piece of an answer
    (``answer``: its number in the task's order; ``path``: its keys inside ``<ans>``), then
    ``{"index", "result", "finish_reason"}`` when a task is done, then ``[DONE]``."""
    ident = f"bee-{uuid.uuid4().hex}"
    results = [Completion([], "", "", [], []) for _ in requests]
    try:
        async with aclosing(generations.events(http)) as events:
            async for index, event in events:
                if event.error is not None:
                    yield sse(error_event(event_error(event)))
                    break
                results[index].add(event)
                if event.text:
                    paths = requests[index].task.prompt.paths
                    yield sse({"id": ident, "index": index, "answer": event.answer,
                               "path": paths[event.answer - 1], "text": event.text})
                if event.finish_reason is not None:
                    yield sse({"id": ident, "index": index, "finish_reason": event.finish_reason,
                               "result": lm.bee_filled(requests[index], results[index])})
        yield sse("[DONE]")
    except ServerError as exc:
        yield sse(error_event(exc))


def router(state: ServerState) -> APIRouter:
    from fastapi import APIRouter

    api = APIRouter()

    @api.post("/v1/bee", dependencies=[needs(state, "bee")], response_model=BeeResponse,
              response_model_exclude_unset=True)
    async def bee(body: BeeRequest, http: HttpRequest) -> Any:
        if body.num_beams == 1:
            return await answers_in_batch(state, body, http)
        return await timed_answer(state, answers_for, body, http, len(body.task_list))

    return api


__all__ = ["BeeRequest", "router"]
