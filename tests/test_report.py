"""``cpmlive report``: exact figures and anomaly lines from a hand-made metrics.jsonl."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from cpmlive.cli import main
from cpmlive.errors import CpmliveError
from cpmlive.train.report import write_report

MIDNIGHT = datetime(2026, 1, 2, tzinfo=timezone.utc).timestamp()
T0 = MIDNIGHT - 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def step_time(step: int, resumed: bool = False) -> float:
    """2 s a step; a 1000 s stall after step 50; 400 s down before the resumed steps."""
    return T0 + 2 * step + (1000 if step > 50 else 0) + (400 if resumed else 0)


def train(step: int, loss: float | None, grad: float = 1.0, resumed: bool = False) -> dict:
    return {"type": "train", "step": step, "loss": loss,
            "loss_infill": None if loss is None else loss + 0.1, "loss_generate": None if loss is None else loss - 0.1,
            "lr": 1e-3, "tokens": 1000 * step, "tokens_per_s": 500.0, "grad_norm": grad, "memory_mb": 100.0,
            "elapsed_s": 2.0 * step, "cost": 0.001 * step, "co2_kg": 0.0005 * step,
            "time": step_time(step, resumed)}


def base_loss(step: int) -> float:
    return 5.0 if step % 2 else 5.1


def lines_of_run(data_dir: Path) -> list[str]:
    config = {"max_steps": 100, "data": str(data_dir), "price_per_device_hour": 2.0}
    records = [{"type": "start", "step": 0, "config": config, "parameters": 1234, "time": T0}]
    for step in range(1, 59):
        loss = {30: 9.0, 40: None, 41: float("nan")}.get(step, base_loss(step))
        records.append(train(step, loss, grad=10.0 if step == 45 else 1.0))
        if step == 20:
            records.append({"type": "eval", "step": 20, "val_loss": 5.2, "time": step_time(20)})
    records.append({"type": "start", "step": 55, "config": config, "parameters": 1234, "time": step_time(55, True)})
    records += [train(step, 4.5, resumed=True) for step in range(56, 61)]
    records.append({"type": "eval", "step": 60, "val_loss": 4.8, "time": step_time(60, True)})
    return [json.dumps(r) for r in records] + ['{"type": "train", "step": 61, "lo']


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"chars": 3000, "tokens": 2000}))
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines_of_run(data)))
    return run


@pytest.fixture(scope="module")
def whole(run_dir: Path) -> Path:
    return write_report(run_dir)


def section(markdown: str, title: str) -> list[str]:
    body = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def table(markdown: str) -> dict[str, str]:
    rows = [line.strip("|").split(" | ") for line in section(markdown, "Summary")[2:]]
    return {name.strip(): value.strip() for name, value in rows}


def test_whole_run_figures(whole: Path) -> None:
    assert whole.name == "report.md" and whole.parent.name == "reports"
    rows = table(whole.read_text(encoding="utf-8"))
    assert rows == {
        "Steps": "1 → 60 (60 steps logged)",
        "Progress": "60.0% of 100 steps",
        "Mean grad norm": "1.1500",
        "Loss at start": "5.0000 (step 1)",
        "Loss at end": "4.5000 (step 60)",
        "Mean loss, first / last 10 steps": "5.0500 → 4.7700 (-0.2800)",
        "Last step infilling / generation loss": "4.6000 / 4.4000",
        "Validation loss": "4.8000 (step 60), from 5.2000 (step 20)",
        "Tokens seen": "60,000 (60.00 k); 60,000 in total",
        "Characters seen (estimate)": "≈90,000 (90.00 k) at 1.500 chars/token of the corpus",
        "Compute time": "2 min 00 s",
        "Throughput": "500 tokens/s",
        "Wall-clock throughput": "39 tokens/s over 25 min 18 s (includes evaluation, checkpoints and stalls)",
        "Cost": "$0.06",
        "CO2e": "0.030 kg",
    }


def test_whole_run_anomalies(whole: Path) -> None:
    assert section(whole.read_text(encoding="utf-8"), "Anomalies") == [
        "- step 30: loss spike 9.0000 (rolling median 5.0000, +80.0 robust sigma)",
        "- step 40: loss is not finite (null)",
        "- step 41: loss is not finite (nan)",
        "- step 45: grad-norm spike 10 (10.0x the rolling median 1)",
        "- step 51: stall: 16 min 42 s between steps 50 and 51 (median step time 2.00 s)",
        "- step 55: run resumed from step 55; steps 56-58 were re-run (the newest records are used)",
        "- step 56: stall: 6 min 42 s between steps 55 and 56 (median step time 2.00 s)",
    ]


def test_plots_are_linked_pngs(whole: Path) -> None:
    plots = section(whole.read_text(encoding="utf-8"), "Plots")
    assert plots[:2] == ["![Loss](report-loss.png)", "![Learning rate and gradient norm](report-lr-grad.png)"]
    for name in ("report-loss.png", "report-lr-grad.png"):
        path = whole.parent / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as image:
            image.verify()
            assert image.size[0] >= 600
    assert not [p for p in whole.parent.iterdir() if p.name.endswith(".tmp")]


def test_one_day(run_dir: Path, tmp_path: Path) -> None:
    day = datetime.fromtimestamp(MIDNIGHT, tz=timezone.utc).date().isoformat()
    path = write_report(run_dir, out=tmp_path, day=day)
    assert path == tmp_path / f"report-{day}.md"
    markdown = path.read_text(encoding="utf-8")
    rows = table(markdown)
    assert rows["Steps"] == "51 → 60 (10 steps logged)"
    assert rows["Tokens seen"] == "10,000 (10.00 k); 60,000 in total"
    assert rows["Compute time"] == "20.0 s"
    assert rows["Cost"] == "$0.01"
    assert rows["Validation loss"] == "4.8000 (step 60)"
    assert section(markdown, "Anomalies") == [
        "- step 51: stall: 16 min 42 s between steps 50 and 51 (median step time 2.00 s)",
        "- step 55: run resumed from step 55; steps 56-58 were re-run (the newest records are used)",
        "- step 56: stall: 6 min 42 s between steps 55 and 56 (median step time 2.00 s)",
    ]
    assert f"![Loss](report-{day}-loss.png)" in markdown
    assert (tmp_path / f"report-{day}-lr-grad.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("setup, day, message", [
    ("missing", None, "no such run directory"),
    ("no-file", None, "no metrics.jsonl"),
    ("empty", None, "no training steps logged yet"),
    ("torn-only", None, "no training steps logged yet"),
    ("ok", "2026-13-01", "expected YYYY-MM-DD"),
    ("ok", "2025-01-01", "no training steps logged on 2025-01-01"),
])
def test_clear_errors(tmp_path: Path, setup: str, day: str | None, message: str) -> None:
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    contents = {"empty": "", "torn-only": '{"type": "train", "st', "ok": json.dumps(train(1, 5.0)) + "\n"}
    if setup in contents:
        (run / "metrics.jsonl").write_text(contents[setup])
    with pytest.raises(CpmliveError, match=message):
        write_report(run, day=day)


def test_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_dir), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'report.md'}"
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cpmlive: error: {tmp_path / 'nope'}: no such run directory"]
