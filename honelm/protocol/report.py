"""The run report: `RUN/report.md`, `RUN/report.html`, `RUN/plots/*.png`, built only from the files a run leaves.

This module lays the report out: the summary, the training curves with the best step and where
overfitting starts, the split manifest, the test looks, the config, and the sections the stages
contribute (`Stage.report_sections`, honelm.stages.contract.ReportSection: PPO's rollouts, classify's
confusion matrix and calibration), each of which decides from the run's files whether it has
anything to show. `write_report` is a pure function of those files: running it twice gives
byte-identical report.md (and report.html).

`write_html` / `md_to_html` (from honelm.html_report, re-exported here) turn any
honelm markdown report into a self-contained HTML file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from honelm import registry
from honelm.protocol import ledger as L
from honelm.stages.contract import ReportSection
from honelm.html_report import md_to_html, write_html
from honelm.reporting import (OVERFIT_REL_RISE, PLOT_NAMES, TRAIN_TREND_WINDOW, Best, Overfit, RunData, event_step, fenced, find_best,
                              find_overfit, fmt, fmt_duration, fmt_time, load_run, plot_loss, plot_lr, plot_val_metrics,
                              num, series, table, val_metric_names)

__all__ = ["write_report", "load_run", "write_html", "md_to_html", "find_overfit", "series"]


def stage_sections() -> list[ReportSection]:
    """Every section the registered stages contribute, in registry order, each once (stages may share one:
    distill and prompt runs write classify's prediction files)."""
    found = [s for name in registry.training_verbs() for s in registry.stage(name).report_sections]
    return list(dict.fromkeys(found))


def build_section(section: ReportSection, data: RunData, plots: Path, written: set[str]) -> list[str]:
    """The section's lines (its plots added to `written`), from the function it names."""
    return registry.resolve(section.build)(data, plots, written)


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
    steps = [s for s in (event_step(e) for e in data.events) if s is not None]
    if end is not None and event_step(end) is not None:
        steps_run = str(event_step(end))
    elif steps:
        steps_run = f"{max(steps)} (last logged step; no end event)"
    else:
        steps_run = "—"
    if end is not None and end.get("reason") is not None:
        reason = str(end.get("reason"))
    else:
        reason = "no end event (run incomplete or still running)"

    if end is not None and num(end.get("train_time_s")) is not None:
        train_time = fmt_duration(num(end.get("train_time_s")) or 0.0)
    else:
        times = [t for t in (num(e.get("time")) for e in data.events) if t is not None]
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
        rows.append(["Early stop", f"at step {fmt(event_step(early))} (patience {fmt(early.get('patience'))})"])
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
        total = sum(v for v in counts.values() if num(v) is not None)
        rows = [
            [split, fmt(n), f"{n / total:.1%}" if total and num(n) is not None else "—"]
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
        totals = {s: sum(v for v in hist[s].values() if num(v) is not None) for s in splits}
        rows = []
        for label in labels:
            row: list[Any] = [label]
            for s in splits:
                n = {str(k): v for k, v in hist[s].items()}.get(label)
                share = f" ({n / totals[s]:.1%})" if num(n) is not None and totals[s] else ""
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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _draw_curves(plots: Path, data: RunData, train_loss: list[tuple[int, float]], val_loss: list[tuple[int, float]],
                 val_metrics: dict[str, list[tuple[int, float]]], best: Best | None, overfit: Overfit | None) -> set[str]:
    """The loss, learning-rate and validation-metric plots that have data; returns the names written."""
    written: set[str] = set()
    lr = series(data.events, "train", "lr")
    if train_loss or val_loss:
        plot_loss(plots / "loss.png", train_loss, val_loss, best.step if best else None, overfit)
        written.add("loss.png")
    if lr:
        plot_lr(plots / "lr.png", lr)
        written.add("lr.png")
    if val_metrics:
        plot_val_metrics(plots / "val_metrics.png", val_metrics)
        written.add("val_metrics.png")
    return written


def _title_lines(data: RunData) -> list[str]:
    """The title and the warnings about what could not be read."""
    stage = _stage(data.config)
    lines = [f"# Run report: {data.run_dir.name}" + (f" (stage: {stage})" if stage else ""), ""]
    if data.config_error:
        lines += [f"> {data.config_error}", ""]
    if not data.events:
        lines += ["> No events in `metrics.jsonl` (missing or empty).", ""]
    if data.bad_metric_lines:
        bad = data.bad_metric_lines
        lines += [f"> Skipped {len(bad)} unreadable line(s) in metrics.jsonl: {bad[:20]}.", ""]
    return lines


def _curve_lines(written: set[str], overfit: Overfit | None, n_val_loss: int,
                 val_metrics: dict[str, list[tuple[int, float]]]) -> list[str]:
    lines = ["## Training curves", ""]
    if "loss.png" in written:
        lines += ["![loss](plots/loss.png)", ""]
    else:
        lines += ["No loss values logged.", ""]
    lines += _overfit_lines(overfit, n_val_loss)
    if "lr.png" in written:
        lines += ["![learning rate](plots/lr.png)", ""]
    if "val_metrics.png" in written:
        lines += ["![validation metrics](plots/val_metrics.png)", ""]
        last_eval = {name: pts[-1] for name, pts in val_metrics.items()}
        rows = [[name, fmt(v), s] for name, (s, v) in last_eval.items()]
        lines += ["Last value of each validation metric:", "", *table(["metric", "value", "step"], rows), ""]
    return lines


def _note_lines(data: RunData) -> list[str]:
    infos = [e for e in data.of("info") if e.get("message")]
    if not infos:
        return []
    return ["## Notes from the run", "",
            *(f"- step {fmt(event_step(e))}: {str(e['message']).strip()}" for e in infos), ""]


def _config_lines(data: RunData) -> list[str]:
    if data.config_text is None:
        return ["## Config", "", "No `config.yaml` in this run.", ""]
    return ["## Config", "", *fenced(data.config_text, "yaml"), ""]


def _ledger_lines(data: RunData, ledger: str | Path | None) -> list[str]:
    """The project's test ledger on this run's split (honelm.protocol.ledger): shown once the run was tested, or when
    other runs already looked at its split."""
    test_hash = L.test_hash_of(data.run_dir)
    path = L.ledger_path(data.run_dir, ledger)
    if not data.test_looks_present and not L.looks_on(test_hash, [path]):
        return []
    return L.report_lines(test_hash, [path])


def write_report(run_dir: str | Path, ledger: str | Path | None = None) -> Path:
    """Write `RUN/report.md`, its self-contained twin `RUN/report.html` and `RUN/plots/*.png`; return the md path.
    `ledger`: the test ledger to read (default `ledger.ledger_path(RUN)`).

    Plots with no data are not written (and a stale copy from an earlier report is removed, so
    the directory never shows a plot the report does not describe). The HTML sits beside the
    markdown: `report_path.with_suffix(".html")`.
    """
    data = load_run(run_dir)
    plots = data.run_dir / "plots"
    plots.mkdir(exist_ok=True)

    train_loss = series(data.events, "train", "loss")
    val_loss = series(data.events, "eval", "val_loss")
    val_metrics = {name: series(data.events, "eval", name) for name in val_metric_names(data.events)}
    n_evals = len({event_step(e) for e in data.of("eval")})
    best = find_best(data)
    overfit = find_overfit(val_loss, train_loss)

    written = _draw_curves(plots, data, train_loss, val_loss, val_metrics, best, overfit)
    sections = stage_sections()
    built = {s: build_section(s, data, plots, written) for s in sections}  # each adds its plots to `written`
    for name in PLOT_NAMES + tuple(n for s in sections for n in s.plots):
        if name not in written:
            (plots / name).unlink(missing_ok=True)

    lines = [*_title_lines(data), *_summary(data, best, train_loss, n_evals),
             *_curve_lines(written, overfit, len(val_loss), val_metrics),
             *(line for s in sections if s.place == "curves" for line in built[s]),
             *_note_lines(data), *_manifest_lines(data), *_test_lines(data), *_ledger_lines(data, ledger),
             *(line for s in sections if s.place == "results" for line in built[s]),
             *_config_lines(data)]
    report = data.run_dir / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    write_html(report)
    return report
