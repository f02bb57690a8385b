"""`honelm report DIR` for the three kinds of directory: a run, a search, an ablation.

A run's report is honelm.protocol.report's. A search's shows the space, every trial (value,
state, parameters), the best trial and its config, and Optuna's plots; an ablation's shows the
table a reader came for (mean ± std, difference from baseline with its interval, verdict, cost),
the chart with intervals, each cell, and each variant's chosen hyperparameters. Both are written
as report.md and a self-contained report.html, built only from the files the search or
ablation leaves behind (so they can be rewritten at any time, also for an unfinished one).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from honelm.protocol.report import fenced, fmt, table, write_report


def kind_of(path: Path) -> str:
    if (path / "search.json").is_file():
        return "search"
    if (path / "ablation.json").is_file():
        return "ablation"
    return "run"


def write_any(path: str | Path) -> Path:
    """Write the report of a run, search or ablation directory; returns report.md's path."""
    path = Path(path)
    if not path.is_dir():
        from honelm.errors import HonelmError

        raise HonelmError(f"{path}: no such run, search or ablation directory")
    kind = kind_of(path)
    if kind == "search":
        return write_search_report(path)
    if kind == "ablation":
        return write_ablation_report(path)
    return write_report(path)


def _finish(path: Path, lines: list[str]) -> Path:
    report = path / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    from honelm.protocol.report import write_html

    write_html(report)
    return report


def fmt_duration(seconds: float) -> str:
    """12.3 s, 4m 05s, 2h 03m: short enough for a table cell."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return fmt(value)


def write_search_report(path: Path) -> Path:
    from honelm.protocol.search import iter_trials

    meta = json.loads((path / "search.json").read_text(encoding="utf-8"))
    rows = list(iter_trials(path))
    best = json.loads((path / "best.json").read_text(encoding="utf-8")) if (path / "best.json").is_file() else None
    lines = [f"# Search report: {path.name}", "",
             f"`honelm {meta['verb']}`" + (f" from `{meta['config']}`" if meta.get("config") else "")
             + f", scored by **{meta['metric']}** ({meta['direction']}) on the validation split; "
             f"{meta['sampler']} sampler, {meta['pruner']} pruner, storage {meta['storage']}.", "",
             "The test split was sealed during the whole search (`forbid_test_split`): no trial could read it. "
             "Test the selected trial once with `honelm test " + str(path) + "`.", ""]
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    lines += [f"Trials: {len(rows)} ({', '.join(f'{n} {s}' for s, n in sorted(states.items())) or 'none'}); "
              f"target {meta['n_trials']} finished.", ""]
    lines += ["## Space", "", *table(["key", "values"], [[k, v] for k, v in meta["space"].items()]), ""]
    if meta.get("set"):
        lines += ["Fixed settings: " + ", ".join(f"`{k}={v}`" for k, v in meta["set"].items()), ""]
    lines += ["## Best trial", ""]
    if best:
        lines += [f"Trial {best['trial']}: **{best['metric']} = {best['value']:.4f}**, run `{best['run_dir']}` "
                  "(its `best/` is the search's best checkpoint; `best` links to it).", "",
                  *table(["parameter", "value"], [[k, _fmt_value(v)] for k, v in best["params"].items()]), ""]
    else:
        lines += ["No complete trial yet.", ""]
    lines += ["## Plots", ""]
    skipped = {}
    if (path / "plots" / "skipped.json").is_file():
        skipped = json.loads((path / "plots" / "skipped.json").read_text(encoding="utf-8"))
    for name, title in (("history", "optimisation history"), ("importances", "parameter importances"),
                        ("parallel", "parallel coordinates")):
        if (path / "plots" / f"{name}.png").is_file():
            lines += [f"![{title}](plots/{name}.png)", ""]
        elif name in skipped:
            lines += [f"- {title}: not drawn ({skipped[name]})", ""]
    lines += ["## Trials", ""]
    params = list(dict.fromkeys(k for r in rows for k in r if k.startswith("params.")))
    header = ["#", "state", meta["metric"], *[k[len('params.'):] for k in params], "last step", "time"]
    body = []
    for r in rows:
        note = f" (retry of {r['retry_of']})" if r.get("retry_of") is not None else ""
        body.append([r["number"], r["state"] + note, _fmt_value(r["value"]) if r["value"] is not None else "—",
                     *[_fmt_value(r.get(k)) for k in params], fmt(r.get("last_step")),
                     fmt_duration(r["time_s"]) if r.get("time_s") is not None else "—"])
    lines += table(header, body) + [""]
    errors = [(r["number"], r["error"]) for r in rows if r.get("error")]
    if errors:
        lines += ["Failed trials:", "", *[f"- trial {n}: {e}" for n, e in errors], ""]
    if best and (path / "best.yaml").is_file():
        lines += ["## Best config", "", "`best.yaml`, ready for `honelm " + meta["verb"] + " --config "
                  + str(path / "best.yaml") + "`:", "", *fenced((path / "best.yaml").read_text(encoding="utf-8"), "yaml"), ""]
    return _finish(path, lines)


def _pm(mean: Any, std: Any) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


def write_ablation_report(path: Path) -> Path:
    meta = json.loads((path / "ablation.json").read_text(encoding="utf-8"))
    metric = meta["metric"]
    conf = int(round(meta["confidence"] * 100))
    lines = [f"# Ablation report: {path.name}", "",
             f"{len(meta['variants'])} variants × {len(meta['seeds'])} seeds ({', '.join(map(str, meta['seeds']))}); "
             + ("each variant got the same hyperparameter search on validation "
                f"({(meta['search'] or {}).get('n_trials', 10)} trials)" if meta.get("search") else "fixed hyperparameters")
             + f". Every cell's selected checkpoint was tested once. Δ is the difference from baseline in test "
             f"{metric} (mean over seeds); the interval is a {conf}% paired bootstrap over test examples and seed pairs "
             f"({meta['bootstrap']} resamples). Verdict: the interval above zero → helps, below → hurts, "
             "containing zero → no evidence.", ""]
    results_path = path / "results.json"
    newest_cell = max((c.stat().st_mtime for c in (path / "cells").glob("*/seed-*/cell.json")), default=None)
    if newest_cell is not None and (not results_path.is_file() or results_path.stat().st_mtime < newest_cell):
        from honelm.protocol.ablate import results_from_cells

        results_from_cells(path)  # stopped midway (or by an older honelm): the results of the cells on disk
    if not results_path.is_file():
        lines += ["No results yet: run `honelm ablate " + meta["file"] + "` to finish the cells.", ""]
        return _finish(path, lines)
    results = json.loads(results_path.read_text(encoding="utf-8"))
    rows = results["rows"]
    if not results.get("complete", True):
        lines += [f"> **Unfinished:** {results['cells_done']} of {results['cells_planned']} cells done. Variants with "
                  "fewer seeds than planned are marked; their intervals pair only the seeds the baseline has too, "
                  f"and every number here can still change. Run `honelm ablate {meta['file']}` to continue.", ""]
    n_seeds = len(meta["seeds"])
    body = []
    for r in rows:
        name = r["variant"] if r.get("complete", True) else f"{r['variant']} ({len(r['seeds'])}/{n_seeds} seeds)"
        ci = "—" if r.get("low") is None else f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
        body.append([name, _pm(r["mean"], r["std"]), ci, f"**{r['verdict']}**" if r["variant"] != "baseline" else "—",
                     fmt_duration(r["train_time_s"]) if r.get("train_time_s") is not None else "—",
                     f"{r['peak_memory_mb']:,.0f} MiB" if r.get("peak_memory_mb") else "—",
                     f"{r['trainable_params']:,}" if r.get("trainable_params") else "—"])
    lines += ["## Results", "", *table(["variant", f"test {metric} (mean ± std)", f"Δ vs baseline [{conf}% CI]",
                                        "verdict", "train time", "peak memory", "trainable params"], body), ""]
    if (path / "plots" / "ablation.png").is_file():
        lines += ["![ablation](plots/ablation.png)", ""]
    others = sorted({k[:-5] for r in rows for k in r if k.startswith("test_") and k.endswith("_mean")})
    if others:
        lines += ["## Every test metric (mean ± std over seeds)", "",
                  *table(["variant", *others], [[r["variant"], *[_pm(r.get(f"{m}_mean"), r.get(f"{m}_std")) for m in others]]
                                                for r in rows]), ""]
    chosen = [r for r in rows if r.get("settings")]
    if chosen:
        lines += ["## Hyperparameters chosen on validation", "",
                  *table(["variant", "values"], [[r["variant"], ", ".join(f"`{k}={_fmt_value(v)}`" for k, v in r["settings"].items())]
                                                 for r in chosen]), ""]
    lines += ["## Cells", ""]
    cell_rows = []
    for cell in sorted((path / "cells").glob("*/seed-*/cell.json")):
        c = json.loads(cell.read_text(encoding="utf-8"))
        cell_rows.append([c["variant"], c["seed"], _fmt_value(c["test"].get(f"test_{metric}")), f"`{c['run_dir']}`",
                          fmt_duration(c["train_time_s"])])
    lines += table(["variant", "seed", f"test {metric}", "run", "train time"], cell_rows) + [""]
    return _finish(path, lines)


def main(argv: list[str]) -> Path:
    """`honelm report DIR`."""
    p = argparse.ArgumentParser(prog="honelm report", description="Write DIR/report.md and a self-contained "
                                "DIR/report.html (plots embedded) for a run, a search or an ablation directory.")
    p.add_argument("run", help="run, search or ablation directory")
    args = p.parse_args(argv)
    path = write_any(args.run)
    print(path)
    print(path.with_suffix(".html"))
    return path
