"""classify's part of the run report: confusion matrix and calibration, or predicted-vs-gold for regression.

Built from the per-example predictions (honelm.predictions): the test split's when the run was
tested, else the validation predictions saved with the best checkpoint (optimistic: they chose it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from honelm import metrics as M
from honelm import predictions as P
from honelm.reporting import RunData, fmt, new_figure, save_figure, table

# Beyond this many classes the confusion plot drops its per-cell numbers (unreadable); the table keeps them.
CONFUSION_ANNOTATE_MAX = 20


@dataclass
class Found:
    """The predictions file the report uses, the label names, and what could not be read."""

    rows: list[dict[str, Any]] | None = None
    split: str | None = None  # "test" or "validation"
    file: str | None = None  # relative to the run directory
    errors: list[str] = field(default_factory=list)
    labels: dict[int, str] | None = None
    labels_error: str | None = None


def load_predictions(root: Path) -> Found:
    """The test predictions (the honest ones) or, for a run not tested yet, best/'s validation predictions."""
    found = Found()
    try:
        found.labels = P.read_labels(root)
    except ValueError as exc:
        found.labels_error = str(exc)
    for split, rel in (("test", P.TEST_FILE), ("validation", f"best/{P.VAL_FILE}")):
        path = root / rel
        if not path.is_file():
            continue
        try:
            rows = P.read_records(path)
        except (ValueError, UnicodeDecodeError) as exc:
            found.errors.append(f"`{rel}` could not be used: {exc}")
            continue
        if not rows:
            found.errors.append(f"`{rel}` is empty.")
            continue
        if P.is_scores(rows):  # an LM-distillation run's score records: no labels to draw a confusion matrix of
            continue
        found.rows, found.split, found.file = rows, split, rel
        break
    return found


def plot_confusion(path: Path, counts: list[list[int]], names: list[str], split: str) -> None:
    """Counts heat map, rows = gold, columns = predicted, each cell numbered (up to CONFUSION_ANNOTATE_MAX classes)."""

    n = len(names)
    side = min(max(4.0, 0.55 * n + 2.5), 14.0)
    fig = new_figure(side + 1.0, side)
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
    save_figure(fig, path)


def plot_calibration(path: Path, bins: list[Any], ece: float, split: str) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, counts per bin below."""

    fig = new_figure(6.5, 6.5)
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
    save_figure(fig, path)


def plot_pred_vs_gold(path: Path, gold: list[float], pred: list[float], split: str) -> None:
    """Regression: each example's prediction against its gold value, with the y = x line."""
    fig = new_figure(5.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(gold, pred, s=10, alpha=0.6, color="tab:blue", edgecolors="none")
    lo, hi = min(gold + pred), max(gold + pred)
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="gray", linewidth=1, label="y = x")
    ax.set_xlabel("gold")
    ax.set_ylabel("predicted")
    ax.set_title(f"Predicted vs gold ({split})")
    ax.legend(loc="upper left")
    ax.grid(True, alpha=0.3)
    save_figure(fig, path)


def _heading(found: Found, data: RunData) -> str:
    if found.split == "test":
        return "test split"
    best = data.best_json.get("step") if data.best_json else None
    return "validation split, best checkpoint" + (f" (step {fmt(best)})" if best is not None else "")


def predictions_section(data: RunData, plots: Path, written: set[str]) -> list[str]:
    """Confusion matrix + calibration (classification) or predicted-vs-gold (regression); plots into `plots`.

    Returns no lines for runs without predictions files and without problems reading them
    (stages other than classify, or classify runs from before these files existed).
    """
    found = load_predictions(data.run_dir)
    rows = found.rows
    if rows is None:
        if not found.errors:
            return []
        return ["## Predictions", "", *[f"> {e}" for e in found.errors], ""]

    split = _heading(found, data)
    n = len(rows)
    notes = [f"> {e}" for e in found.errors] + ([f"> {found.labels_error}"] if found.labels_error else [])
    source = f"From `{found.file}` ({n} examples)."
    if found.split == "validation":
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
                   + [i + 1 for i in (found.labels or {})])
    names = [(found.labels or {}).get(i, str(i)) for i in range(n_labels)]
    correct = [g == p for g, p in zip(gold_ids, pred_ids)]
    accuracy = sum(correct) / n

    out = [f"## Classification quality ({split})", "", *notes, *([""] if notes else []),
           f"{source} Accuracy {fmt(accuracy)}.", ""]
    if found.labels is None:
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

