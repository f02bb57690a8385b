"""The pieces a run report is built from: the run's files read tolerantly, series, formatting, plots.

This module owns reading a run directory tolerantly (missing optional files, unknown keys, runs
with no eval events, a torn last line in metrics.jsonl), the series and the rule that flags where
overfitting starts, number and table formatting, and the plot primitives. `honelm.protocol.report`
lays the generic report out; a stage adds sections of its own (`honelm.stages.contract.ReportSection`, listed on its
`Stage.report_sections`), each deciding from the run's files whether it has anything to show.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from honelm.html_report import write_html

# Relative rise of val_loss over its minimum that counts as "really worse" rather than noise.
OVERFIT_REL_RISE = 0.02
# How many train-loss points to average on each side of the overfit step when checking that
# train loss was still falling (averaging keeps a single noisy batch from deciding).
TRAIN_TREND_WINDOW = 5
PLOT_DPI = 110
# The plots of the generic report; a section's own are listed in its ReportSection.
PLOT_NAMES = ("loss.png", "lr.png", "val_metrics.png")


# --------------------------------------------------------------------------------------------
# Reading the run directory
# --------------------------------------------------------------------------------------------


@dataclass
class Overfit:
    """Where val_loss bottomed out and then rose, and whether train loss kept falling meanwhile."""

    step: int
    min_val_loss: float
    worst_later_step: int
    worst_later_val_loss: float
    train_before: float | None
    train_after: float | None

    @property
    def train_falling(self) -> bool | None:
        """True/False when there is train loss on both sides of the step, None when unknown."""
        if self.train_before is None or self.train_after is None:
            return None
        return self.train_after < self.train_before

    @property
    def is_overfitting(self) -> bool:
        # Val rising while train also rises is instability/divergence, not overfitting; only an
        # explicit contradiction vetoes the flag, missing train data does not.
        return self.train_falling is not False


@dataclass
class RunData:
    """Everything the report needs, parsed once from the run directory."""

    run_dir: Path
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_metric_lines: list[int] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    manifest_error: str | None = None
    best_json: dict[str, Any] | None = None
    best_dir_exists: bool = False
    test_metrics: dict[str, Any] | None = None
    test_metrics_error: str | None = None
    test_looks: list[dict[str, Any]] = field(default_factory=list)
    bad_look_lines: list[int] = field(default_factory=list)
    test_looks_present: bool = False

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def last(self, kind: str) -> dict[str, Any] | None:
        found = self.of(kind)
        return found[-1] if found else None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Parse a JSONL file, returning (objects, 1-based numbers of lines that were not JSON objects).

    Bad lines are skipped, not fatal: a run killed mid-write leaves a torn last line, and the
    report is exactly what one wants to read about such a run. The report lists the skipped lines.
    """
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad.append(lineno)
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad.append(lineno)
    return rows, bad


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) or (None, why) for an optional JSON-object file; (None, None) if absent."""
    if not path.is_file():
        return None, None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"could not parse {path.name}: {exc}"
    if not isinstance(obj, dict):
        return None, f"{path.name} is not a JSON object"
    return obj, None


def load_run(run_dir: str | Path) -> RunData:
    """Read every file the report uses; absent optional files simply leave fields empty."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    data = RunData(run_dir=root)

    cfg_path = root / "config.yaml"
    if cfg_path.is_file():
        data.config_text = cfg_path.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(data.config_text)
            data.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError as exc:
            data.config_error = f"config.yaml could not be parsed: {exc}"

    metrics_path = root / "metrics.jsonl"
    if metrics_path.is_file():
        data.events, data.bad_metric_lines = read_jsonl(metrics_path)

    data.manifest, data.manifest_error = read_json(root / "split_manifest.json")
    data.best_dir_exists = (root / "best").is_dir()
    data.best_json, _ = read_json(root / "best" / "best.json")
    data.test_metrics, data.test_metrics_error = read_json(root / "test_metrics.json")

    looks_path = root / "test_looks.jsonl"
    if looks_path.is_file():
        data.test_looks_present = True
        data.test_looks, data.bad_look_lines = read_jsonl(looks_path)

    return data


# --------------------------------------------------------------------------------------------
# Series extraction and analysis
# --------------------------------------------------------------------------------------------


def num(value: Any) -> float | None:
    """A finite float, or None (bools, strings, NaN/inf are not plottable values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def event_step(event: dict[str, Any]) -> int | None:
    s = event.get("step")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        return None
    return int(s)


def series(events: list[dict[str, Any]], kind: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs for `key` in events of `kind`, sorted by step.

    When a step appears more than once (a run resumed from a checkpoint re-logs the steps after
    it), the later line wins: it belongs to the run that actually continued.
    """
    by_step: dict[int, float] = {}
    for e in events:
        if e.get("event") != kind:
            continue
        s, v = event_step(e), num(e.get(key))
        if s is not None and v is not None:
            by_step[s] = v
    return sorted(by_step.items())


def val_metric_names(events: list[dict[str, Any]]) -> list[str]:
    """Numeric val_* keys of eval events other than val_loss, sorted for a stable layout."""
    names = {
        k
        for e in events
        if e.get("event") == "eval"
        for k, v in e.items()
        if k.startswith("val_") and k != "val_loss" and num(v) is not None
    }
    return sorted(names)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def find_overfit(val: list[tuple[int, float]], train: list[tuple[int, float]]) -> Overfit | None:
    """The eval step of minimum val_loss, if some later eval is more than 2% worse; else None.

    Deliberately simple: "val_loss never again reaches its minimum" holds by construction after
    the (first) minimum, and the 2% margin keeps eval noise from being called overfitting. Train
    loss on either side of that step is averaged so the report can say whether it kept falling.
    """
    if len(val) < 2:
        return None
    best_i = min(range(len(val)), key=lambda i: val[i][1])  # first index on ties
    best_step, best_v = val[best_i]
    threshold = best_v + OVERFIT_REL_RISE * abs(best_v)
    later = [(s, v) for s, v in val[best_i + 1 :] if v > threshold]
    if not later:
        return None
    worst_step, worst_v = max(later, key=lambda sv: sv[1])
    before = [v for s, v in train if s <= best_step][-TRAIN_TREND_WINDOW:]
    after = [v for s, v in train if s > best_step][-TRAIN_TREND_WINDOW:]
    return Overfit(best_step, best_v, worst_step, worst_v, _mean(before), _mean(after))


@dataclass
class Best:
    step: int | None
    metric: str | None
    value: float | None
    source: str


def find_best(data: RunData) -> Best | None:
    """The run's own record of its best step; the end event wins, then the last best event, then best.json."""
    end = data.last("end")
    # The loop writes best_step=0 with best_value=None when it never evaluated; that is "no best",
    # not a best at step 0, so a missing value disqualifies the record.
    if end is not None and end.get("best_step") is not None and num(end.get("best_value")) is not None:
        return Best(
            _int_or_none(end.get("best_step")), end.get("best_metric"), num(end.get("best_value")), "end event"
        )
    best_ev = data.last("best")
    if best_ev is not None:
        return Best(event_step(best_ev), best_ev.get("metric"), num(best_ev.get("value")), "best event")
    if data.best_json is not None:
        bj = data.best_json
        return Best(_int_or_none(bj.get("step")), bj.get("metric"), num(bj.get("value")), "best/best.json")
    return None


def _int_or_none(value: Any) -> int | None:
    v = num(value)
    return int(v) if v is not None else None


# --------------------------------------------------------------------------------------------
# Formatting helpers (deterministic: no "now", no locale)
# --------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """Compact, stable rendering of a metric value for markdown."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def fmt_time(ts: Any) -> str:
    v = num(ts)
    if v is None:
        return "—"
    return datetime.fromtimestamp(v, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_duration(seconds: float) -> str:
    total = int(round(seconds))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    human = f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"
    return f"{seconds:.1f} s ({human})"


def cell(value: Any) -> str:
    """A markdown table cell: pipes and newlines would break the table."""
    text = value if isinstance(value, str) else fmt(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def fenced(text: str, lang: str) -> list[str]:
    """A fenced code block whose fence is longer than any backtick run inside the text."""
    longest = 0
    run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text.rstrip("\n"), fence]


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def new_figure(width: float = 8.0, height: float = 4.5) -> Any:
    """A Figure on an explicit Agg canvas.

    Using the object API instead of pyplot means no global backend switch (a notebook or GUI
    caller keeps its backend), no global figure registry to leak into, and thread safety.
    """
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    # Dropping the Software entry keeps the PNG bytes independent of the matplotlib version.
    fig.savefig(path, dpi=PLOT_DPI, metadata={"Software": None})
    fig.clear()


def plot_loss(
    path: Path,
    train: list[tuple[int, float]],
    val: list[tuple[int, float]],
    best_step: int | None,
    overfit: Overfit | None,
) -> None:
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(
            [s for s, _ in val], [v for _, v in val], label="val loss", color="tab:orange", marker="o", markersize=4
        )
    if best_step is not None:
        ax.axvline(best_step, color="tab:green", linestyle="--", linewidth=1.2, label=f"best step {best_step}")
    if overfit is not None and overfit.is_overfitting:
        ax.annotate(
            f"overfitting starts (step {overfit.step})",
            xy=(overfit.step, overfit.min_val_loss),
            xytext=(0.55, 0.85),
            textcoords="axes fraction",
            arrowprops={"arrowstyle": "->", "color": "tab:red"},
            color="tab:red",
        )
    ax.set_title("Loss vs step")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right" if not (overfit and overfit.is_overfitting) else "lower left")
    save_figure(fig, path)


def plot_lr(path: Path, lr: list[tuple[int, float]]) -> None:
    fig = new_figure(8.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([s for s, _ in lr], [v for _, v in lr], color="tab:purple", linewidth=1.2)
    ax.set_title("Learning rate vs step")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.3)
    save_figure(fig, path)


def plot_val_metrics(path: Path, metrics: dict[str, list[tuple[int, float]]],
                     title: str = "Validation metrics vs step") -> None:
    """One small panel per metric, shared step axis (validation metrics; PPO's rollout and update statistics).

    One panel each rather than one shared axis: accuracy (0–1) and perplexity (tens or more)
    on one y-axis would flatten every metric but the largest into a line at the bottom.
    """
    names = list(metrics)
    cols = 1 if len(names) == 1 else 2
    rows = math.ceil(len(names) / cols)
    fig = new_figure(8.0 if cols == 2 else 6.5, 3.0 * rows + 0.5)
    first = None
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1, sharex=first)
        first = first or ax
        pts = metrics[name]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", markersize=3, linewidth=1.2, color=f"C{i % 10}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(name.removeprefix("val_"))
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return fmt(value)


def finish_report(path: Path, lines: list[str]) -> Path:
    """DIR/report.md from `lines`, and its self-contained DIR/report.html; returns the md path."""
    report = path / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    write_html(report)
    return report


def fmt_duration_short(seconds: float) -> str:
    """12.3 s, 4m 05s, 2h 03m: short enough for a table cell."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"
