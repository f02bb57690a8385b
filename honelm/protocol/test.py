"""`honelm test RUN`: the one and only reader of the test split.

It rebuilds the run's splits from its saved config (splits are deterministic by content), checks
that train and validation hash to what the run recorded, opens the test split inside
`unlock_test_split`, evaluates the best checkpoint once, writes `test_metrics.json` (and, for
classify runs, `test_predictions.jsonl` in honelm.predictions' format plus `labels.json`;
sft and reward runs keep their `test_predictions.json`), and appends the look to
`test_looks.jsonl`. A second look is refused unless forced; forced looks are recorded as such,
so a report always shows how many times the test set was seen.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from honelm import config as C
from honelm import registry
from honelm import runtime as rt
from honelm.data.splits import content_text, unlock_test_split, verify_manifest
from honelm.errors import HonelmError
from honelm.stages import setup as S
from honelm.rundir import stage_of
from honelm.stages.contract import RunContext, Stage, best_dir
from honelm.tokenizer import load_tokenizer


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


def run_test(run_dir: str | Path, force: bool = False) -> dict[str, Any]:
    """Evaluate RUN's best model on its test split once; returns the metrics."""
    run_dir = Path(run_dir)
    stage = stage_of(run_dir)
    previous = looks(run_dir)
    if previous and not force:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(previous[-1]["time"]))
        raise HonelmError(f"{run_dir}: the test split was already evaluated ({len(previous)} look(s), last {when}). "
                          "Choosing anything after seeing test results makes them optimistic; "
                          "if you must look again, pass --force (the look is recorded).")
    if stage in registry.training_verbs() and registry._ported(registry.verb(stage)):
        metrics = _test_stage(registry.stage(stage), run_dir)
        return _record(run_dir, previous, metrics)
    if stage == "pretrain":
        from honelm.stages import pretrain as stage_mod

        cfg = S.load_run_config(run_dir, stage_mod.PretrainConfig)
        splits = S.text_splits(cfg.data, lambda _: None)
    elif stage == "classify":
        from honelm.stages import classify as stage_mod  # type: ignore[no-redef]

        cfg = S.load_run_config(run_dir, stage_mod.ClassifyConfig)
        splits = S.labelled_splits(cfg.data, lambda _: None)
    elif stage == "adapt":
        from honelm.stages import adapt as stage_mod  # type: ignore[no-redef]

        cfg = S.load_run_config(run_dir, stage_mod.AdaptConfig)
        if not cfg.data.train:  # the task's test text is classify's to read, never adapt's
            raise HonelmError(f"{run_dir}: this adapt run has no domain corpus (data.train), so no test split of its "
                              "own; test it downstream: `honelm classify model.init_from=RUN`, then `honelm test` "
                              "that run")
        splits = S.text_splits(cfg.data, lambda _: None)
    elif stage == "sft":
        from honelm.stages import sft as stage_mod  # type: ignore[no-redef]

        cfg = S.load_run_config(run_dir, stage_mod.SFTConfig)
        splits = stage_mod.chat_splits(cfg.data, lambda _: None)
    elif stage in ("reward", "dpo"):
        from honelm.data.preferences import split_pairs
        from honelm.stages import dpo, reward

        stage_mod = reward if stage == "reward" else dpo  # type: ignore[assignment]
        cfg = S.load_run_config(run_dir, reward.RewardConfig if stage == "reward" else dpo.DPOConfig)
        splits = split_pairs(cfg.data, lambda _: None)
    else:
        raise HonelmError(f"{run_dir}: `honelm test` does not apply to {stage} runs")
    recorded = json.loads((run_dir / "split_manifest.json").read_text(encoding="utf-8"))
    verify_manifest(recorded, splits.manifest)
    with unlock_test_split("honelm test"):
        test = splits.test
    if not test:
        raise HonelmError(f"{run_dir}: the test split is empty (data.split gives it no share and data.test is unset)")
    leakage = None
    if cfg.data.test:  # a user test file: training could not look for duplicates in it, so look now
        from dataclasses import replace

        from honelm.data.splits import content_text

        make = (S.labelled_splits if stage == "classify" else stage_mod.chat_splits if stage == "sft"  # type: ignore[attr-defined]
                else split_pairs if stage in ("reward", "dpo") else S.text_splits)
        checked = make(replace(cfg.data, dedup=False), lambda _: None, leak_texts=[content_text(e) for e in test])
        leakage = cross_split_duplicates(checked.manifest)
    elif "duplicates" in recorded:
        leakage = cross_split_duplicates(recorded)
    if stage in ("pretrain", "adapt", "sft"):
        metrics = stage_mod.evaluate_test(run_dir, cfg, test)  # type: ignore[call-arg]
    else:
        metrics = stage_mod.evaluate_test(run_dir, cfg, test, splits.train)  # type: ignore[call-arg]
    predictions = metrics.pop("predictions", None)
    id2label = metrics.pop("id2label", None)
    if leakage is not None:
        metrics["test_duplicates_of_train_or_val"] = leakage
    return _record(run_dir, previous, metrics, predictions, id2label, stage)


def _test_stage(stage: Stage, run_dir: Path) -> dict[str, Any]:
    """Rebuild the split, check it against the manifest, open the test split once and score best/ on it."""
    cfg = C.build(stage.config, run_dir / "config.yaml")
    ctx = RunContext(cfg=cfg, runtime=rt.setup(), run_dir=run_dir)
    stage.check_testable(ctx)
    quiet = lambda _: None  # noqa: E731
    ctx.splits = stage.splits(cfg, quiet)
    recorded = json.loads((run_dir / "split_manifest.json").read_text(encoding="utf-8"))
    verify_manifest(recorded, ctx.splits.manifest)
    with unlock_test_split("honelm test"):
        test = ctx.splits.test
    if not test:
        raise HonelmError(f"{run_dir}: the test split is empty (data.split gives it no share and data.test is unset)")
    leakage = None
    if cfg.data.test:  # a user test file: training could not look for duplicates in it, so look now
        undeduped = replace(cfg, data=replace(cfg.data, dedup=False))
        checked = stage.splits(undeduped, quiet, leak_texts=[content_text(e) for e in test])
        leakage = cross_split_duplicates(checked.manifest)
    elif "duplicates" in recorded:
        leakage = cross_split_duplicates(recorded)
    ctx.tokenizer = load_tokenizer(best_dir(run_dir))
    metrics = stage.test(ctx, test)
    if leakage is not None:
        metrics["test_duplicates_of_train_or_val"] = leakage
    return metrics


def _record(run_dir: Path, previous: list[dict[str, Any]], metrics: dict[str, Any], predictions: Any = None,
            id2label: Any = None, stage: str = "") -> dict[str, Any]:
    """Write test_metrics.json, the files the stage asked for, and the look in test_looks.jsonl."""
    files = metrics.pop("files", {})
    best = json.loads((run_dir / "best" / "best.json").read_text(encoding="utf-8")) if (run_dir / "best" / "best.json").is_file() else {}
    record = {"time": time.time(), "forced": bool(previous), "look": len(previous) + 1, "best_step": best.get("step"),
              "metrics": metrics}
    (run_dir / "test_metrics.json").write_text(json.dumps({**metrics, "look": len(previous) + 1,
                                                           "best_step": best.get("step")}, indent=2), encoding="utf-8")
    for name, text in files.items():
        (run_dir / name).write_text(text, encoding="utf-8")
    if stage == "classify":
        from honelm import predictions as P

        # one record per test example, in test-split order; labels.json too, for runs trained
        # before classify wrote it (the names come from the same train labels either way)
        P.write_records(run_dir / P.TEST_FILE, predictions)
        P.write_labels(run_dir, id2label)
    elif predictions is not None:  # sft answers, reward [r_chosen, r_rejected] pairs
        (run_dir / "test_predictions.json").write_text(json.dumps(predictions), encoding="utf-8")
    with open(run_dir / "test_looks.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    return metrics


def main(argv: list[str]) -> dict[str, Any]:
    """`honelm test RUN [--force]`."""
    p = argparse.ArgumentParser(prog="honelm test", description="Evaluate RUN's best checkpoint on its test split, once. "
                                "This is the only command that reads the test split; every look is recorded.")
    p.add_argument("run", help="run directory (e.g. runs/classify/latest), or a search directory (its best trial)")
    p.add_argument("--force", action="store_true", help="look again although the test split was already evaluated (recorded)")
    args = p.parse_args(argv)
    run = Path(args.run)
    if (run / "search.json").is_file():  # a search directory: its best trial is the run to test
        best = run / "best.json"
        if not best.is_file():
            raise HonelmError(f"{run}: this search has no complete trial yet")
        run = Path(json.loads(best.read_text(encoding="utf-8"))["run_dir"])
        print(f"testing the search's best trial: {run}")
    metrics = run_test(run, force=args.force)
    for k, v in metrics.items():
        print(f"{k}: {v}")
    return metrics
