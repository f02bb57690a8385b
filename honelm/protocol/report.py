"""The run report: `RUN/report.md`, `RUN/report.html`, `RUN/plots/*.png`, built only from the files a run leaves.

This module owns reading a run directory tolerantly (missing optional files, unknown keys,
runs with no eval events, a torn last line in metrics.jsonl), the rule that flags where
overfitting starts, the plots, and the markdown layout. For classification runs it adds a
confusion matrix and calibration (reliability diagram, ECE) from the per-example predictions
(honelm.protocol.predictions): the test split's when the run was tested, else the validation
predictions saved with the best checkpoint. `write_report` is a pure function of those files:
running it twice gives byte-identical report.md (and report.html).

`write_html` / `md_to_html` (from honelm.protocol.html_report, re-exported here) turn any
honelm markdown report into a self-contained HTML file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from honelm.protocol import predictions as P
from honelm.protocol.html_report import md_to_html, write_html

__all__ = ["write_report", "load_run", "write_html", "md_to_html", "find_overfit", "series"]

# Relative rise of val_loss over its minimum that counts as "really worse" rather than noise.
OVERFIT_REL_RISE = 0.02
# How many train-loss points to average on each side of the overfit step when checking that
# train loss was still falling (averaging keeps a single noisy batch from deciding).
TRAIN_TREND_WINDOW = 5
PLOT_DPI = 110
PLOT_NAMES = ("loss.png", "lr.png", "val_metrics.png", "rollouts.png", "ppo.png", "confusion.png", "calibration.png",
              "pred_vs_gold.png")
# What a PPO run's `rollout` events (one per sampled batch) and its `train` events carry, in panel order.
ROLLOUT_KEYS = ("score", "rlhf_reward", "kl", "response_length", "ended", "time_s")
PPO_TRAIN_KEYS = ("pg_loss", "vf_loss", "entropy", "clipfrac", "vf_clipfrac", "approx_kl")
# Beyond this many classes the confusion plot drops its per-cell numbers (unreadable); the table keeps them.
CONFUSION_ANNOTATE_MAX = 20


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
    labels: dict[int, str] | None = None
    labels_error: str | None = None
    predictions: list[dict[str, Any]] | None = None
    predictions_split: str | None = None  # "test" or "validation"
    predictions_file: str | None = None  # relative to the run directory
    predictions_errors: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def last(self, kind: str) -> dict[str, Any] | None:
        found = self.of(kind)
        return found[-1] if found else None


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
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


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
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
        data.events, data.bad_metric_lines = _read_jsonl(metrics_path)

    data.manifest, data.manifest_error = _read_json(root / "split_manifest.json")
    data.best_dir_exists = (root / "best").is_dir()
    data.best_json, _ = _read_json(root / "best" / "best.json")
    data.test_metrics, data.test_metrics_error = _read_json(root / "test_metrics.json")

    looks_path = root / "test_looks.jsonl"
    if looks_path.is_file():
        data.test_looks_present = True
        data.test_looks, data.bad_look_lines = _read_jsonl(looks_path)

    try:
        data.labels = P.read_labels(root)
    except ValueError as exc:
        data.labels_error = str(exc)
    # The test predictions are the honest ones; the best checkpoint's validation predictions are
    # the fallback for a run not tested yet (they were used to pick that checkpoint: optimistic).
    for split, rel in (("test", P.TEST_FILE), ("validation", f"best/{P.VAL_FILE}")):
        path = root / rel
        if not path.is_file():
            continue
        try:
            rows = P.read_records(path)
        except (ValueError, UnicodeDecodeError) as exc:
            data.predictions_errors.append(f"`{rel}` could not be used: {exc}")
            continue
        if not rows:
            data.predictions_errors.append(f"`{rel}` is empty.")
            continue
        data.predictions, data.predictions_split, data.predictions_file = rows, split, rel
        break
    return data


# --------------------------------------------------------------------------------------------
# Series extraction and analysis
# --------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite float, or None (bools, strings, NaN/inf are not plottable values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _step(event: dict[str, Any]) -> int | None:
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
        s, v = _step(e), _num(e.get(key))
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
        if k.startswith("val_") and k != "val_loss" and _num(v) is not None
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
    if end is not None and end.get("best_step") is not None and _num(end.get("best_value")) is not None:
        return Best(
            _int_or_none(end.get("best_step")), end.get("best_metric"), _num(end.get("best_value")), "end event"
        )
    best_ev = data.last("best")
    if best_ev is not None:
        return Best(_step(best_ev), best_ev.get("metric"), _num(best_ev.get("value")), "best event")
    if data.best_json is not None:
        bj = data.best_json
        return Best(_int_or_none(bj.get("step")), bj.get("metric"), _num(bj.get("value")), "best/best.json")
    return None


def _int_or_none(value: Any) -> int | None:
    v = _num(value)
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
    v = _num(ts)
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


def _new_figure(width: float = 8.0, height: float = 4.5) -> Any:
    """A Figure on an explicit Agg canvas.

    Using the object API instead of pyplot means no global backend switch (a notebook or GUI
    caller keeps its backend), no global figure registry to leak into, and thread safety.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
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
    fig = _new_figure()
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
    _save(fig, path)


def plot_lr(path: Path, lr: list[tuple[int, float]]) -> None:
    fig = _new_figure(8.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([s for s, _ in lr], [v for _, v in lr], color="tab:purple", linewidth=1.2)
    ax.set_title("Learning rate vs step")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def plot_val_metrics(path: Path, metrics: dict[str, list[tuple[int, float]]],
                     title: str = "Validation metrics vs step") -> None:
    """One small panel per metric, shared step axis (validation metrics; PPO's rollout and update statistics).

    One panel each rather than one shared axis: accuracy (0–1) and perplexity (tens or more)
    on one y-axis would flatten every metric but the largest into a line at the bottom.
    """
    names = list(metrics)
    cols = 1 if len(names) == 1 else 2
    rows = math.ceil(len(names) / cols)
    fig = _new_figure(8.0 if cols == 2 else 6.5, 3.0 * rows + 0.5)
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
    _save(fig, path)


def plot_confusion(path: Path, counts: list[list[int]], names: list[str], split: str) -> None:
    """Counts heat map, rows = gold, columns = predicted, each cell numbered (up to CONFUSION_ANNOTATE_MAX classes)."""
    from matplotlib.ticker import MaxNLocator

    n = len(names)
    side = min(max(4.0, 0.55 * n + 2.5), 14.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="examples", ticks=MaxNLocator(integer=True))
    peak = max((c for row in counts for c in row), default=0)
    if n <= CONFUSION_ANNOTATE_MAX:
        for g, row in enumerate(counts):
            for p, c in enumerate(row):
                ax.text(p, g, str(c), ha="center", va="center", fontsize=9,
                        color="white" if peak and c > peak / 2 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=45 if max((len(x) for x in names), default=0) > 6 or n > 8 else 0,
                       ha="right" if n > 8 else "center")
    ax.set_yticklabels(names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"Confusion matrix ({split})")
    _save(fig, path)


def plot_calibration(path: Path, bins: list[Any], ece: float, split: str) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, counts per bin below."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(6.5, 6.5)
    top = fig.add_subplot(2, 1, 1)
    bottom = fig.add_subplot(2, 1, 2, sharex=top)
    width = bins[0].upper - bins[0].lower
    full = [b for b in bins if b.count]
    centres = [b.lower + width / 2 for b in full]
    top.bar(centres, [b.accuracy for b in full], width=width * 0.95, color="tab:blue", edgecolor="black",
            linewidth=0.5, label="accuracy")
    top.plot([b.confidence for b in full], [b.accuracy for b in full], "o", color="tab:orange", markersize=4,
             label="mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram ({split}; ECE {ece:.4f})")
    top.legend(loc="upper left", fontsize=8)
    top.grid(True, alpha=0.3)
    bottom.bar([b.lower + width / 2 for b in bins], [b.count for b in bins], width=width * 0.95, color="tab:gray",
               edgecolor="black", linewidth=0.5)
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("examples")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(True, alpha=0.3)
    _save(fig, path)


def plot_pred_vs_gold(path: Path, gold: list[float], pred: list[float], split: str) -> None:
    """Regression: each example's prediction against its gold value, with the y = x line."""
    fig = _new_figure(5.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(gold, pred, s=10, alpha=0.6, color="tab:blue", edgecolors="none")
    lo, hi = min(gold + pred), max(gold + pred)
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="gray", linewidth=1, label="y = x")
    ax.set_xlabel("gold")
    ax.set_ylabel("predicted")
    ax.set_title(f"Predicted vs gold ({split})")
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Markdown sections
# --------------------------------------------------------------------------------------------


def _stage(config: dict[str, Any]) -> str | None:
    run = config.get("run")
    if isinstance(run, dict) and run.get("stage") is not None:
        return str(run["stage"])
    if config.get("stage") is not None:
        return str(config["stage"])
    return None


def _summary(data: RunData, best: Best | None, train_loss: list[tuple[int, float]], n_evals: int) -> list[str]:
    end = data.last("end")
    steps = [s for s in (_step(e) for e in data.events) if s is not None]
    if end is not None and _step(end) is not None:
        steps_run = str(_step(end))
    elif steps:
        steps_run = f"{max(steps)} (last logged step; no end event)"
    else:
        steps_run = "—"
    if end is not None and end.get("reason") is not None:
        reason = str(end.get("reason"))
    else:
        reason = "no end event (run incomplete or still running)"

    if end is not None and _num(end.get("train_time_s")) is not None:
        train_time = fmt_duration(_num(end.get("train_time_s")) or 0.0)
    else:
        times = [t for t in (_num(e.get("time")) for e in data.events) if t is not None]
        train_time = f"~{fmt_duration(max(times) - min(times))} (span of logged events)" if len(times) > 1 else "—"

    if best is not None:
        best_step = fmt(best.step)
        best_value = f"{fmt(best.value)} ({best.metric or 'metric unknown'}; from {best.source})"
    else:
        best_step, best_value = "—", "— (no best recorded)"

    final_loss = f"{fmt(train_loss[-1][1])} (step {train_loss[-1][0]})" if train_loss else "—"
    rows: list[list[Any]] = [
        ["Steps run", steps_run],
        ["End reason", reason],
        ["Best step", best_step],
        ["Best metric value", best_value],
        ["Train time", train_time],
        ["Final train loss", final_loss],
        ["Eval points", str(n_evals)],
    ]
    early = data.last("early_stop")
    if early is not None:
        rows.append(["Early stop", f"at step {fmt(_step(early))} (patience {fmt(early.get('patience'))})"])
    checkpoints = data.of("checkpoint")
    if checkpoints:
        rows.append(["Checkpoints saved", f"{len(checkpoints)} (last: {checkpoints[-1].get('path', '?')})"])
    if data.best_dir_exists:
        rows.append(["Best model", "`best/`"])
    return ["## Summary", "", *table(["", "value"], rows), ""]


def _overfit_lines(overfit: Overfit | None, n_val: int) -> list[str]:
    out = ["### Overfitting check", ""]
    if n_val < 2:
        out.append("Not enough eval points (need at least 2) to judge overfitting.")
    elif overfit is None:
        out.append(
            f"No overfitting detected: val_loss never rose more than {OVERFIT_REL_RISE:.0%} "
            "above its minimum afterwards."
        )
    else:
        rise = (overfit.worst_later_val_loss - overfit.min_val_loss) / abs(overfit.min_val_loss or 1.0)
        base = (
            f"val_loss reached its minimum {fmt(overfit.min_val_loss)} at step {overfit.step} and later rose to "
            f"{fmt(overfit.worst_later_val_loss)} at step {overfit.worst_later_step} (+{rise:.1%})"
        )
        trend = (
            f"train loss went from {fmt(overfit.train_before)} to {fmt(overfit.train_after)} "
            f"(mean of up to {TRAIN_TREND_WINDOW} points before/after)"
        )
        if overfit.train_falling is True:
            out.append(f"**Overfitting starts at step {overfit.step}**: {base}, while {trend}.")
        elif overfit.train_falling is None:
            out.append(
                f"**Overfitting starts at step {overfit.step}**: {base}; no train loss logged after it to confirm."
            )
        else:
            out.append(
                f"{base}, but {trend}, so train loss did not keep falling: this looks like instability "
                "rather than overfitting, and is not marked as overfitting."
            )
    return [*out, ""]


def _manifest_lines(data: RunData) -> list[str]:
    out = ["## Data split", ""]
    m = data.manifest
    if m is None:
        out.append(data.manifest_error or "No `split_manifest.json` in this run.")
        return [*out, ""]

    counts = m.get("counts")
    if isinstance(counts, dict) and counts:
        total = sum(v for v in counts.values() if _num(v) is not None)
        rows = [
            [split, fmt(n), f"{n / total:.1%}" if total and _num(n) is not None else "—"]
            for split, n in counts.items()
        ]
        out += ["### Counts", "", *table(["split", "examples", "share"], rows), ""]

    hist = m.get("label_histogram")
    if isinstance(hist, dict) and hist:
        splits = [s for s, h in hist.items() if isinstance(h, dict)]
        labels: list[str] = []
        for s in splits:
            for label in hist[s]:
                if str(label) not in labels:
                    labels.append(str(label))
        labels.sort()
        totals = {s: sum(v for v in hist[s].values() if _num(v) is not None) for s in splits}
        rows = []
        for label in labels:
            row: list[Any] = [label]
            for s in splits:
                n = {str(k): v for k, v in hist[s].items()}.get(label)
                share = f" ({n / totals[s]:.1%})" if _num(n) is not None and totals[s] else ""
                row.append(f"{fmt(n) if n is not None else 0}{share}")
            rows.append(row)
        out += ["### Label histogram", "", *table(["label", *splits], rows), ""]

    dups = m.get("duplicates")
    dedup = m.get("dedup")
    if isinstance(dups, dict) or isinstance(dedup, dict):
        out += ["### Duplicates across splits", ""]
        if isinstance(dups, dict):
            rows = []
            for kind, info in dups.items():
                if not isinstance(info, dict):
                    rows.append([kind, fmt(info), ""])
                    continue
                extra = f"threshold {fmt(info['threshold'])}" if "threshold" in info else ""
                rows.append([kind, fmt(info.get("count")), extra])
            out += [*table(["kind", "pairs found", "note"], rows), ""]
            for kind, info in dups.items():
                pairs = info.get("pairs") if isinstance(info, dict) else None
                if isinstance(pairs, list) and pairs:
                    shown = ", ".join(f"`{json.dumps(p, sort_keys=True)}`" for p in pairs[:5])
                    more = f" … and {len(pairs) - 5} more" if len(pairs) > 5 else ""
                    out += [f"- {kind} examples: {shown}{more}"]
            out.append("")
        if isinstance(dedup, dict):
            enabled = dedup.get("enabled")
            removed = dedup.get("removed_from_train")
            out += [f"Dedup enabled: {fmt(enabled)}; removed from train: {fmt(removed)}.", ""]

    other = [(k, m[k]) for k in ("seed", "ratios") if k in m]
    if other:
        out += [", ".join(f"{k}: `{json.dumps(v)}`" for k, v in other), ""]
    return out


def _test_lines(data: RunData) -> list[str]:
    out = ["## Test split", ""]
    if data.test_metrics is None and not data.test_looks_present:
        note = f" ({data.test_metrics_error})" if data.test_metrics_error else ""
        return [*out, f"Test split not evaluated yet — run `honelm test {data.run_dir}`{note}.", ""]

    if data.test_metrics is not None:
        rows = [
            [k, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else fmt(v)]
            for k, v in data.test_metrics.items()
        ]
        out += ["### Test metrics", "", *table(["metric", "value"], rows), ""]
    elif data.test_metrics_error:
        out += [data.test_metrics_error, ""]

    out += ["### Record of test looks", ""]
    if not data.test_looks_present:
        out += ["No `test_looks.jsonl`: there is no record of how often the test split was looked at.", ""]
        return out
    looks = data.test_looks
    if looks:
        rows = []
        for i, look in enumerate(looks, start=1):
            metrics = look.get("metrics")
            shown = (
                ", ".join(f"{k}={fmt(v)}" for k, v in metrics.items() if not isinstance(v, (dict, list)))
                if isinstance(metrics, dict)
                else "—"
            )
            rows.append([i, fmt_time(look.get("time")), fmt(look.get("forced")), shown])
        out += [*table(["#", "time", "forced", "metrics"], rows), ""]
    n = len(looks)
    forced = sum(1 for look in looks if look.get("forced") is True)
    if n == 1:
        out.append("The test split was looked at once.")
    elif n > 1:
        out.append(
            f"**The test split was looked at {n} times** ({forced} forced). Only the first look is an "
            "unbiased estimate; later numbers may reflect choices made after seeing earlier ones."
        )
    else:
        out.append("`test_looks.jsonl` is empty.")
    if data.bad_look_lines:
        out.append(f"Unreadable lines in test_looks.jsonl skipped: {data.bad_look_lines}.")
    return [*out, ""]


def _predictions_heading(data: RunData) -> str:
    if data.predictions_split == "test":
        return "test split"
    best = data.best_json.get("step") if data.best_json else None
    return "validation split, best checkpoint" + (f" (step {fmt(best)})" if best is not None else "")


def _predictions_section(data: RunData, plots: Path, written: set[str]) -> list[str]:
    """Confusion matrix + calibration (classification) or predicted-vs-gold (regression); plots into `plots`.

    Returns no lines for runs without predictions files and without problems reading them
    (stages other than classify, or classify runs from before these files existed).
    """
    from honelm import metrics as M  # torch comes with it: imported only when there is something to score

    rows = data.predictions
    if rows is None:
        if not data.predictions_errors:
            return []
        return ["## Predictions", "", *[f"> {e}" for e in data.predictions_errors], ""]

    split = _predictions_heading(data)
    n = len(rows)
    notes = [f"> {e}" for e in data.predictions_errors] + ([f"> {data.labels_error}"] if data.labels_error else [])
    source = f"From `{data.predictions_file}` ({n} examples)."
    if data.predictions_split == "validation":
        source += (" The run has not been tested; validation predictions were used to choose this checkpoint, "
                   "so they are optimistic.")

    if not P.is_classification(rows):
        out = [f"## Regression predictions ({split})", "", *notes, *([""] if notes else []), source, ""]
        gold = [float(r["gold"]) for r in rows]
        pred = [float(r["pred"]) for r in rows]
        plot_pred_vs_gold(plots / "pred_vs_gold.png", gold, pred, split)
        written.add("pred_vs_gold.png")
        mae = sum(abs(g - p) for g, p in zip(gold, pred)) / n
        return [*out, "![predicted vs gold](plots/pred_vs_gold.png)", "", f"Mean absolute error: {fmt(mae)}.", ""]

    gold_ids = [int(r["gold"]) for r in rows]
    pred_ids = [int(r["pred"]) for r in rows]
    n_labels = max([len(r["probs"]) for r in rows] + [i + 1 for i in gold_ids + pred_ids]
                   + [i + 1 for i in (data.labels or {})])
    names = [(data.labels or {}).get(i, str(i)) for i in range(n_labels)]
    correct = [g == p for g, p in zip(gold_ids, pred_ids)]
    accuracy = sum(correct) / n

    out = [f"## Classification quality ({split})", "", *notes, *([""] if notes else []),
           f"{source} Accuracy {fmt(accuracy)}.", ""]
    if data.labels is None:
        out += ["No `labels.json` in this run: classes are shown by id.", ""]

    counts = M.confusion_matrix(gold_ids, pred_ids, n_labels)
    plot_confusion(plots / "confusion.png", counts, names, split)
    written.add("confusion.png")
    table_rows = [[names[g], *row, sum(row), f"{row[g] / sum(row):.1%}" if sum(row) else "—"]
                  for g, row in enumerate(counts)]
    out += ["### Confusion matrix", "", "![confusion matrix](plots/confusion.png)", "",
            "Rows are gold labels, columns predicted labels; recall is the diagonal share of each row.", "",
            *table(["gold \\ predicted", *names, "total", "recall"], table_rows), ""]

    confidence = [max(r["probs"]) for r in rows]
    bins = M.calibration_bins(confidence, correct)
    ece = M.expected_calibration_error(confidence, correct)
    plot_calibration(plots / "calibration.png", bins, ece, split)
    written.add("calibration.png")
    bin_rows = [[f"({b.lower:.1f}, {b.upper:.1f}]", b.count, fmt(b.accuracy), fmt(b.confidence)] for b in bins]
    out += ["### Calibration", "", "![reliability diagram](plots/calibration.png)", "",
            f"**Expected calibration error (ECE): {ece:.4f}** — confidence is the highest class probability; "
            f"examples fall into {len(bins)} equal-width bins (0, 0.1], …, (0.9, 1], and "
            "`ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|`. 0 is perfectly calibrated.", "",
            *table(["confidence bin", "examples", "accuracy", "mean confidence"], bin_rows), ""]
    return out


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def write_report(run_dir: str | Path) -> Path:
    """Write `RUN/report.md`, its self-contained twin `RUN/report.html` and `RUN/plots/*.png`; return the md path.

    Plots with no data are not written (and a stale copy from an earlier report is removed, so
    the directory never shows a plot the report does not describe). The HTML sits beside the
    markdown: `report_path.with_suffix(".html")`.
    """
    data = load_run(run_dir)
    root = data.run_dir
    plots = root / "plots"
    plots.mkdir(exist_ok=True)

    train_loss = series(data.events, "train", "loss")
    lr = series(data.events, "train", "lr")
    val_loss = series(data.events, "eval", "val_loss")
    val_metrics = {name: series(data.events, "eval", name) for name in val_metric_names(data.events)}
    n_evals = len({_step(e) for e in data.of("eval")})
    best = find_best(data)
    overfit = find_overfit(val_loss, train_loss)

    written: set[str] = set()
    if train_loss or val_loss:
        plot_loss(plots / "loss.png", train_loss, val_loss, best.step if best else None, overfit)
        written.add("loss.png")
    if lr:
        plot_lr(plots / "lr.png", lr)
        written.add("lr.png")
    if val_metrics:
        plot_val_metrics(plots / "val_metrics.png", val_metrics)
        written.add("val_metrics.png")
    rollouts = {k: pts for k in ROLLOUT_KEYS if (pts := series(data.events, "rollout", k))}
    if rollouts:
        plot_val_metrics(plots / "rollouts.png", rollouts, "PPO rollouts vs step (per-sequence means)")
        written.add("rollouts.png")
    updates = {k: pts for k in PPO_TRAIN_KEYS if (pts := series(data.events, "train", k))} if rollouts else {}
    if updates:
        plot_val_metrics(plots / "ppo.png", updates, "PPO updates vs step (per response token)")
        written.add("ppo.png")
    predictions_lines = _predictions_section(data, plots, written)  # adds its plots to `written`
    for name in PLOT_NAMES:
        if name not in written:
            (plots / name).unlink(missing_ok=True)

    stage = _stage(data.config)
    title = f"# Run report: {root.name}" + (f" (stage: {stage})" if stage else "")
    lines: list[str] = [title, ""]
    if data.config_error:
        lines += [f"> {data.config_error}", ""]
    if not data.events:
        lines += ["> No events in `metrics.jsonl` (missing or empty).", ""]
    if data.bad_metric_lines:
        bad = data.bad_metric_lines
        lines += [f"> Skipped {len(bad)} unreadable line(s) in metrics.jsonl: {bad[:20]}.", ""]

    lines += _summary(data, best, train_loss, n_evals)

    lines += ["## Training curves", ""]
    if "loss.png" in written:
        lines += ["![loss](plots/loss.png)", ""]
    else:
        lines += ["No loss values logged.", ""]
    lines += _overfit_lines(overfit, len(val_loss))
    if "lr.png" in written:
        lines += ["![learning rate](plots/lr.png)", ""]
    if "val_metrics.png" in written:
        lines += ["![validation metrics](plots/val_metrics.png)", ""]
        last_eval = {name: pts[-1] for name, pts in val_metrics.items()}
        rows = [[name, fmt(v), s] for name, (s, v) in last_eval.items()]
        lines += ["Last value of each validation metric:", "", *table(["metric", "value", "step"], rows), ""]

    if rollouts:
        lines += ["## PPO rollouts", "",
                  "Each rollout samples responses at the training temperature; `score` is the reward model's, "
                  "`kl` the summed per-token KL to the reference, `rlhf_reward` = score − kl_coef·kl, `ended` the "
                  "fraction of responses that emitted EOS.", "", "![PPO rollouts](plots/rollouts.png)", ""]
        if "ppo.png" in written:
            lines += ["![PPO updates](plots/ppo.png)", ""]
        rows = [[k, fmt(pts[0][1]), fmt(pts[-1][1]), pts[-1][0]] for k, pts in {**rollouts, **updates}.items()]
        lines += [*table(["statistic", "first", "last", "last step"], rows), ""]

    infos = [e for e in data.of("info") if e.get("message")]
    if infos:
        lines += ["## Notes from the run", ""]
        lines += [f"- step {fmt(_step(e))}: {str(e['message']).strip()}" for e in infos]
        lines.append("")

    lines += _manifest_lines(data)
    lines += _test_lines(data)
    lines += predictions_lines

    lines += ["## Config", ""]
    if data.config_text is not None:
        lines += [*fenced(data.config_text, "yaml"), ""]
    else:
        lines += ["No `config.yaml` in this run.", ""]

    report = root / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    write_html(report)
    return report
