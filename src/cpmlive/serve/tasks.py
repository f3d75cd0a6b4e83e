"""The native routes: ``/v1/fill`` (blank infilling), ``/v1/title`` (the headline app) and
``/v1/classify`` (a classification adapter), each also at its older ``/api/...`` name for the
site's pages. They run as jobs on the engine's thread (see ``serve.runtime``), with the adapter
chosen per request over one copy of the base."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Sequence

from fastapi import Request as HttpRequest
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from cpmlive.apps.headline import TitleOptions, suggest_titles
from cpmlive.errors import CpmliveError
from cpmlive.serve.runtime import ServerState, valid_text

if TYPE_CHECKING:
    from fastapi import APIRouter

    from cpmlive.api import LM

PREFERRED_TITLE_ADAPTER = "headline"
MAX_REQUEST_CHARS = 100_000
MAX_FILL_CHARS = 4_000
MAX_BLANK_TOKENS = 32
MAX_TEXTS = 64
MAX_TEXT_CHARS = 2_000
MAX_NAME_CHARS = 200


def whole_number(value: Any) -> Any:
    """JSON's ``4.0`` is the integer 4 (JSON Schema's "integer" allows it, so the document does);
    ``true`` and ``"4"`` stay refused by the request models' strict mode."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(whole_number)]


def as_list(value: Any) -> Any:
    """One text as a list of one (``/v1/classify`` takes either)."""
    return [value] if isinstance(value, str) else value


AdapterName = Annotated[str | None, Field(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(valid_text)]
Texts = Annotated[list[Text], BeforeValidator(as_list, json_schema_input_type=Text | Annotated[
    list[Text], Field(max_length=MAX_TEXTS)]), Field(max_length=MAX_TEXTS)]


class TitleRequest(BaseModel):
    """The headline app's request; like every request model, strict: JSON's types as sent."""

    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [
        {"article": "新华社北京电 今天，北京迎来了今年的第一场雪。市民纷纷走上街头赏雪拍照。", "n": 3}]})
    article: Annotated[str, AfterValidator(valid_text)] = Field(
        max_length=MAX_REQUEST_CHARS, description="the article to suggest titles for")
    n: Integer = Field(5, ge=1, le=10)
    adapter: AdapterName = None
    num_beams: Integer = Field(TitleOptions.num_beams, ge=1, le=8)
    samples: Integer = Field(TitleOptions.samples, ge=0, le=16)
    seed: Integer = Field(0, ge=0, le=2**32 - 1)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [{"text": ["这部电影真好看", "太难吃了"]}]})
    text: Texts = Field(description="one text or a list of them; the answer's labels are one label or a list")
    adapter: AdapterName = None


class FillRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True,
                              json_schema_extra={"examples": [{"text": "北京是中国的<mask>。", "max_tokens": 2}]})
    text: Annotated[str, AfterValidator(valid_text)] = Field(max_length=MAX_FILL_CHARS)
    max_tokens: Integer = Field(4, ge=1, le=MAX_BLANK_TOKENS)
    blank_lengths: list[Annotated[Integer, Field(ge=1, le=MAX_BLANK_TOKENS)]] | None = Field(None, min_length=1,
                                                                                         max_length=MAX_BLANK_TOKENS)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Integer = Field(0, ge=0)
    seed: Integer | None = Field(None, ge=0, le=2**32 - 1)
    adapter: AdapterName = None


class TitleResponse(BaseModel):
    titles: list[str]
    warning: str | None  # e.g. the article was truncated
    adapter: str | None
    seconds: float


class ClassifyResponse(BaseModel):
    labels: str | list[str]  # as the request's text: one or a list
    adapter: str | None
    seconds: float


class FillResponse(BaseModel):
    text: str
    fills: list[str]
    adapter: str | None
    seconds: float


class ServedModel(BaseModel):
    model: str
    adapters: list[str]
    tasks: dict[str, str]


# ---- model work (runs on the engine's thread) ---------------------------------------------------


def needs(state: ServerState, ability: str) -> Any:
    """A route's dependency: what the served model's family cannot do (``model.families``) is
    refused with 400 before the body is read or any work is admitted (while the model loads,
    the route's own ``state.ready()`` answers 503)."""
    from fastapi import Depends

    async def check() -> None:
        if state.lm is not None:
            state.lm.require(ability)

    return Depends(check)


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
    if task == "classify" and not fitting and not lm.has_classifier_head:
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


def fill_for(lm: LM, request: FillRequest) -> dict[str, Any]:
    if request.adapter is not None and request.adapter not in lm.tasks:
        raise CpmliveError(f"no adapter named {request.adapter!r} (loaded: {', '.join(lm.tasks) or 'none'})")
    sample = request.temperature > 0
    options = dict(do_sample=sample, temperature=request.temperature if sample else 1.0, top_p=request.top_p,
                   top_k=request.top_k, seed=request.seed)
    with holding(lm, request.adapter):
        fills = lm.fill(request.text, request.max_tokens, request.blank_lengths, return_fills=True, **options)
    parts = request.text.split("<mask>")
    text = "".join(p + (fills[i] if i < len(fills) else "") for i, p in enumerate(parts))
    return {"text": text, "fills": fills, "adapter": request.adapter}


# ---- the routes ---------------------------------------------------------------------------------------


async def timed_answer(state: ServerState, work: Any, body: BaseModel, http: HttpRequest,
                       count: int = 1) -> dict[str, Any]:
    """``work(lm, body)``'s answer as a job on the engine, admitted as ``count`` generations, with the
    seconds it took."""
    lm = state.ready()
    admitted = state.admit(count)
    start = time.perf_counter()
    try:
        answer = await state.job(work, lm, body, http=http, admitted=admitted)
    finally:
        admitted.release()
    return {**answer, "seconds": round(time.perf_counter() - start, 3)}


def router(state: ServerState) -> APIRouter:
    from fastapi import APIRouter

    api = APIRouter()

    @api.get("/api/health", response_model=ServedModel)
    def health() -> dict[str, Any]:
        lm = state.ready()
        return {"model": state.base_name, "adapters": list(lm.tasks), "tasks": adapter_tasks(lm)}

    for prefix in ("/v1", "/api"):
        @api.post(f"{prefix}/title" if prefix == "/v1" else "/api/titles", dependencies=[needs(state, "title")],
                  response_model=TitleResponse)
        async def titles(body: TitleRequest, http: HttpRequest) -> dict[str, Any]:
            return await timed_answer(state, titles_for, body, http)

        @api.post(f"{prefix}/classify", dependencies=[needs(state, "classify")], response_model=ClassifyResponse)
        async def classify(body: ClassifyRequest, http: HttpRequest) -> dict[str, Any]:
            return await timed_answer(state, labels_for, body, http)

        @api.post(f"{prefix}/fill", dependencies=[needs(state, "fill")], response_model=FillResponse)
        async def fill(body: FillRequest, http: HttpRequest) -> dict[str, Any]:
            return await timed_answer(state, fill_for, body, http)

    return api


__all__ = ["ClassifyRequest", "FillRequest", "MAX_NAME_CHARS", "MAX_REQUEST_CHARS", "MAX_TEXTS", "MAX_TEXT_CHARS",
           "TitleRequest", "pick_adapter", "router"]
