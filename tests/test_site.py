"""The site in headless Chromium: one server, one bar over the playground (a streamed generation
and a fill), the headline app (a title request) and a live training dashboard. Screenshots go
to ``artifacts/``."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving import chromium_page, serving
from test_app import ARTICLE, ARTIFACTS
from test_dashboard import live_run_thread, shown_step

import cpmlive
from cpmlive.serve.app import Settings, create_app


@pytest.mark.slow
def test_the_site_in_chromium(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lm = cpmlive.load("demo", adapter=["headline"])
    app = create_app(lm, Settings(run_dir=run))
    ARTIFACTS.mkdir(exist_ok=True)
    with live_run_thread(run), serving(app) as url, chromium_page(1200, 860) as (page, errors):
        page.goto(f"{url}/")
        page.wait_for_function("document.getElementById('model').options.length === 2")
        assert page.locator("nav.site a.page").count() == 3  # playground, titles, dashboard
        page.fill("#prompt", "今天天气不错，")
        page.fill("#max_tokens", "40")
        page.fill("#seed", "7")
        page.click("#run")
        page.wait_for_function("document.querySelector('#output .text') && "
                               "document.querySelector('#output .text').textContent.length > 0", timeout=60_000)
        page.wait_for_function("document.getElementById('stats').textContent.includes('finish')", timeout=60_000)
        # the finish reason arrives in the chunk before [DONE]; the button comes back once the stream ends
        page.wait_for_function("!document.getElementById('run').disabled", timeout=60_000)
        streamed = page.inner_text("#output .text")
        assert streamed.strip() and "TTFT" in page.inner_text("#stats")
        assert not page.is_visible("#error")
        page.screenshot(path=str(ARTIFACTS / "site-playground.png"), full_page=True)

        page.click("#tab-fill")
        page.fill("#prompt", "今天<mask>，我们去公园散步。")
        page.click("#run")
        page.wait_for_selector("#output mark.fill", timeout=60_000)
        filled = page.inner_text("#output")
        assert filled.startswith("今天") and filled.endswith("，我们去公园散步。") and "<mask>" not in filled
        page.screenshot(path=str(ARTIFACTS / "site-fill.png"), full_page=True)

        page.click("nav.site >> text=智取标题")
        page.wait_for_url(f"{url}/title")
        page.fill("#article", ARTICLE)
        page.select_option("#count", "3")
        page.click("#generate")
        page.wait_for_selector("#titles li", timeout=120_000)
        assert all(t.strip() for t in page.locator("#titles li .text").all_inner_texts())
        page.screenshot(path=str(ARTIFACTS / "site-title.png"), full_page=True, animations="disabled")

        page.click("nav.site >> text=Training 训练")
        page.wait_for_url(f"{url}/dashboard")
        assert shown_step(page, at_least=5) >= 5
        page.screenshot(path=str(ARTIFACTS / "site-dashboard.png"), full_page=True)
        assert errors == []
    for name in ("site-playground", "site-fill", "site-title", "site-dashboard"):
        assert (ARTIFACTS / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
