"""``cpmlive dashboard``: the incremental metrics API, and the live page in headless Chromium."""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from serving import chromium_page, serving

from cpmlive.cli import main
from cpmlive.serve.dashboard import create_app, read_since
from cpmlive.train.metrics import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
LOSS_COLOURS = [(0x93, 0xB4, 0xF5), (0x1D, 0x4E, 0xD8)]


def train_record(step: int) -> dict:
    loss = 2.0 + 6.0 * math.exp(-step / 25) + 0.15 * math.sin(step * 1.7)
    return {"type": "train", "step": step, "loss": loss, "loss_infill": loss + 0.1, "loss_generate": loss - 0.1,
            "lr": 1e-3 * min(1.0, step / 20), "tokens": 4096 * step, "tokens_per_s": 1500 + 100 * math.sin(step),
            "grad_norm": 1.0 + 2.0 * math.exp(-step / 10), "memory_mb": 900.0 + step, "elapsed_s": 2.7 * step,
            "cost": 0.0002 * step, "co2_kg": 0.00006 * step, "time": time.time()}


def params_record(step: int) -> dict:
    names = ["input_embedding.weight", "layers.0.attn.project_q.weight", "layers.0.ffn_norm.weight",
             "output_norm.weight"]
    return {"type": "params", "step": step,
            "stats": {name: [0.001 * i, 0.02 + 0.0005 * step * (i + 1), 0.1 + 0.01 * i]
                      for i, name in enumerate(names)}}


def write_step(log: MetricsLog, step: int) -> None:
    log.write(train_record(step))
    if step % 10 == 0:
        log.write({"type": "eval", "step": step, "val_loss": train_record(step)["loss"] + 0.2, "time": time.time()})
    if step % 10 == 0 or step == 1:
        log.write(params_record(step))


def live_run(run: Path, stop: threading.Event, backlog: int = 30) -> None:
    """A stand-in for training: the real MetricsLog, one step every 0.3 s after a quick backlog."""
    log = MetricsLog(run)
    log.write({"type": "start", "step": 0, "config": {"max_steps": 200, "price_per_device_hour": 1.5,
                                                      "device_watts": 150.0, "grid_kg_co2_per_kwh": 0.58},
               "parameters": 21_900_672, "time": time.time()})
    step = 0
    try:
        while not stop.is_set():
            step += 1
            write_step(log, step)
            if step > backlog:
                stop.wait(0.3)
    finally:
        log.close()


# ---- API ----------------------------------------------------------------------------------------


def test_metrics_api_is_incremental(tmp_path: Path) -> None:
    client = TestClient(create_app(tmp_path))
    assert "<canvas" in client.get("/").text
    empty = client.get("/api/metrics", params={"since": 0}).json()
    assert empty["exists"] is False and empty["records"] == [] and empty["run"] == tmp_path.name

    log = MetricsLog(tmp_path)
    for step in (1, 2):
        log.write(train_record(step))
    first = client.get("/api/metrics", params={"since": 0}).json()
    assert [r["step"] for r in first["records"]] == [1, 2] and first["exists"]

    log.write(train_record(3))
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"type": "train", "step": 4, "loss": Na')
    second = client.get("/api/metrics", params={"since": first["next"], "file": first["file"]}).json()
    assert [r["step"] for r in second["records"]] == [3] and not second["reset"]

    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('N}\n')
    third = client.get("/api/metrics", params={"since": second["next"]}).json()
    assert third["records"] == [{"type": "train", "step": 4, "loss": None}]
    assert client.get("/api/metrics", params={"since": third["next"]}).json()["records"] == []
    log.close()


def test_metrics_api_starts_over_and_pages(tmp_path: Path) -> None:
    client = TestClient(create_app(tmp_path))
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.write(train_record(step))
    log.close()
    size = (tmp_path / "metrics.jsonl").stat().st_size
    beyond = client.get("/api/metrics", params={"since": size + 10}).json()
    assert beyond["reset"] and len(beyond["records"]) == 5
    replaced = client.get("/api/metrics", params={"since": 10, "file": "other-file"}).json()
    assert replaced["reset"] and len(replaced["records"]) == 5
    assert client.get("/api/metrics", params={"since": -1}).status_code == 422

    steps, since, more = [], 0, True
    while more:
        chunk = read_since(tmp_path, since, limit=300)
        steps += [r["step"] for r in chunk["records"]]
        since, more = chunk["next"], chunk["more"]
    assert steps == [1, 2, 3, 4, 5] and since == size


def test_cli_missing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"cpmlive: error: {tmp_path / 'nope'}: no such run directory"]


# ---- the page in a browser ----------------------------------------------------------------------


def running_server(run: Path):
    return serving(create_app(run))


@contextmanager
def live_run_thread(run: Path) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=live_run, args=(run, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def shown_step(page, at_least: int) -> int:
    page.wait_for_function("n => Number(document.getElementById('step').dataset.step || 0) >= n",
                           arg=at_least, timeout=15_000)
    return int(page.get_attribute("#step", "data-step"))


LOSS_PIXELS = """colours => {
  const canvas = document.getElementById('chart-loss');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let hits = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (colours.some(([r, g, b]) => Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 30
                                    && data[i + 3] > 200)) hits++;
  }
  return {hits, points: Number(canvas.dataset.points)};
}"""


def test_live_page_in_chromium(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with live_run_thread(run), running_server(run) as url, chromium_page(1400, 900) as (page, errors):
        page.goto(f"{url}/?poll=400")
        first = shown_step(page, at_least=30)
        later = shown_step(page, at_least=first + 3)
        assert later > first
        drawn = page.evaluate(LOSS_PIXELS, [list(c) for c in LOSS_COLOURS])
        assert drawn["points"] >= 2 * later and drawn["hits"] > 100, drawn
        assert page.inner_text("#status") == "live"
        assert page.locator("#param-rows tr").count() == 4
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        page.route("**/api/metrics*", lambda route: route.fulfill(status=503, body="down"))
        page.wait_for_selector("#error.show", timeout=5_000)
        assert "HTTP 503" in page.inner_text("#error") and page.inner_text("#status") == "offline"
        assert errors == []
    assert (ARTIFACTS / "dashboard.png").read_bytes()[:4] == b"\x89PNG"
