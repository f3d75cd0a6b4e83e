"""OpenAI-compatible ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

Fields as OpenAI documents them, plus vLLM's extras ``top_k``, ``repetition_penalty`` and
``min_tokens``. ``model`` names the base model or one of the loaded adapters (each listed by
``/v1/models``, as vLLM lists LoRA adapters). ``temperature`` 0 is greedy decoding.
``logprobs`` are the model's own log-probabilities (before temperature and filtering); with
``echo`` the prompt's tokens are returned with ``null`` log-probabilities: CPM-Ant reads its
prompt bidirectionally, so a prompt token has no left-to-right probability to report.
Streams send OpenAI's chunks as server-sent events and end with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Callable, Iterable, Iterator, Literal

from fastapi import Request as HttpRequest
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from cpmlive.errors import CpmliveError
from cpmlive.infer.engine import Completion, Request
from cpmlive.infer.bee import Task
from cpmlive.infer.generate import MAX_DRAFT_TOKENS, MAX_NGRAM, GenerationConfig
from cpmlive.infer.structured import MAX_GRAMMAR_CHARS, Constraint, constraint_from
from cpmlive.serve.runtime import ServerError, ServerState, valid_text
from cpmlive.serve.tasks import Integer, needs

if TYPE_CHECKING:
    from fastapi import APIRouter

MAX_PROMPTS = 16
MAX_N = 8
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_PROMPT_CHARS = 20_000
MAX_MESSAGES = 64
MAX_LOGPROBS = 5
MAX_SEED = 2**63 - 1
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def not_empty(value: str) -> str:
    if not value:
        raise ValueError("an empty stop sequence would match before any text: leave it out")
    return value


def at_most(limit: int, what: str) -> BeforeValidator:
    """A list bound checked before its items are (and named, where pydantic would count items)."""
    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > limit:
            raise ValueError(f"at most {limit} {what}, not {len(value)}")
        return value

    return BeforeValidator(check)


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(valid_text)]
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS, json_schema_extra={"minLength": 1}), AfterValidator(valid_text),
                 AfterValidator(not_empty)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """The decoding fields the two endpoints share; every request model is strict (JSON's types
    as sent: ``true`` is no number, ``"4"`` no integer). Without ``model`` the base model answers, as
    in vLLM and llama.cpp."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = Field(None, max_length=200)
    max_tokens: Integer | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Integer = Field(1, ge=1, le=MAX_N)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS), at_most(MAX_STOPS, "stop sequences")] \
        | None = None
    seed: Integer | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = Field(None, max_length=200)
    top_k: Integer = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    min_tokens: Integer = Field(0, ge=0)
    # Speculative decoding (HF's names): drafts from the prompt, or the server's --assistant-model's
    prompt_lookup_num_tokens: Integer | None = Field(None, ge=1, le=MAX_DRAFT_TOKENS)
    max_matching_ngram_size: Integer | None = Field(None, ge=1, le=MAX_NGRAM)
    num_assistant_tokens: Integer | None = Field(None, ge=1, le=MAX_DRAFT_TOKENS)
    use_assistant_model: bool = True  # false: this request decodes without the server's assistant model
    # Structured output: OpenAI's response_format, vLLM's guided_json / guided_regex / guided_grammar (Lark)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    guided_grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _only_zero(cls, value: float, info: ValidationInfo) -> float:
        if value != 0:
            raise ValueError(f"{info.field_name} is not supported (only 0; repetition_penalty is)")
        return value

    def constraint(self) -> Constraint | None:
        """What the text must follow (``infer.structured``); a malformed one is a 400."""
        response_format = self.response_format
        if self.guided_json is not None:
            if response_format is not None:
                raise ServerError(400, "give response_format or guided_json, not both", param="guided_json")
            response_format = {"type": "json_schema",
                               "json_schema": {"name": "guided_json", "schema": self.guided_json}}
        try:
            return constraint_from(response_format, self.guided_regex, self.guided_grammar)
        except CpmliveError as exc:
            raise ServerError(400, str(exc), param="response_format") from None

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def options(self, max_tokens: int, index: int, defaults: dict[str, Any] | None = None) -> GenerationConfig:
        """The request's decoding options; a field it leaves out takes the model's ``defaults``
        (its generation_config.json, as vLLM takes them) where they set it."""
        if self.min_tokens > max_tokens:
            raise ServerError(400, f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})",
                              param="min_tokens")
        field = self.model_defaults(defaults or {})
        sample = field("temperature") > 0
        seed = None if self.seed is None else (self.seed + index) % (MAX_SEED + 1)
        return GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=self.min_tokens, do_sample=sample,
                                temperature=field("temperature") if sample else 1.0, top_k=field("top_k"),
                                top_p=field("top_p"), repetition_penalty=field("repetition_penalty"), seed=seed,
                                prompt_lookup_num_tokens=self.prompt_lookup_num_tokens,
                                max_matching_ngram_size=self.max_matching_ngram_size,
                                num_assistant_tokens=self.num_assistant_tokens)

    def model_defaults(self, defaults: dict[str, Any]) -> Callable[[str], Any]:
        """A field's value: the request's where it gives it, else the model's default (a model
        that does not sample has temperature 0), else the request model's default."""
        def field(name: str) -> Any:
            if name in self.model_fields_set or not defaults:
                return getattr(self, name)
            if name == "temperature" and "do_sample" in defaults:
                return defaults.get("temperature", 1.0) if defaults["do_sample"] else 0.0
            return defaults.get(name, getattr(self, name))

        return field


class CompletionRequest(Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "今天天气不错，", "max_tokens": 8, "temperature": 0},
        {"prompt": ["春天来了，", "今天"], "max_tokens": 4, "n": 2, "seed": 1, "logprobs": 2, "echo": True}]})
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS),
                               at_most(MAX_PROMPTS, "prompts")]
    logprobs: Integer | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: Prompt


class ChatRequest(Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8, "logprobs": True, "top_logprobs": 2}]})
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    logprobs: bool = False
    top_logprobs: Integer | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # OpenAI's current name for the limit (``max_tokens`` is deprecated for chat; LangChain sends this)
    max_completion_tokens: Integer | None = Field(None, ge=1)

    @model_validator(mode="after")
    def one_limit(self) -> "ChatRequest":
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ: give one")
            self.max_tokens = self.max_completion_tokens
        return self


# ---- the answers (the OpenAPI document's response bodies) -----------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    """OpenAI's completion; with ``stream`` the answer is server-sent events of its chunks."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    """OpenAI's chat completion; with ``stream`` the answer is server-sent events of its chunks."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
             "description": "one server-sent event: data is a chunk (OpenAI's, as JSON) or an error object, and the "
                            "last event's data is [DONE]"}
STREAMED = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                  "description": "the answer, or with stream: true its chunks as server-sent events"}}


# ---- building engine requests -------------------------------------------------------------------------


def engine_requests(state: ServerState, prompts: list[str | list[int] | dict], body: Sampling, adapter: str | None,
                    logprobs: int | None, extra_stops: tuple[str, ...] = (),
                    stop_ids: frozenset[int] = frozenset()) -> tuple[list[Request], list[int]]:
    """``n`` requests per prompt (choice ``i * n + j``), and each prompt's token count. A prompt
    given as ids (a chat template's) is taken as it is, a text is encoded (a CPM-Bee model's goes
    into its text-generation task), a CPM-Bee task (a rendered conversation) is filled. ``max_tokens``
    left out: the model's ``max_new_tokens`` default, else OpenAI's 16, either within the model's positions."""
    lm = state.ready()
    requests, lengths = [], []
    constraint = body.constraint()
    for i, text in enumerate(prompts):
        try:
            source = lm.prompt_source(text, adapter)
        except CpmliveError as exc:
            raise ServerError(400, f"prompt: {exc}" if len(prompts) == 1 else f"prompt.{i}: {exc}",
                              param="prompt") from None
        ids = source.prompt.ids if isinstance(source, Task) else source
        lengths.append(len(ids))
        room = lm.config.max_length - lm.config.prompt_length - len(ids)
        default = lm.generation_defaults.get("max_new_tokens", DEFAULT_MAX_TOKENS)
        max_tokens = body.max_tokens if body.max_tokens is not None else min(default, max(room, 1))
        if max_tokens > room:
            raise ServerError(400, f"max_tokens {max_tokens} with the prompt's {len(ids)} tokens exceeds the model's "
                              f"{lm.config.max_length - lm.config.prompt_length} positions: ask for at most "
                              f"{max(room, 0)}", param="max_tokens", code="context_length_exceeded")
        for j in range(body.n):
            requests.append(lm.prompt_request(source, body.options(max_tokens, i * body.n + j, lm.generation_defaults),
                                              adapter=adapter, stop=body.stops() + extra_stops, logprobs=logprobs,
                                              stop_ids=stop_ids, assistant=True if body.use_assistant_model else None,
                                              constraint=constraint))
    return requests, lengths


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(state: ServerState, result: Completion, prompt_ids: list[int] | None,
                        offset: int) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object: tokens, their log-probabilities, the top
    alternatives and each token's character offset in the choice's text."""
    decode = state.ready().tokenizer.decode
    tokens, token_logprobs, tops, offsets = [], [], [], []
    position = 0
    for token in prompt_ids or []:
        piece = decode([token])
        tokens.append(piece)
        token_logprobs.append(None)
        tops.append(None)
        offsets.append(position)
        position += len(piece)
    position = offset
    for token, logprob, top in zip(result.ids, result.logprobs, result.top_logprobs):
        piece = decode([token])
        tokens.append(piece)
        token_logprobs.append(logprob)
        tops.append({decode([t]): v for t, v in top.items()} if top is not None else None)
        offsets.append(position)
        position += len(piece)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def error_event(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ServerError):
        return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}
    return {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}


# ---- the routes ---------------------------------------------------------------------------------------


def router(state: ServerState) -> APIRouter:
    from fastapi import APIRouter

    api = APIRouter()

    @api.get("/v1/models", response_model=ModelList)
    def models() -> dict[str, Any]:
        created = int(time.time())
        names = state.model_names()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "cpmlive",
             "root": names[0], "parent": None if name == names[0] else names[0]} for name in names]}

    @api.post("/v1/completions", dependencies=[needs(state, "generate")], response_model=CompletionResponse,
              responses=STREAMED)
    async def completions(body: CompletionRequest, http: HttpRequest) -> Any:
        adapter = state.resolve(body.model)
        body.model = body.model or state.base_name
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        requests, lengths = engine_requests(state, prompts, body, adapter, body.logprobs)
        generations, admitted = state.start(requests)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return GuardedStream(stream_completions(state, generations, body, ident, created, prompts, lengths, http),
                                 generations, admitted)
        results = await collect(generations, admitted, http)
        choices = []
        for index, result in enumerate(results):
            prompt = prompts[index // body.n]
            text = (prompt if body.echo else "") + result.text
            logprobs = None
            if body.logprobs is not None:
                echoed = requests[index].ids if body.echo else None
                logprobs = completion_logprobs(state, result, echoed, len(prompt) if body.echo else 0)
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": finish_reason(result.finish_reason)})
        prompt_tokens = sum(lengths)
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
                "usage": usage(prompt_tokens, sum(len(r.ids) for r in results))}

    @api.post("/v1/chat/completions", dependencies=[needs(state, "chat")], response_model=ChatResponse,
              responses=STREAMED)
    async def chat(body: ChatRequest, http: HttpRequest) -> Any:
        adapter = state.resolve(body.model)
        body.model = body.model or state.base_name
        lm = state.ready()
        template = lm.find_chat_template(adapter)
        if template is None:
            raise ServerError(400, f"the model {body.model!r} has no chat template (it was not tuned for chat): use "
                              "/v1/completions", param="model", code="no_chat_template")
        try:
            prompt = template.render([m.model_dump() for m in body.messages])
        except CpmliveError as exc:
            raise ServerError(400, str(exc), param="messages") from None
        try:
            rendered = prompt if isinstance(prompt, dict) else lm.encode_rendered(prompt, template)
        except CpmliveError as exc:
            raise ServerError(400, f"prompt: {exc}", param="prompt") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests, lengths = engine_requests(state, [rendered], body, adapter, top, tuple(template.stop),
                                            getattr(template, "stop_ids", frozenset()))
        generations, admitted = state.start(requests)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return GuardedStream(stream_chat(state, generations, body, ident, created, lengths[0], http),
                                 generations, admitted)
        results = await collect(generations, admitted, http)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                    "logprobs": chat_logprobs(state, r) if body.logprobs else None,
                    "finish_reason": finish_reason(r.finish_reason)} for i, r in enumerate(results)]
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model, "choices": choices,
                "usage": usage(lengths[0], sum(len(r.ids) for r in results))}

    return api


def guarded_stream_class() -> type:
    from starlette.responses import StreamingResponse

    class GuardedStream(StreamingResponse):
        """An SSE answer that cancels its generations and frees its admission however it ends,
        even when the body never starts (a client gone before the first byte)."""

        def __init__(self, body: AsyncIterator[str], generations: Any, admitted: Any) -> None:
            super().__init__(body, media_type="text/event-stream")
            self.generations, self.admitted = generations, admitted

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.generations.cancel()
                self.admitted.release()

    return GuardedStream


GuardedStream = guarded_stream_class()


def chat_logprobs(state: ServerState, result: Completion) -> dict[str, Any]:
    decode = state.ready().tokenizer.decode
    content = []
    for token, logprob, top in zip(result.ids, result.logprobs, result.top_logprobs):
        content.append({"token": decode([token]), "logprob": logprob,
                        "top_logprobs": [{"token": decode([t]), "logprob": v} for t, v in (top or {}).items()]})
    return {"content": content}


async def collect(generations: Any, admitted: Any, http: HttpRequest) -> list[Completion]:
    """Every request's completion (raises the first error); the admission ends with it."""
    try:
        return await _collect(generations, http)
    finally:
        admitted.release()


def event_error(event: Any) -> ServerError:
    """The HTTP error of an engine event that ended its request: 500 for a fault of ours, else 400."""
    if event.internal:
        return ServerError(500, f"internal error ({event.error})", "server_error")
    return ServerError(400, event.error)


async def _collect(generations: Any, http: HttpRequest) -> list[Completion]:
    results = [Completion([], "", "", [], []) for _ in generations.handles]
    async with aclosing(generations.events(http)) as events:
        async for index, event in events:
            if event.error is not None:
                raise event_error(event)
            results[index].add(event)
    if not all(result.finish_reason for result in results):
        raise ServerError(499, "the client closed the connection", "cancelled", "cancelled")
    return results


async def stream_events(generations: Any, http: HttpRequest, body: CompletionRequest | ChatRequest, ident: str,
                        created: int, kind: str, prompt_tokens: int, opening: Iterable[dict[str, Any]],
                        chunks: Callable[[int, Any], Iterable[dict[str, Any]]]) -> AsyncIterator[str]:
    """The SSE body both endpoints stream: the ``opening`` chunks, the ``chunks`` of each engine
    event (an engine error ends the stream with an error event), the usage chunk of object ``kind``
    when the request asks for it, then ``[DONE]``."""
    generated = 0
    try:
        for chunk in opening:
            yield sse(chunk)
        async with aclosing(generations.events(http)) as events:
            async for index, event in events:
                if event.error is not None:
                    yield sse(error_event(ServerError(500, event.error, "server_error")))
                    break
                generated += event.token is not None
                for chunk in chunks(index, event):
                    yield sse(chunk)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({"id": ident, "object": kind, "created": created, "model": body.model,
                       "choices": [], "usage": usage(prompt_tokens, generated)})
        yield sse("[DONE]")
    except ServerError as exc:
        yield sse(error_event(exc))


async def stream_completions(state: ServerState, generations: Any, body: CompletionRequest, ident: str,
                             created: int, prompts: list[str], lengths: list[int],
                             http: HttpRequest) -> AsyncIterator[str]:
    """The SSE body; :class:`GuardedStream` cancels and frees the admission however it ends."""
    decode = state.ready().tokenizer.decode
    count = len(generations.handles)
    offsets = [len(prompts[i // body.n]) if body.echo else 0 for i in range(count)]

    def chunks(index: int, event: Any) -> Iterator[dict[str, Any]]:
        logprobs = None
        if body.logprobs is not None and event.token is not None:
            piece = decode([event.token])
            top = {decode([t]): v for t, v in (event.top_logprobs or {}).items()} if body.logprobs else None
            logprobs = {"tokens": [piece], "token_logprobs": [event.logprob], "top_logprobs": [top],
                        "text_offset": [offsets[index]]}
            offsets[index] += len(event.text)
        if event.text or logprobs is not None or event.finish_reason is not None:
            reason = finish_reason(event.finish_reason) if event.finish_reason else None
            yield chunk_of(ident, created, body.model, index, event.text, reason, logprobs)

    echoes = (chunk_of(ident, created, body.model, index, prompts[index // body.n], None)
              for index in range(count) if body.echo)
    stream = stream_events(generations, http, body, ident, created, "text_completion", sum(lengths), echoes, chunks)
    async with aclosing(stream) as lines:
        async for line in lines:
            yield line


def chunk_of(ident: str, created: int, model: str, index: int, text: str, reason: str | None,
             logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}


async def stream_chat(state: ServerState, generations: Any, body: ChatRequest, ident: str, created: int,
                      prompt_tokens: int, http: HttpRequest) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    def chunks(index: int, event: Any) -> Iterator[dict[str, Any]]:
        if event.text:
            yield chunk(index, {"content": event.text}, None)
        if event.finish_reason is not None:
            yield chunk(index, {}, finish_reason(event.finish_reason))

    roles = (chunk(index, {"role": "assistant", "content": ""}, None) for index in range(len(generations.handles)))
    stream = stream_events(generations, http, body, ident, created, "chat.completion.chunk", prompt_tokens, roles,
                           chunks)
    async with aclosing(stream) as lines:
        async for line in lines:
            yield line


__all__ = ["ChatRequest", "CompletionRequest", "router"]
