"""`honelm test RUN`: the one and only reader of the test split.

It looks the run's stage up in the registry, rebuilds the run's splits from its saved config
(splits are deterministic by content) with `Stage.splits`, checks that train and validation hash
to what the run recorded, opens the test split inside `unlock_test_split`, and scores the best
checkpoint once with `Stage.test` (by default: load best/, `encode`, `score` with the prefix
"test", the same `score` validation used). It appends the look to `test_looks.jsonl` and to the
ledger FIRST, then writes `test_metrics.json` and the per-example files the stage returns under
"files" (e.g. test predictions; else the score records its scoring kept in `ctx.records("test")`,
as test_predictions.jsonl): a look interrupted after scoring still counts. It holds the run's lock
throughout (honelm.rundir), so two `honelm test` of one run, or a test of a run still training,
cannot both proceed. A second look is refused unless forced; forced looks are recorded as such, so
a report always shows how many times the test set was seen. Every look also goes into the project's test ledger
(honelm.protocol.ledger), keyed by the test split's hash: a look at a split that ANOTHER run has
already looked at is flagged (a warning here, a mark in the ledger, a count in every report),
never refused. Nothing here knows a stage by name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from honelm import config as C
from honelm import registry
from honelm import runtime as rt
from honelm.data.splits import content_text, reuse_manifest, unlock_test_split, verify_manifest
from honelm.errors import HonelmError
from honelm.pins import data_unchanged
from honelm.predictions import TEST_FILE, dumps_records
from honelm.protocol import ledger as L
from honelm.rundir import hold_run, stage_of
from honelm.stages.contract import RunContext, Stage
from honelm.tracking import phase


def looks(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "test_looks.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cross_split_duplicates(manifest: dict[str, Any]) -> dict[str, int]:
    """Exact / near duplicate pairs between the test split and train or validation."""
    out = {}
    for kind in ("exact", "near"):
        by_pair = manifest.get("duplicates", {}).get(kind, {}).get("by_split_pair", {})
        out[kind] = sum(n for pair, n in by_pair.items() if "test" in pair.split("-"))
    return out


def run_test(run_dir: str | Path, force: bool = False, ledger: str | Path | None = None,
             group: str | None = None) -> dict[str, Any]:
    """Evaluate RUN's best model on its test split once; returns the metrics. The look goes into the
    ledger (`ledger`, else `ledger.ledger_path(run_dir)`); `group` names runs whose looks are not
    flagged against each other (the seeds of the one configuration an ablation chose)."""
    run_dir = Path(run_dir)
    stage = stage_of(run_dir)
    with hold_run(run_dir, "honelm test"):
        previous = looks(run_dir)
        if previous and not force:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(previous[-1]["time"]))
            raise HonelmError(f"{run_dir}: the test split was already evaluated ({len(previous)} look(s), last "
                              f"{when}). Choosing anything after seeing test results makes them optimistic; "
                              "if you must look again, pass --force (the look is recorded).")
        if stage not in registry.training_verbs():
            raise HonelmError(f"{run_dir}: `honelm test` does not apply to {stage} runs")
        metrics = _test_stage(registry.stage(stage), run_dir)
        files = metrics.pop("files", {})
        _record(run_dir, previous, metrics)  # the look first: a look cut short after scoring still counts
        path = L.ledger_path(run_dir, ledger)
        manifest = json.loads((run_dir / "split_manifest.json").read_text(encoding="utf-8"))
        entry = L.record_look(path, run_dir, manifest, stage, len(previous) + 1, bool(previous), metrics, group)
        _write_results(run_dir, len(previous) + 1, metrics, files)
    warning = L.warning(entry, path)
    if warning:
        print(warning, flush=True)
    return metrics


def _test_stage(stage: Stage, run_dir: Path) -> dict[str, Any]:
    """Rebuild the split, check it against the manifest, open the test split once and score best/ on it."""
    cfg = C.build(stage.config, run_dir / "config.yaml")
    ctx = RunContext(cfg=cfg, runtime=rt.setup(), run_dir=run_dir)
    stage.check_testable(ctx)
    quiet = lambda _: None  # noqa: E731
    recorded = json.loads((run_dir / "split_manifest.json").read_text(encoding="utf-8"))
    # the recorded split is taken only for data whose bytes are those the run pinned (labels included)
    known = recorded if data_unchanged(run_dir, cfg) else {}
    with reuse_manifest(known) as reuse, phase(say, "reading the data and taking its split"):
        ctx.splits = stage.splits(cfg, quiet)
    verify_manifest(recorded, ctx.splits.manifest)
    say("split: " + ("taken from split_manifest.json (every row's content hash is where the run recorded it; the "
                     "duplicate scan is not repeated)" if reuse.reused else "recomputed and checked against "
                     "split_manifest.json"))
    with unlock_test_split("honelm test"):
        test = ctx.splits.test
    if not test:
        raise HonelmError(f"{run_dir}: the test split is empty (data.split gives it no share and data.test is unset)")
    leakage = None
    if cfg.data.test:  # a user test file: training could not look for duplicates in it, so look now
        undeduped = replace(cfg, data=replace(cfg.data, dedup=False))
        with phase(say, "duplicate scan of the test file against train and validation"):
            checked = stage.splits(undeduped, quiet, leak_texts=[content_text(e) for e in test])
        leakage = cross_split_duplicates(checked.manifest)
    elif "duplicates" in recorded:
        leakage = cross_split_duplicates(recorded)
    ctx.tokenizer = stage.test_tokenizer(ctx)
    with phase(say, f"scoring best/ on {len(test)} test rows"):
        metrics = stage.test(ctx, test)
    records = ctx.extra.get("test_records")  # the per-example score records the stage's scoring kept
    if records:
        metrics.setdefault("files", {}).setdefault(TEST_FILE, dumps_records(records))
    if leakage is not None:
        metrics["test_duplicates_of_train_or_val"] = leakage
    return metrics


def say(line: str) -> None:
    """What `honelm test` tells on the way (phase durations, where the split came from): stderr, beside the metrics."""
    print(line, file=sys.stderr, flush=True)


def _best_step(run_dir: Path) -> Any:
    best = run_dir / "best" / "best.json"
    return json.loads(best.read_text(encoding="utf-8")).get("step") if best.is_file() else None


def _record(run_dir: Path, previous: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """Append the look to test_looks.jsonl (flushed to disk before any result is written)."""
    record = {"time": time.time(), "forced": bool(previous), "look": len(previous) + 1,
              "best_step": _best_step(run_dir), "metrics": metrics}
    with open(run_dir / "test_looks.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _write_results(run_dir: Path, look: int, metrics: dict[str, Any], files: dict[str, str]) -> None:
    """test_metrics.json and the files the stage asked for (after the look is recorded)."""
    (run_dir / "test_metrics.json").write_text(json.dumps({**metrics, "look": look, "best_step": _best_step(run_dir)},
                                                          indent=2), encoding="utf-8")
    for name, text in files.items():
        (run_dir / name).write_text(text, encoding="utf-8")


def main(argv: list[str]) -> dict[str, Any]:
    """`honelm test RUN [--force]`."""
    p = argparse.ArgumentParser(prog="honelm test", description="Evaluate RUN's best checkpoint on its test split, once. "
                                "This is the only command that reads the test split; every look is recorded.")
    p.add_argument("run", help="run directory (e.g. runs/classify/latest), or a search directory (its best trial)")
    p.add_argument("--force", action="store_true", help="look again although the test split was already evaluated (recorded)")
    p.add_argument("--ledger", default=None, metavar="PATH", help="the project's test ledger, where this look is recorded "
                   "(default: .honelm/test_ledger.jsonl in the nearest directory above RUN that has .honelm/, else the "
                   "current directory when RUN is inside it, else RUN's parent; see honelm.protocol.ledger)")
    args = p.parse_args(argv)
    run = Path(args.run)
    if (run / "search.json").is_file():  # a search directory: its best trial is the run to test
        best = run / "best.json"
        if not best.is_file():
            raise HonelmError(f"{run}: this search has no complete trial yet")
        ledger = L.ledger_path(run, args.ledger)  # the search's ledger: its report reads the same one
        run = Path(json.loads(best.read_text(encoding="utf-8"))["run_dir"])
        print(f"testing the search's best trial: {run}")
    else:
        ledger = L.ledger_path(run, args.ledger)
    metrics = run_test(run, force=args.force, ledger=ledger)
    for k, v in metrics.items():
        print(f"{k}: {v}")
    return metrics
