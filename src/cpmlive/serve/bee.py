"""``/v1/bee``: fill the ``<ans>`` fields of CPM-Bee JSON tasks (one task or a batch), as a job
on the engine's thread like the other native routes; the site's ``/bee`` page calls it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cpmlive.errors import CpmliveError
from cpmlive.serve.runtime import ServerState
from cpmlive.serve.tasks import MAX_NAME_CHARS, holding

if TYPE_CHECKING:
    from fastapi import APIRouter

    from cpmlive.api import LM

MAX_TASKS = 16
MAX_BEE_TOKENS = 512


class BeeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: dict[str, Any] | None = None
    tasks: list[dict[str, Any]] | None = Field(None, min_length=1, max_length=MAX_TASKS)
    max_tokens: int = Field(64, ge=1, le=MAX_BEE_TOKENS)
    num_beams: int = Field(1, ge=1, le=8)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    adapter: str | None = Field(None, max_length=MAX_NAME_CHARS)

    @model_validator(mode="after")
    def one_of(self) -> "BeeRequest":
        if (self.task is None) == (self.tasks is None):
            raise ValueError("give either task (one object) or tasks (a list of objects)")
        if self.temperature > 0 and self.num_beams > 1:
            raise ValueError("sampling (temperature > 0) and num_beams > 1 do not combine")
        return self


def answers_for(lm: LM, request: BeeRequest) -> dict[str, Any]:
    if not lm.is_bee:
        raise CpmliveError("this server's model is CPM-Ant; /v1/bee needs a CPM-Bee model")
    if request.adapter is not None and request.adapter not in lm.tasks:
        raise CpmliveError(f"no adapter named {request.adapter!r} (loaded: {', '.join(lm.tasks) or 'none'})")
    sample = request.temperature > 0
    options = dict(num_beams=request.num_beams, do_sample=sample, temperature=request.temperature if sample else 1.0,
                   top_p=request.top_p, top_k=request.top_k, repetition_penalty=request.repetition_penalty,
                   seed=request.seed)
    tasks = request.tasks if request.tasks is not None else [request.task]
    with holding(lm, request.adapter):
        filled = lm.bee(tasks, request.max_tokens, **options)
    key = "results" if request.tasks is not None else "result"
    return {key: filled if request.tasks is not None else filled[0], "adapter": request.adapter}


def router(state: ServerState) -> APIRouter:
    from fastapi import APIRouter

    api = APIRouter()

    @api.post("/v1/bee")
    async def bee(body: BeeRequest) -> dict[str, Any]:
        lm = state.ready()
        admitted = state.admit(len(body.tasks) if body.tasks is not None else 1)
        start = time.perf_counter()
        try:
            answer = await state.job(answers_for, lm, body)
        finally:
            admitted.release()
        return {**answer, "seconds": round(time.perf_counter() - start, 3)}

    return api


__all__ = ["BeeRequest", "router"]
