"""``/v1/embeddings`` in OpenAI's shape, for the families that embed (encoders and
encoder-decoders): each input's vector from the encoder's final hidden states (``LM.embed``).

OpenAI's vectors have unit length; so do these unless ``normalize`` is false. ``pooling`` (our
extension) is ``mean`` (sentence-transformers' pooling, the default), ``cls`` or ``pooler``.
``encoding_format`` ``base64`` sends little-endian float32 bytes as OpenAI's client reads them.
The work a request can cause is bounded before it is done: at most :data:`MAX_INPUTS` texts of at
most :data:`MAX_INPUT_CHARS` characters, each within the model's positions.
"""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Request as HttpRequest
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from cpmlive.serve.runtime import ServerError, ServerState, valid_text
from cpmlive.serve.tasks import as_list, needs, timed_answer

if TYPE_CHECKING:
    from fastapi import APIRouter

    from cpmlive.api import LM

MAX_INPUTS = 64
MAX_INPUT_CHARS = 8_000
Input = Annotated[str, Field(min_length=1, max_length=MAX_INPUT_CHARS), AfterValidator(valid_text)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore",
                              json_schema_extra={"examples": [{"input": ["今天天气不错", "北京是中国的首都"]}]})
    input: Annotated[list[Input], BeforeValidator(as_list), Field(min_length=1, max_length=MAX_INPUTS)] = Field(
        description="one text or a list of texts (token arrays are not taken)")
    model: str | None = Field(None, max_length=200)
    encoding_format: Literal["float", "base64"] = "float"
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    normalize: bool = True
    user: str | None = Field(None, max_length=200)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def encoded(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings_for(lm: LM, request: EmbeddingRequest) -> dict[str, Any]:
    vectors = lm.embed(request.input, pooling=request.pooling, normalize=request.normalize)
    tokens = sum(len(lm.tokenizer.encode_for_model(text)) for text in request.input)
    data = [{"object": "embedding", "index": index,
             "embedding": encoded(vector) if request.encoding_format == "base64" else vector}
            for index, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def router(state: ServerState) -> APIRouter:
    from fastapi import APIRouter

    api = APIRouter()

    @api.post("/v1/embeddings", dependencies=[needs(state, "embed")], response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest, http: HttpRequest) -> dict[str, Any]:
        if state.resolve(body.model) is not None:
            raise ServerError(400, "embeddings come from the base model, not an adapter", "invalid_request_error",
                              None, "model")
        answer = await timed_answer(state, embeddings_for, body, http)
        answer.pop("seconds")
        return {**answer, "model": state.base_name}

    return api


__all__ = ["EmbeddingRequest", "MAX_INPUTS", "MAX_INPUT_CHARS", "router"]
