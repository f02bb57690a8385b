"""`honelm compare RUN RUN ...`: models side by side on the same sealed test split, quality and cost.

The report that says whether a small model can replace a large one: a teacher, a distilled student
and the same student trained without a teacher (or any classification / regression runs), each
tested once by `honelm test`, in one table.

Quality comes only from each run's one recorded look: `test_metrics.json` (the columns) and
`test_predictions.jsonl` (per-example gold and prediction, honelm.predictions), never from the test
split itself, which nothing here opens. The runs must have been tested on the SAME split: the test
split hash in each `split_manifest.json` (honelm.data.splits: the sorted content hashes of the test
rows, or a supplied test file's sha256) must agree, the label sets (`labels.json`) must agree, and
the gold labels must agree example by example; anything else is refused, naming the run. Each
difference from the reference run (the first, or `--reference NAME`) comes with a paired-bootstrap
interval over the test examples (honelm.protocol.stats). How many looks each run had
(`test_looks.jsonl`) is shown, and how many times, by how many runs, the project's test ledger
(honelm.protocol.ledger; the ledgers of all the compared runs, or `--ledger`) says the split was
looked at: comparing runs on one split is what `compare` is for, so nothing is refused, but the
count is in the report for a reader to weigh.

Costs (parameters, disk size of best/, latency at batch 1, throughput at batch 32, peak memory) are
measured by honelm.protocol.measure on validation rows, never on test rows. A run whose model cannot
be loaded (a prompted baseline with no best/, a stage with no `inference`) is shown with its quality
columns only, and the reason.

The line a person can act on puts the smallest model other than the reference (fewest parameters;
of equals, the one listed first) against the reference: its share of the reference's headline metric
(`--metric`: accuracy, or Pearson r for regression), its share of the parameters and its throughput
ratio, e.g. "student keeps 97.9% of teacher's accuracy (loses 1.9 points) at 1/12 of its parameters
and 9.4× its CPU throughput."

Writes OUT/compare.md (the line, the table, the intervals, how the costs were measured) and
OUT/compare.json (every number), and prints the table and the line.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from honelm.errors import HonelmError
from honelm.predictions import TEST_FILE, is_scores, read_labels, read_records
from honelm.protocol import ledger as L
from honelm.protocol import measure as M
from honelm.protocol import stats
from honelm.protocol.test import looks
from honelm.reporting import read_jsonl, table

QUALITY = {"classification": ("accuracy", "macro_f1"), "regression": ("mse", "pearson")}
HEADLINE = {"classification": "accuracy", "regression": "pearson"}
LABEL = {"accuracy": "accuracy", "macro_f1": "macro-F1", "mse": "MSE", "pearson": "Pearson r"}
POINTS = {"accuracy", "macro_f1"}  # differences of these read as percentage points


@dataclass
class Tested:
    """A run as its recorded test look describes it."""

    name: str
    path: Path
    task: str
    id2label: dict[int, str] | None
    metrics: dict[str, Any]
    gold: list[Any]
    pred: list[Any]
    looks: list[dict[str, Any]]
    manifest: dict[str, Any]

    @property
    def test_hash(self) -> str | None:
        hashes = self.manifest.get("hashes")
        return hashes.get("test") if isinstance(hashes, dict) else None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HonelmError(f"{path}: cannot read it ({e})") from None


def read_tested(name: str, path: Path) -> Tested:
    """The run's look: test_metrics.json, test_predictions.jsonl, labels.json, split_manifest.json, test_looks.jsonl."""
    if not path.is_dir():
        raise HonelmError(f"{path}: no such run directory")
    seen = looks(path)
    if not seen or not (path / "test_metrics.json").is_file():
        raise HonelmError(f"{path}: not tested: run `honelm test {path}` first (the comparison reads only the run's "
                          "one recorded look at its test split)")
    if not (path / TEST_FILE).is_file():
        raise HonelmError(f"{path}: no {TEST_FILE}: `honelm compare` compares classification or regression runs by "
                          "their per-example test predictions")
    try:
        rows = read_records(path / TEST_FILE)
        id2label = read_labels(path)
    except ValueError as e:
        raise HonelmError(str(e)) from None
    if not rows:
        raise HonelmError(f"{path / TEST_FILE}: no predictions")
    if is_scores(rows):
        raise HonelmError(f"{path}: its {TEST_FILE} holds score records (an sft, pretrain, adapt, reward or dpo run), "
                          "not predictions: `honelm compare` compares classification or regression runs; compare "
                          "those stages with `honelm ablate` (verdicts on validation)")
    task = "classification" if id2label is not None else "regression"
    if (task == "classification") != all("probs" in r for r in rows):
        raise HonelmError(f"{path}: labels.json says {task}, but {TEST_FILE} holds the other kind of predictions")
    if not (path / "split_manifest.json").is_file():
        raise HonelmError(f"{path}: no split_manifest.json: nothing proves which test split it was tested on")
    metrics = _json(path / "test_metrics.json")
    tested = Tested(name, path, task, id2label, metrics, [r["gold"] for r in rows], [r["pred"] for r in rows], seen,
                    _json(path / "split_manifest.json"))
    if tested.test_hash is None:
        raise HonelmError(f"{path}/split_manifest.json records no test split hash: cannot prove it is the same split")
    if task == "classification" and "test_accuracy" in metrics:  # both files must come from the same look
        from_rows = stats.metric_value("accuracy", np.asarray(tested.gold), np.asarray(tested.pred))
        if abs(from_rows - float(metrics["test_accuracy"])) > 1e-6:  # the metric is a float32 mean
            raise HonelmError(f"{path}: test_metrics.json says accuracy {metrics['test_accuracy']} but {TEST_FILE} "
                              f"gives {from_rows}: the two files are from different looks")
    return tested


def check_comparable(runs: list[Tested]) -> None:
    """Refuse runs that were not tested on the same split with the same labels (naming the run that differs)."""
    first = runs[0]
    for run in runs[1:]:
        if run.task != first.task or run.id2label != first.id2label:
            raise HonelmError(f"{run.path}: its labels ({_labels(run)}) differ from {first.path}'s ({_labels(first)}): "
                              "compared runs must predict the same label set")
        if run.test_hash != first.test_hash:
            raise HonelmError(
                f"{run.path}: its test split differs from {first.path}'s (test hash {str(run.test_hash)[:12]}… from "
                f"{_source(run)} vs {str(first.test_hash)[:12]}… from {_source(first)}): the comparison needs the SAME "
                "sealed test split (same data and data.split / data.seed / data.test settings)")
        if len(run.gold) != len(first.gold):
            raise HonelmError(f"{run.path}: {len(run.gold)} test predictions, {first.path} has {len(first.gold)}")
        wrong = next((i for i, (a, b) in enumerate(zip(run.gold, first.gold)) if a != b), None)
        if wrong is not None:
            raise HonelmError(f"{run.path}: test example {wrong} has gold {run.gold[wrong]!r}, {first.path} has "
                              f"{first.gold[wrong]!r}: the predictions are not of the same examples in the same order")


def _labels(run: Tested) -> str:
    return "regression" if run.id2label is None else ", ".join(run.id2label[i] for i in sorted(run.id2label))


def _source(run: Tested) -> str:
    source = run.manifest.get("test_source")
    if source and source != "ratio":
        return str(source)
    ratios = ":".join(f"{r:g}" for r in run.manifest.get("ratios") or [])
    return f"the test part of a {ratios} ratio split, seed {run.manifest.get('seed')}"


def quality(runs: list[Tested], reference: Tested, n_resamples: int, confidence: float) -> dict[str, dict[str, Any]]:
    """Per run and metric: its test value (test_metrics.json) and, except for the reference, the paired-bootstrap
    interval of its difference from the reference over the same test examples."""
    gold = np.asarray(reference.gold)
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        out[run.name] = {}
        for metric in QUALITY[run.task]:
            value = run.metrics.get(f"test_{metric}")
            if value is None:  # an older look without this metric: the predictions give it
                value = stats.metric_value(metric, gold, np.asarray(run.pred))
            entry: dict[str, Any] = {"value": float(value)}
            if run is not reference:
                ci = stats.paired_bootstrap(metric, gold, [run.pred], [reference.pred], n_resamples, confidence)
                entry.update(diff=ci.diff, low=ci.low, high=ci.high, confidence=ci.confidence,
                             n_resamples=ci.n_resamples, n_examples=ci.n_examples,
                             verdict=_verdict(ci, metric not in stats.LOWER_IS_BETTER))
            out[run.name][metric] = entry
    return out


def _verdict(ci: stats.Interval, higher_is_better: bool) -> str:
    said = stats.verdict(ci.low, ci.high, higher_is_better)
    return {"helps": "better", "hurts": "worse"}.get(said, "no evidence of a difference")


# ----------------------------------------------------------------------------------------------
# the line a person can act on


@dataclass(frozen=True)
class Side:
    """One model in the summary line: its name, headline metric value, parameters and throughput (None: unknown)."""

    name: str
    value: float
    parameters: int | None = None
    throughput: float | None = None


def _fraction(ratio: float, what: str, same: str) -> str:
    """0.083 → "1/12 of its parameters"; 9.4 → "9.4× its parameters"; within 5% of 1 → `same` (1.0×)."""
    if abs(ratio - 1) < 0.05:
        return f"{same} (1.0×)"
    if ratio >= 1:
        return f"{ratio:.1f}× its {what}"
    inverse = 1 / ratio
    shown = f"{inverse:.0f}" if inverse >= 10 else f"{inverse:.1f}".removesuffix(".0")
    return f"1/{shown} of its {what}"


def _amount(metric: str, diff: float) -> str:
    return f"{abs(diff) * 100:.1f} points" if metric in POINTS else f"{abs(diff):.3g}"


def _quality_phrase(subject: Side, reference: Side, metric: str) -> str:
    label = LABEL.get(metric, metric)
    diff = subject.value - reference.value
    better = diff < 0 if metric in stats.LOWER_IS_BETTER else diff > 0
    if diff == 0:
        return f"{subject.name} matches {reference.name}'s {label}"
    if metric in stats.LOWER_IS_BETTER:
        ratio = f" ({subject.value / reference.value:.2f}× it)" if reference.value else ""
        return f"{subject.name} {'beats' if better else 'loses to'} {reference.name}'s {label} by {_amount(metric, diff)}{ratio}"
    if not reference.value or reference.value < 0:  # a share of zero or of a negative correlation means nothing
        return f"{subject.name} {'gains' if better else 'loses'} {_amount(metric, diff)} of {label} against {reference.name}"
    share = 100 * subject.value / reference.value
    if better:
        return f"{subject.name} reaches {share:.1f}% of {reference.name}'s {label} (gains {_amount(metric, diff)})"
    return f"{subject.name} keeps {share:.1f}% of {reference.name}'s {label} (loses {_amount(metric, diff)})"


def summary_line(subject: Side, reference: Side, metric: str, device: str = "CPU") -> str:
    """e.g. "student keeps 97.9% of teacher's accuracy (loses 2.0 points) at 1/12 of its parameters and 9.4× its
    CPU throughput." Clauses whose numbers are unknown are left out."""
    costs = []
    if subject.parameters and reference.parameters:
        costs.append(_fraction(subject.parameters / reference.parameters, "parameters", "as many parameters"))
    if subject.throughput and reference.throughput and math.isfinite(subject.throughput / reference.throughput):
        costs.append(_fraction(subject.throughput / reference.throughput, f"{device} throughput",
                               f"the same {device} throughput"))
    line = _quality_phrase(subject, reference, metric)
    return line + (" at " + " and ".join(costs) if costs else "") + "."


def pick_subject(runs: list[Tested], reference: Tested, costs: dict[str, dict[str, Any]]) -> Tested:
    """The smallest model other than the reference (fewest parameters; the first other run when none is known)."""
    others = [r for r in runs if r is not reference]
    sized = [r for r in others if costs[r.name].get("parameters")]
    return min(sized, key=lambda r: costs[r.name]["parameters"]) if sized else others[0]


# ----------------------------------------------------------------------------------------------
# costs


def _logged_parameters(run_dir: Path) -> int | None:
    """total_params of the run's last `end` event (for a model that could not be loaded here)."""
    events, _ = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else ([], [])
    ends = [e for e in events if e.get("event") == "end" and e.get("total_params")]
    return int(ends[-1]["total_params"]) if ends else None


def _open_all(runs: list[Tested], device: torch.device, say: Callable[[str], None]
              ) -> tuple[dict[str, M.Opened], dict[str, dict[str, Any]]]:
    """Open every run whose model can be opened; the others get the reason in their costs."""
    opened: dict[str, M.Opened] = {}
    costs: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry: dict[str, Any] = {"not_measured": None, "disk": _disk_of(run)}
        try:
            opened[run.name] = M.open_run(run.name, run.path, device)
        except Exception as e:  # noqa: BLE001 - any failure to open a model leaves its quality columns standing
            entry["not_measured"] = _reason(e)
            say(f"{run.name}: costs not measured ({entry['not_measured']})")
        costs[run.name] = entry
    return opened, costs


def _disk_of(run: Tested) -> dict[str, Any]:
    try:
        return M.disk_size(run.path)
    except HonelmError as e:  # an adapter whose base has moved: its size is unknown, the rest stands
        return {"kind": "unknown", "bytes": None, "reason": str(e)}


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, (HonelmError, NotImplementedError)) else f"{type(e).__name__}: {e}"


def measure_costs(runs: list[Tested], reference: Tested, budget: M.Budget, device: torch.device, threads: int,
                  memory: bool, say: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Parameters, disk, latency, throughput and peak memory of every run that can be loaded; and how."""
    opened, costs = _open_all(runs, device, say)
    if not opened:
        return _with_logged(runs, costs), {"inputs": None}
    source = opened.get(reference.name) or next(iter(opened.values()))
    rows = M.timing_rows(source, budget)
    loaded = []
    for run in runs:
        if run.name not in opened:
            continue
        say(f"loading {run.name} ({run.path / 'best'})")
        try:
            M.load(opened[run.name], rows, budget)
        except Exception as e:  # noqa: BLE001 - as above: shown with its reason, quality only
            costs[run.name]["not_measured"] = _reason(e)
            say(f"{run.name}: costs not measured ({costs[run.name]['not_measured']})")
            continue
        costs[run.name]["parameters"] = M.parameters(opened[run.name].model)  # type: ignore[arg-type]
        costs[run.name]["parameters_source"] = "model"
        loaded.append(opened[run.name])
    if loaded:
        for name, timed in M.time_models(loaded, budget, device, say).items():
            costs[name].update(timed)
    for item in loaded:  # timed: this process needs the models no more, the memory probes' processes do
        item.model = item.inference = None
        item.single, item.large = [], []
    for item in loaded if memory else []:
        say(f"peak memory of {item.name}: a fresh process loads and runs it")
        try:
            found = M.peak_memory(item.ctx.run_dir, device, threads, rows, budget)
        except Exception as e:  # noqa: BLE001 - the other numbers stand without it
            costs[item.name]["memory"] = {"reason": _reason(e)}
            say(f"{item.name}: peak memory not measured ({_reason(e)})")
            continue
        costs[item.name]["memory"] = found
        say(f"{item.name}: peak RSS {found.get('peak_rss_mb')} MB (+{found.get('model_rss_mb')} MB over the process "
            "before loading)")
    inputs = (f"{len(rows)} rows of the {'validation' if source.ctx.splits.val else 'train'} split of "
              f"{source.name} (never test rows), each model encoding them with its own tokenizer")
    return _with_logged(runs, costs), {"inputs": inputs, "timing_run": source.name}


def _with_logged(runs: list[Tested], costs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    for run in runs:
        if costs[run.name].get("parameters") is None and (logged := _logged_parameters(run.path)) is not None:
            costs[run.name].update(parameters=logged, parameters_source="run log (end event)")
    return costs


# ----------------------------------------------------------------------------------------------
# the report


def _params(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} MB"


def _disk(disk: dict[str, Any] | None) -> str:
    if not disk or disk.get("kind") in ("none", "unknown"):
        return "—"
    if disk["kind"] == "adapter":
        base = _mb(disk["base_bytes"]) if disk.get("base_bytes") is not None else f"{disk['base']} (not on local disk)"
        return f"{_mb(disk['adapter_bytes'])} adapter + {base} base"
    if disk["kind"] == "recorded":
        return f"{_mb(disk['bytes'])} (the recorded model)"
    return _mb(disk["bytes"])


def _signed(metric: str, x: float) -> str:
    return f"{x * 100:+.1f}" if metric in POINTS else f"{x:+.4g}"


def _delta(metric: str, entry: dict[str, Any]) -> str:
    if "diff" not in entry:
        return "reference"
    unit = " pts" if metric in POINTS else ""
    return f"{_signed(metric, entry['diff'])}{unit} [{_signed(metric, entry['low'])}, {_signed(metric, entry['high'])}]"


def _looks(run: Tested) -> str:
    forced = sum(1 for look in run.looks if look.get("forced"))
    return f"{len(run.looks)} ({forced} forced)" if forced else str(len(run.looks))


def _memory(costs: dict[str, Any]) -> str:
    memory = costs.get("memory")
    if not memory or memory.get("peak_rss_mb") is None:
        return "—"
    added = f" (+{memory['model_rss_mb']:.0f})" if memory.get("model_rss_mb") is not None else ""
    cuda = f", {memory['peak_cuda_mb']:.0f} on GPU" if memory.get("peak_cuda_mb") is not None else ""
    return f"{memory['peak_rss_mb']:.0f}{added}{cuda}"


def main_table(runs: list[Tested], qual: dict[str, dict[str, Any]], costs: dict[str, dict[str, Any]],
               budget: M.Budget) -> list[str]:
    """The table a reader came for: quality with intervals, then costs, one row per run."""
    metrics = QUALITY[runs[0].task]
    header = ["run", "test looks"]
    for metric in metrics:
        header += [LABEL[metric], f"Δ {LABEL[metric]} (95% CI)"]
    header += ["parameters", "disk (weights)", "latency, batch 1 (ms/example)",
               f"throughput, batch {budget.batch_size} (examples/s)", "peak RSS MB (+ model)"]
    rows = []
    for run in runs:
        c = costs[run.name]
        row: list[Any] = [run.name, _looks(run)]
        for metric in metrics:
            row += [f"{qual[run.name][metric]['value']:.4f}", _delta(metric, qual[run.name][metric])]
        row += [_params(c.get("parameters")), _disk(c.get("disk")),
                f"{c['latency_ms']:.3f}" if c.get("latency_ms") is not None else "—",
                f"{c['throughput']:.1f}" if c.get("throughput") is not None else "—", _memory(c)]
        rows.append(row)
    return table(header, rows)


def _intervals(runs: list[Tested], reference: Tested, qual: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"## Differences from {reference.name} (paired bootstrap)", ""]
    rows, any_entry = [], None
    for run in runs:
        for metric in QUALITY[run.task]:
            entry = qual[run.name][metric]
            if "diff" in entry:
                any_entry = entry
                rows.append([f"{run.name} − {reference.name}", LABEL[metric], _signed(metric, entry["diff"]),
                             f"[{_signed(metric, entry['low'])}, {_signed(metric, entry['high'])}]", entry["verdict"]])
    lines += table(["difference", "metric", "observed", "95% interval", "reading"], rows) + [""]
    if any_entry is not None:
        lines += [f"Accuracy and macro-F1 in percentage points. {any_entry['n_resamples']} resamples of the "
                  f"{any_entry['n_examples']} test examples, the same indices for both runs, from each run's "
                  "test_predictions.jsonl (honelm.protocol.stats.paired_bootstrap). An interval that contains zero "
                  "is no evidence of a difference (not evidence of none).", ""]
    return lines


def _method(measured: dict[str, Any], costs: dict[str, dict[str, Any]], budget: M.Budget) -> list[str]:
    lines = ["## How the costs were measured", ""]
    if measured.get("inputs") is None:
        lines += ["No model could be loaded, so no costs were measured."]
    elif measured.get("timed"):
        lines += [
            f"- Where: {measured['device']}, {measured['threads']} torch threads ({measured['cpu']}), torch "
            f"{measured['torch']}, fp32, `torch.inference_mode`.",
            f"- Inputs: {measured['inputs']}; tokenisation is done before the clock starts.",
            f"- All models in one process, in {budget.rounds} rounds; in each round every model in turn runs "
            f"{budget.latency_examples} forward passes at batch 1, then {budget.throughput_batches} at batch "
            f"{budget.batch_size}, the order of the models rotating from round to round so that machine noise hits "
            "all alike (one warm-up forward of each shape first).",
            "- Latency: the median of every batch-1 forward (ms per example). Throughput: the median over rounds of "
            "examples per second at the large batch.",
        ]
    if measured.get("memory"):
        lines += ["- Peak memory: each model in a fresh process of its own, which opens the run (imports, split, "
                  "tokenizer) and loads the model once and frees it (so the model's code is imported), reads its "
                  "resident set, then loads the model again and runs the same forward passes; peak RSS is the kernel's "
                  "high-water mark (VmHWM) of that process, and (+ model) what loading and running the model added "
                  "to the resident set (weights and working memory)."]
    lines += ["- Parameters: every parameter of the loaded model (tied weights once; a LoRA adapter merged into its "
              "base). Disk: the bytes of best/'s weight files (for an adapter: the adapter's, plus its base's)."]
    for name, c in costs.items():
        if (c.get("memory") or {}).get("reason"):
            lines.append(f"- {name}: peak memory not measured: {c['memory']['reason']}")
        if c.get("not_measured"):
            lines.append(f"- {name}: costs not measured: {c['not_measured']}"
                         + (f" (parameters from {c['parameters_source']})" if c.get("parameters_source") else ""))
    return lines + [""]


def report_lines(result: dict[str, Any], runs: list[Tested], reference: Tested, budget: M.Budget) -> list[str]:
    """compare.md: the line, the table, the intervals, the runs and how the costs were measured."""
    qual, costs = result["quality"], result["costs"]
    split = result["test_split"]
    lines = [f"# {len(runs)} models on the same sealed test split", "", f"**{result['summary']}**", "",
             f"Test split: {split['n_examples']} examples ({split['source']}; test hash `{split['hash'][:16]}…`), the "
             "same for every run. Quality is each run's own recorded look (`test_metrics.json`, "
             "`test_predictions.jsonl`); the test split itself was not read.", ""]
    if split.get("ledger"):
        lines += [f"Test ledger: {split['ledger']['line']}.", ""]
    lines += main_table(runs, qual, costs, budget) + [""]
    lines += _intervals(runs, reference, qual)
    lines += ["## Runs", ""]
    lines += table(["run", "directory", "best step", "test looks"],
                   [[r.name, str(r.path), r.metrics.get("best_step"), _looks(r)] for r in runs]) + [""]
    if split.get("ledger"):
        lines += L.report_lines(split["hash"], [Path(p) for p in split["ledger"]["paths"]])
    return lines + _method(result["measurement"], costs, budget)


# ----------------------------------------------------------------------------------------------
# the command


def name_runs(specs: list[str]) -> list[tuple[str, Path]]:
    """RUN or NAME=RUN → (name, path); a bare run is named by its directory (parent/dir when two share a name)."""
    named: list[tuple[str | None, Path]] = []
    for spec in specs:
        head, sep, tail = spec.partition("=")
        named.append((head, Path(tail)) if sep and head and not Path(spec).exists() else (None, Path(spec)))
    base = [n or p.resolve().name for n, p in named]
    out = [(n or (f"{p.resolve().parent.name}/{p.resolve().name}" if base.count(b) > 1 else b), p)
           for (n, p), b in zip(named, base)]
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise HonelmError(f"two runs are named alike ({', '.join(names)}): name them as NAME=RUN")
    return out


def _out_dir(out: str | None) -> Path:
    """--out, or a new runs/compare/<timestamp> with runs/compare/latest pointing at it."""
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = Path("runs/compare")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():  # two comparisons within one second
        n += 1
        path = root / f"{stamp}-{n}"
    path.mkdir(parents=True)
    link = root / "latest"
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(path.name)
    return path


def compare(specs: list[str], reference: str | None = None, metric: str | None = None, budget: M.Budget = M.Budget(),
            device: str = "cpu", threads: int = 0, timing: bool = True, memory: bool = True, bootstrap: int = 2000,
            confidence: float = 0.95, say: Callable[[str], None] = print,
            ledger: str | Path | None = None) -> tuple[dict[str, Any], list[Tested]]:
    """Read, check and measure the runs; returns everything compare.json holds, and the runs as read. The test
    ledger read is `ledger`, else the ledgers of all the runs (honelm.protocol.ledger.ledger_path)."""
    if len(specs) < 2:
        raise HonelmError("compare needs at least two runs")
    runs = [read_tested(name, path) for name, path in name_runs(specs)]
    check_comparable(runs)
    by_name = {r.name: r for r in runs} | {str(r.path): r for r in runs}
    if reference is not None and reference not in by_name:
        raise HonelmError(f"--reference {reference}: not one of the runs ({', '.join(r.name for r in runs)})")
    ref = by_name[reference] if reference is not None else runs[0]
    task = runs[0].task
    metric = metric or HEADLINE[task]
    if metric not in QUALITY[task]:
        raise HonelmError(f"--metric {metric}: {task} runs are compared on {' or '.join(QUALITY[task])}")
    if threads > 0:
        torch.set_num_threads(threads)
    where = M.device_for(device)
    qual = quality(runs, ref, bootstrap, confidence)
    if timing:
        costs, measured = measure_costs(runs, ref, budget, where, threads, memory, say)
    else:
        costs = _with_logged(runs, {r.name: {"not_measured": "--no-timing", "disk": _disk_of(r)} for r in runs})
        measured = {"inputs": None}
    measured.update(timed=timing and measured.get("inputs") is not None, memory=timing and memory, device=str(where),
                    threads=torch.get_num_threads(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                    budget=vars(budget))
    subject = pick_subject(runs, ref, costs)
    word = "GPU" if where.type == "cuda" else "CPU"
    line = summary_line(*(Side(r.name, qual[r.name][metric]["value"], costs[r.name].get("parameters"),
                               costs[r.name].get("throughput")) for r in (subject, ref)), metric, word)
    split = {"hash": ref.test_hash, "n_examples": len(ref.gold), "source": _source(ref),
             "ledger": ledger_count(ref.test_hash, runs, ledger)}
    return {"summary": line, "reference": ref.name, "subject": subject.name, "task": task, "metric": metric,
            "test_split": split, "quality": qual, "costs": costs, "measurement": measured,
            "runs": [{"name": r.name, "path": str(r.path), "looks": len(r.looks),
                      "forced_looks": sum(1 for x in r.looks if x.get("forced")), "best_step": r.metrics.get("best_step"),
                      "test_metrics": r.metrics} for r in runs]}, runs


def ledger_count(test_hash: str | None, runs: list[Tested], ledger: str | Path | None) -> dict[str, Any]:
    """How many looks, by how many runs, the ledgers record on the split: the line, the numbers and the ledgers read."""
    paths = [L.ledger_path(r.path, ledger) for r in runs]
    n = L.count(L.looks_on(test_hash, paths))
    return {"looks": n.looks, "runs": n.runs, "line": n.line(), "paths": [str(p) for p in dict.fromkeys(paths)]}


def _finite(value: Any) -> Any:
    """NaN and infinities (a Pearson r of constant predictions) as null: compare.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str]) -> dict[str, Any]:
    """`honelm compare RUN RUN ... [options]`."""
    p = argparse.ArgumentParser(
        prog="honelm compare",
        description="Put classification or regression runs (a teacher, a distilled student, the same student without "
        "a teacher, ...) side by side on the same sealed test split: each run's test metrics from its one recorded "
        "look (`honelm test RUN` first) with paired-bootstrap intervals of the difference from the reference, "
        "parameters, disk size, latency at batch 1, throughput at a larger batch and peak memory, measured on "
        "validation rows, never test rows. Writes OUT/compare.md and OUT/compare.json.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, tested once; NAME=RUN names one "
                   "(default: its directory name)")
    p.add_argument("--reference", help="the run the others are compared with (a NAME or RUN; default: the first)")
    p.add_argument("--metric", choices=stats.METRICS, help="the metric of the summary line (default: accuracy, or "
                   "pearson for regression); every metric of the task is in the table")
    p.add_argument("--out", help="output directory (default: a new runs/compare/<timestamp>, linked as runs/compare/latest)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where latency, throughput and "
                   "memory are measured (default: cpu; auto: cuda when there is one)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the measurements (default 0: torch's own)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds, the models alternating within each (default 5)")
    p.add_argument("--latency-examples", type=int, default=32, help="batch-1 forwards per model per round (default 32)")
    p.add_argument("--throughput-batches", type=int, default=3, help="large-batch forwards per model per round (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="the large batch of the throughput (default 32)")
    p.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap resamples (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the intervals (default 0.95)")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory (a fresh process per model)")
    p.add_argument("--no-timing", action="store_true", help="quality, disk size and logged parameters only: load and "
                   "time no model")
    p.add_argument("--ledger", default=None, metavar="PATH", help="the project's test ledger to count looks in (default: "
                   "each run's, .honelm/test_ledger.jsonl in the nearest directory above it that has .honelm/, else the "
                   "current directory when the run is inside it, else the run's parent)")
    args = p.parse_args(argv)
    if min(args.rounds, args.latency_examples, args.throughput_batches, args.batch_size) < 1 or args.bootstrap < 100 \
            or not 0.5 <= args.confidence < 1:
        p.error("--rounds, --latency-examples, --throughput-batches, --batch-size must be >= 1, --bootstrap >= 100 "
                "and --confidence in [0.5, 1)")
    budget = M.Budget(args.rounds, args.latency_examples, args.throughput_batches, args.batch_size)
    result, runs = compare(args.runs, args.reference, args.metric, budget, args.device, args.threads, not args.no_timing,
                     not args.no_memory, args.bootstrap, args.confidence,
                     say=lambda line: print(f"compare: {line}", flush=True), ledger=args.ledger)
    out = _out_dir(args.out)
    lines = report_lines(result, runs, next(r for r in runs if r.name == result["reference"]), budget)
    (out / "compare.md").write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(_finite(result), indent=2, default=str), encoding="utf-8")
    print("\n".join(main_table(runs, result["quality"], result["costs"], budget)))
    print(f"\n{result['summary']}\ntest ledger: {result['test_split']['ledger']['line']}"
          f"\n\n{out / 'compare.md'}\n{out / 'compare.json'}")
    return result
