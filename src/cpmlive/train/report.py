"""``cpmlive report RUN_DIR``: the daily training log, in the style CPM-Live published.

From ``metrics.jsonl`` it writes a markdown page (loss at the start and end of the period,
data seen, mean grad norm, progress, throughput, cost and CO2e, anomalies) and two PNG plots
it links by relative path. ``--day YYYY-MM-DD`` limits the period to that UTC day. Anomalies:
loss spikes (above the rolling median by more than K robust standard deviations), losses that
are NaN/inf/null, grad-norm spikes (a multiple of the rolling median), stalls (a wall-clock
gap between consecutive steps far above the median step time) and resumes.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from cpmlive.errors import CpmliveError
from cpmlive.train.metrics import METRICS_FILE, latest_by_step, read_records
from cpmlive.utils import atomic_write_bytes, atomic_write_text

WINDOW = 50
MIN_HISTORY = 10
LOSS_SIGMAS = 6.0
MAD_TO_SIGMA = 1.4826
GRAD_FACTOR = 3.0
STALL_FACTOR = 10.0
STALL_MIN_S = 60.0
SMOOTH_STEPS = 10


@dataclass
class Period:
    """The train / eval records a report covers, plus what came before them."""

    label: str
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    history: list[dict[str, Any]]
    before: dict[str, Any] | None
    starts: list[dict[str, Any]] = field(default_factory=list)


# ---- loading ------------------------------------------------------------------------------------


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    if not run_dir.is_dir():
        raise CpmliveError(f"{run_dir}: no such run directory")
    if not (run_dir / METRICS_FILE).is_file():
        raise CpmliveError(f"{run_dir}: no {METRICS_FILE} (has training started?)")
    records = list(read_records(run_dir))
    if not latest_by_step(records, "train"):
        raise CpmliveError(f"{run_dir / METRICS_FILE}: no training steps logged yet")
    return records


def parse_day(day: str) -> date:
    try:
        return date.fromisoformat(day)
    except ValueError:
        raise CpmliveError(f"--day {day!r}: expected YYYY-MM-DD") from None


def day_bounds(day: date) -> tuple[float, float]:
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    return start.timestamp(), (start + timedelta(days=1)).timestamp()


def select_period(records: list[dict[str, Any]], day: date | None) -> Period:
    train = latest_by_step(records, "train")
    evals = latest_by_step(records, "eval")
    starts = [r for r in records if r.get("type") == "start"]
    if day is None:
        return Period("whole run", train, evals, train, None, starts)
    lo, hi = day_bounds(day)
    inside = [r for r in train if lo <= _time(r) < hi]
    if not inside:
        raise CpmliveError(f"no training steps logged on {day.isoformat()} (UTC)")
    first = inside[0]["step"]
    before = [r for r in train if r["step"] < first]
    return Period(day.isoformat(), inside, [r for r in evals if lo <= _time(r) < hi], train,
                  before[-1] if before else None, [r for r in starts if lo <= _time(r) < hi])


def _time(record: dict[str, Any]) -> float:
    value = record.get("time")
    return float(value) if isinstance(value, (int, float)) else math.nan


def run_config(records: list[dict[str, Any]]) -> dict[str, Any]:
    starts = [r for r in records if r.get("type") == "start" and isinstance(r.get("config"), dict)]
    return starts[-1]["config"] if starts else {}


def chars_per_token(config: dict[str, Any]) -> float | None:
    """The corpus's chars / tokens ratio from the token store's meta.json, when it can be read."""
    data = config.get("data")
    if not data:
        return None
    try:
        meta = json.loads((Path(data) / "meta.json").read_text(encoding="utf-8"))
        return float(meta["chars"]) / float(meta["tokens"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


# ---- anomalies ----------------------------------------------------------------------------------


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def rolling_baseline(values: list[float]) -> tuple[float, float] | None:
    """Median and robust sigma (1.4826 MAD) of the last WINDOW finite values, if there are enough."""
    window = values[-WINDOW:]
    if len(window) < MIN_HISTORY:
        return None
    median = statistics.median(window)
    mad = statistics.median(abs(v - median) for v in window)
    return median, MAD_TO_SIGMA * mad


def _spikes(history: list[dict[str, Any]], steps: set[int], key: str, name: str,
            spike: Callable[[float, float, float], str | None]) -> list[tuple[int, str]]:
    """The steps in ``steps`` whose ``key`` is not finite, or a spike by ``spike(value, median, sigma)``
    against the rolling baseline of the finite values before it."""
    found, seen = [], []
    for record in history:
        value, step = record.get(key), record["step"]
        if not finite(value):
            if step in steps:
                found.append((step, f"{name} is not finite ({_show(value)})"))
            continue
        base = rolling_baseline(seen)
        message = spike(value, *base) if base and step in steps else None
        if message:
            found.append((step, message))
        seen.append(value)
    return found


def _loss_spike(loss: float, median: float, sigma: float) -> str | None:
    scale = max(sigma, 0.01 * abs(median), 1e-12)
    if loss > median + LOSS_SIGMAS * scale:
        return f"loss spike {loss:.4f} (rolling median {median:.4f}, +{(loss - median) / scale:.1f} robust sigma)"
    return None


def _grad_spike(norm: float, median: float, sigma: float) -> str | None:
    if median > 0 and norm > GRAD_FACTOR * median:
        return f"grad-norm spike {norm:.4g} ({norm / median:.1f}x the rolling median {median:.4g})"
    return None


def loss_anomalies(history: list[dict[str, Any]], steps: set[int]) -> list[tuple[int, str]]:
    return _spikes(history, steps, "loss", "loss", _loss_spike)


def grad_anomalies(history: list[dict[str, Any]], steps: set[int]) -> list[tuple[int, str]]:
    return _spikes(history, steps, "grad_norm", "grad norm", _grad_spike)


def stall_anomalies(history: list[dict[str, Any]], steps: set[int]) -> list[tuple[int, str]]:
    pairs = [(a, b) for a, b in zip(history, history[1:]) if b["step"] == a["step"] + 1]
    gaps = [(b, _time(b) - _time(a)) for a, b in pairs if math.isfinite(_time(b) - _time(a))]
    if not gaps:
        return []
    median = statistics.median(gap for _, gap in gaps)
    limit = max(STALL_FACTOR * median, STALL_MIN_S)
    return [(b["step"], f"stall: {_duration(gap)} between steps {b['step'] - 1} and {b['step']} "
                        f"(median step time {median:.2f} s)")
            for b, gap in gaps if gap > limit and b["step"] in steps]


def resume_anomalies(records: list[dict[str, Any]], period: Period) -> list[tuple[int, str]]:
    found, highest, runs = [], None, 0
    chosen = {id(r) for r in period.starts}
    for record in records:
        kind = record.get("type")
        if kind == "train" and isinstance(record.get("step"), int):
            highest = max(highest or 0, record["step"])
        elif kind == "start":
            runs += 1
            if runs > 1 and id(record) in chosen:
                step = int(record.get("step") or 0)
                redo = max(0, (highest or 0) - step)
                found.append((step, f"run resumed from step {step}" + (
                    f"; steps {step + 1}-{highest} were re-run (the newest records are used)" if redo else "")))
    return found


def anomalies(records: list[dict[str, Any]], period: Period) -> list[str]:
    steps = {r["step"] for r in period.train}
    found = (loss_anomalies(period.history, steps) + grad_anomalies(period.history, steps)
             + stall_anomalies(period.history, steps) + resume_anomalies(records, period))
    return [f"step {step}: {text}" for step, text in sorted(found, key=lambda item: item[0])]


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower()


# ---- figures ------------------------------------------------------------------------------------


@dataclass
class Summary:
    rows: list[tuple[str, str]]
    anomalies: list[str]


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s"


def _count(value: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _clock(timestamp: float) -> str:
    if not math.isfinite(timestamp):
        return "?"
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _delta(period: Period, key: str) -> float:
    last = period.train[-1].get(key) or 0.0
    base = (period.before.get(key) or 0.0) if period.before else 0.0
    return float(last) - float(base)


def _mean(values: list[Any]) -> float | None:
    good = [float(v) for v in values if finite(v)]
    return sum(good) / len(good) if good else None


def _loss_at(records: list[dict[str, Any]]) -> str:
    record = next((r for r in records if finite(r.get("loss"))), None)
    return f"{record['loss']:.4f} (step {record['step']})" if record else "n/a (no finite loss)"


def loss_rows(period: Period) -> list[tuple[str, str]]:
    train = period.train
    head = _mean([r.get("loss") for r in train[:SMOOTH_STEPS]])
    tail = _mean([r.get("loss") for r in train[-SMOOTH_STEPS:]])
    rows = [("Loss at start", _loss_at(train)), ("Loss at end", _loss_at(train[::-1]))]
    if head is not None and tail is not None:
        rows.append((f"Mean loss, first / last {SMOOTH_STEPS} steps", f"{head:.4f} → {tail:.4f} ({tail - head:+.4f})"))
    last = train[-1]
    rows.append(("Last step infilling / generation loss",
                 f"{_fixed(last.get('loss_infill'))} / {_fixed(last.get('loss_generate'))}"))
    rows.append(("Validation loss", _val_text(period.evals)))
    return rows


def _fixed(value: Any) -> str:
    return f"{value:.4f}" if finite(value) else "n/a"


def _val_text(evals: list[dict[str, Any]]) -> str:
    good = [r for r in evals if finite(r.get("val_loss"))]
    if not good:
        return "no evaluation in this period"
    text = f"{good[-1]['val_loss']:.4f} (step {good[-1]['step']})"
    if len(good) > 1:
        text += f", from {good[0]['val_loss']:.4f} (step {good[0]['step']})"
    return text


def data_rows(period: Period, config: dict[str, Any]) -> list[tuple[str, str]]:
    tokens, total = _delta(period, "tokens"), float(period.train[-1].get("tokens") or 0)
    rows = [("Tokens seen", f"{tokens:,.0f} ({_count(tokens)}); {total:,.0f} in total")]
    ratio = chars_per_token(config)
    if ratio is None:
        rows.append(("Characters seen", "unknown (the data's meta.json could not be read)"))
    else:
        rows.append(("Characters seen (estimate)", f"≈{tokens * ratio:,.0f} ({_count(tokens * ratio)}) "
                                                   f"at {ratio:.3f} chars/token of the corpus"))
    return rows


def progress_rows(period: Period, config: dict[str, Any]) -> list[tuple[str, str]]:
    first, last = period.train[0]["step"], period.train[-1]["step"]
    max_steps = config.get("max_steps")
    progress = f"{100 * last / max_steps:.1f}% of {max_steps:,} steps" if max_steps else "unknown (no start record)"
    grad = _mean([r.get("grad_norm") for r in period.train])
    return [("Steps", f"{first} → {last} ({len(period.train)} steps logged)"), ("Progress", progress),
            ("Mean grad norm", f"{grad:.4f}" if grad is not None else "n/a")]


def throughput_rows(period: Period, config: dict[str, Any]) -> list[tuple[str, str]]:
    train, compute = period.train, _delta(period, "elapsed_s")
    tokens = _delta(period, "tokens")
    wall = _time(train[-1]) - _time(train[0])
    rows = [("Compute time", _duration(compute)),
            ("Throughput", f"{tokens / compute:,.0f} tokens/s" if compute > 0 else "n/a")]
    if len(train) > 1 and wall > 0:
        span = float(train[-1].get("tokens") or 0) - float(train[0].get("tokens") or 0)
        rows.append(("Wall-clock throughput", f"{span / wall:,.0f} tokens/s over {_duration(wall)} "
                                              "(includes evaluation, checkpoints and stalls)"))
    price = config.get("price_per_device_hour")
    rows.append(("Cost", f"${_delta(period, 'cost'):,.2f}" + ("" if price else " (no price set in the recipe)")))
    rows.append(("CO2e", f"{_delta(period, 'co2_kg'):.3f} kg"))
    return rows


def summarize(records: list[dict[str, Any]], period: Period) -> Summary:
    config = run_config(records)
    rows = (progress_rows(period, config) + loss_rows(period) + data_rows(period, config)
            + throughput_rows(period, config))
    return Summary(rows, anomalies(records, period))


# ---- plots --------------------------------------------------------------------------------------


def _figure(rows: int):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6 * rows), dpi=100, layout="constrained")
    return figure, [figure.add_subplot(rows, 1, i + 1) for i in range(rows)]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _xy(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps = [r["step"] for r in records]
    return steps, [float(r[key]) if finite(r.get(key)) else math.nan for r in records]


def loss_plot(period: Period) -> bytes:
    figure, (axes,) = _figure(1)
    for key, label, style in (("loss", "loss", {"lw": 1.6, "color": "#2563eb"}),
                              ("loss_infill", "infilling", {"lw": 0.9, "alpha": 0.7, "color": "#f59e0b"}),
                              ("loss_generate", "generation", {"lw": 0.9, "alpha": 0.7, "color": "#10b981"})):
        axes.plot(*_xy(period.train, key), label=label, **style)
    if period.evals:
        axes.plot(*_xy(period.evals, "val_loss"), "o-", label="validation", color="#dc2626", lw=1.6, ms=5)
    axes.set(title=f"Loss ({period.label})", xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    return _png(figure)


def lr_grad_plot(period: Period) -> bytes:
    figure, (top, bottom) = _figure(2)
    top.plot(*_xy(period.train, "lr"), color="#7c3aed", lw=1.4)
    top.set(title=f"Learning rate ({period.label})", ylabel="lr")
    top.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    bottom.plot(*_xy(period.train, "grad_norm"), color="#0891b2", lw=1.0)
    bottom.set(title="Gradient norm (before clipping)", xlabel="step", ylabel="grad norm")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    return _png(figure)


# ---- markdown -----------------------------------------------------------------------------------


def render_markdown(run_dir: Path, period: Period, summary: Summary, plots: dict[str, str]) -> str:
    first, last = period.train[0], period.train[-1]
    lines = [f"# Training log: {run_dir.resolve().name} ({period.label})", "",
             f"Run directory `{run_dir}`; steps {first['step']}–{last['step']}, "
             f"logged {_clock(_time(first))} → {_clock(_time(last))} UTC.", "",
             "## Summary", "", "| Metric | Value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary.rows]
    lines += ["", "## Anomalies", ""]
    lines += [f"- {text}" for text in summary.anomalies] or ["None detected."]
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({name})" for title, name in plots.items()]
    lines += ["", f"<sub>Loss spikes: above the median of the previous {WINDOW} steps by more than "
                  f"{LOSS_SIGMAS:g} robust sigma; grad-norm spikes: above {GRAD_FACTOR:g}x that median; "
                  f"stalls: more than max({STALL_FACTOR:g}x the median step time, {STALL_MIN_S:g} s) "
                  "between consecutive steps.</sub>", ""]
    return "\n".join(lines)


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 day: str | None = None) -> Path:
    """Write the report (and its plots) and return the markdown's path."""
    run = Path(run_dir)
    records = load_records(run)
    period = select_period(records, parse_day(day) if day else None)
    summary = summarize(records, period)
    out_dir = Path(out) if out is not None else run / "reports"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CpmliveError(f"{out_dir}: cannot create the output directory ({exc.strerror})") from None
    stem = f"report-{day}" if day else "report"
    plots = {"Loss": f"{stem}-loss.png", "Learning rate and gradient norm": f"{stem}-lr-grad.png"}
    atomic_write_bytes(out_dir / plots["Loss"], loss_plot(period))
    atomic_write_bytes(out_dir / plots["Learning rate and gradient norm"], lr_grad_plot(period))
    path = out_dir / f"{stem}.md"
    atomic_write_text(path, render_markdown(run, period, summary, plots))
    return path


__all__ = ["write_report"]
