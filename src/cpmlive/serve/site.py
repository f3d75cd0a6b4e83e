"""The site: the playground (``/``), the headline app (``/title``), CPM-Bee's JSON tasks (``/bee``) and, when the
server was given a training run, its live dashboard (``/dashboard``), under one navigation bar and style.

Each page is a self-contained file in ``pages/`` (no CDN: the site works offline); the bar is
put in front of its body when it is served, and names only the pages this server has.
"""

from __future__ import annotations

import html
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from cpmlive.serve.dashboard import read_since
from cpmlive.serve.runtime import ServerState

if TYPE_CHECKING:
    from fastapi import APIRouter

PAGES = Path(__file__).parent / "pages"
SITE_STYLE = """<style>
  nav.site { display: flex; align-items: center; gap: 4px; padding: 0 18px; height: 40px; background: #111827;
             font: 14px/1 system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "WenQuanYi Micro Hei", sans-serif; }
  nav.site .home { color: #fff; font-weight: 700; letter-spacing: .04em; margin-right: 14px; text-decoration: none; }
  nav.site a.page { color: #cbd5e1; text-decoration: none; padding: 7px 12px; border-radius: 7px; }
  nav.site a.page:hover { background: #1f2937; color: #fff; }
  nav.site a.page.here { background: #374151; color: #fff; }
  nav.site .model { margin-left: auto; color: #94a3b8; font-size: 12px; }
</style>"""


@lru_cache(maxsize=None)
def page_text(name: str) -> str:
    return (PAGES / name).read_text(encoding="utf-8")


def bee_first(state: ServerState) -> bool:
    """A model that answers JSON tasks (CPM-Bee's): its playground is the JSON-task page (its
    text and dialogue tasks answer on the OpenAI routes)."""
    return state.lm is not None and state.lm.can("bee")


def links(state: ServerState) -> list[tuple[str, str]]:
    """The pages of what the model's family does (``model.families``)."""
    if bee_first(state):
        found = [("/", "CPM-Bee 任务")]
    else:
        found = [("/", "Playground 试验场")]
        if state.lm is None or state.lm.can("title"):
            found.append(("/title", "智取标题"))
    if state.settings.run_dir is not None:
        found.append(("/dashboard", "Training 训练"))
    return found


def with_layout(state: ServerState, name: str, here: str) -> str:
    """Page ``name`` with the site's bar in front of its body."""
    items = "".join(f'<a class="page{" here" if path == here else ""}" href="{path}">{html.escape(label)}</a>'
                    for path, label in links(state))
    model = html.escape(state.base_name) if state.lm is not None else "loading…"
    bar = (f'{SITE_STYLE}<nav class="site"><a class="home" href="/">cpmlive</a>{items}'
           f'<span class="model">{model}</span></nav>')
    text = page_text(name)
    return text.replace("<body>", "<body>\n" + bar, 1)


class RunMetrics(BaseModel):
    """``/api/metrics``: the training run's records written after byte ``since`` of its log."""

    run: str
    now: float
    exists: bool
    records: list[dict[str, Any]]
    next: int
    file: str | None
    reset: bool
    more: bool


def router(state: ServerState) -> APIRouter:
    from fastapi import APIRouter, Query
    from fastapi.responses import HTMLResponse, JSONResponse

    from cpmlive.serve.runtime import ServerError
    from cpmlive.serve.tasks import needs

    site = APIRouter()

    @site.get("/", response_class=HTMLResponse)
    def playground() -> str:
        return with_layout(state, "bee.html" if bee_first(state) else "playground.html", "/")

    @site.get("/title", response_class=HTMLResponse, dependencies=[needs(state, "title")])
    def title() -> str:
        return with_layout(state, "title.html", "/title")

    @site.get("/bee", response_class=HTMLResponse, dependencies=[needs(state, "bee")])
    def bee() -> str:
        return with_layout(state, "bee.html", "/bee")

    @site.get("/dashboard", response_class=HTMLResponse)
    def dashboard() -> str:
        if state.settings.run_dir is None:
            raise ServerError(404, "this server shows no training run (start it with --run-dir RUN)")
        return with_layout(state, "dashboard.html", "/dashboard")

    @site.get("/api/metrics", response_model=RunMetrics)
    def run_metrics(since: int = Query(0, ge=0), file: str | None = None) -> Any:
        run = state.settings.run_dir
        if run is None:
            raise ServerError(404, "this server shows no training run (start it with --run-dir RUN)")
        return JSONResponse({"run": run.resolve().name, "now": time.time(), **read_since(run, since, file)},
                            headers={"Cache-Control": "no-store"})

    return site


__all__ = ["router", "with_layout"]
