"""Each variant's own search in an ablation: its space, its share of a time budget, and how the report shows both.

The baseline's space is the ablation's `search.space` when the file gives one, else the default: the
learning rate on a log scale a factor LR_AROUND either side of the compared stage config's
`train.lr` (1e-3 → 3.3e-4 … 3e-3, one decade in all). A variant's space is the baseline's passed
through every booster its compared stage turns on (`honelm.boosters.search_space`, each booster's
`space` hook: LoRA moves the learning-rate range up by 10×, an adversarial method adds its strength
in units of the model's embedding norm with `adversarial.relative: true` fixed), minus every key the
variant sets itself (its value is kept, not searched). Every variant gets the same number of trials
at the same step budget (the compared stage's own); what each searched and chose is written to
OUT_DIR/cells/VARIANT/space.json and shown in the report.

A time budget (`time_budget`, seconds for one invocation) is shared equally by the variants still to
run, each in turn: a variant's share is what is left over the number of variants left, so one that
overruns takes from all that follow alike. Its search starts no new trial after
share × n_trials / (n_trials + seeds) seconds (the rest of its share is for its seeds' cells); a
trial or cell that started in time runs to its end, so an invocation can overrun by about one trial
and its cells per variant. A variant whose turn comes when the budget is spent is not run (a
variant finished earlier is reused whatever the budget), and one whose search finished no trial is
not compared; both are listed, with the reason, in the results and the report (OUT_DIR/cells/VARIANT/
skipped.json), never silently left out. Running the command again continues them, with a new budget.
Once a variant's first cell has finished, its search is over: a later invocation keeps the values
that cell trained with and does not continue a search the budget cut short (its trial count stays
in the report).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from honelm import boosters
from honelm.boosters.base import Space, range_around
from honelm.reporting import fmt_value, table

LR_AROUND = 3.0
"""The default learning-rate range: the stage config's train.lr divided and multiplied by this (log scale)."""
DEFAULT_TRIALS = 4
"""Trials of each variant's search when the ablation's `search` does not say (a small search, the same for all)."""
SPACE_FILE = "space.json"  # OUT_DIR/cells/VARIANT/space.json: what the variant searched, and with which settings
SKIPPED_FILE = "skipped.json"  # OUT_DIR/cells/VARIANT/skipped.json: why the variant has no cells (this invocation)


def default_space(stage_cfg: Any) -> Space:
    """The learning rate a factor LR_AROUND either side of the compared stage config's train.lr."""
    return Space({"train.lr": range_around(float(stage_cfg.train.lr), LR_AROUND)})


def baseline_space(user_space: dict[str, Any] | None, stage_cfg: Any) -> tuple[Space, str]:
    """The baseline's space and where it comes from (the file's `search.space`, or the default rule)."""
    if user_space:
        return Space(dict(user_space)), "the file's search.space"
    return default_space(stage_cfg), (f"default: train.lr a factor {LR_AROUND:g} either side of the config's "
                                      f"{float(stage_cfg.train.lr):g} (log scale)")


def variant_space(base: Space, stage_cfg: Any, own: Iterable[str]) -> tuple[Space, list[str]]:
    """The variant's space: `base` through its boosters' `space` hooks, minus the keys it sets itself (returned)."""
    extended = boosters.search_space(stage_cfg, base)
    mine = set(own)
    kept = sorted(k for k in extended.ranges if k in mine)
    return Space({k: v for k, v in extended.ranges.items() if k not in mine},
                 {k: v for k, v in extended.fixed.items() if k not in mine}), kept


def shown(rng: Any) -> str:
    """One dimension as the report shows it."""
    if isinstance(rng, list):
        return "one of " + ", ".join(fmt_value(v) for v in rng)
    if "values" in rng:
        return "one of " + ", ".join(fmt_value(v) for v in rng["values"])
    scale = " (log)" if rng.get("log") else ""
    step = f" step {fmt_value(rng['step'])}" if rng.get("step") is not None else ""
    return f"{fmt_value(rng['low'])} … {fmt_value(rng['high'])}{step}{scale}"


def write_space(where: Path, variant: str, space: Space, source: str, kept: list[str], n_trials: int,
                timeout: float | None) -> None:
    """OUT_DIR/cells/VARIANT/space.json: the variant's searched space, its fixed settings, its budget."""
    where.mkdir(parents=True, exist_ok=True)
    record = {"variant": variant, "source": source, "space": {k: shown(v) for k, v in space.ranges.items()},
              "fixed": space.fixed, "own": kept, "n_trials": n_trials, "timeout_s": timeout}
    (where / SPACE_FILE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


def mark_skipped(where: Path, why: str | None) -> None:
    """Record (or, with None, clear) why a variant has no cells in this invocation."""
    path = where / SKIPPED_FILE
    if why is None:
        path.unlink(missing_ok=True)
        return
    where.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"why": why}), encoding="utf-8")


def skipped(out_dir: Path, variants: Iterable[str]) -> dict[str, str]:
    """{variant: why} for the variants that have no cells (not run for lack of time, or no complete trial)."""
    found = {}
    for name in variants:
        path = out_dir / "cells" / name / SKIPPED_FILE
        if path.is_file():
            found[name] = json.loads(path.read_text(encoding="utf-8"))["why"]
    return found


@dataclass
class TimeBudget:
    """Wall-clock seconds for one invocation, shared equally by the variants still to run (0 = no budget)."""

    seconds: float
    variants: int
    started: float = field(default_factory=time.monotonic)

    def share(self, index: int) -> float | None:
        """The share of the variant at `index` (0-based, in run order) when it starts; None without a budget."""
        if self.seconds <= 0:
            return None
        left = self.seconds - (time.monotonic() - self.started)
        return max(left, 0.0) / (self.variants - index)

    @staticmethod
    def search_timeout(share: float | None, n_trials: int, seeds: int) -> float | None:
        """When the variant's search starts no new trial: its part of the share (the rest trains its seeds)."""
        return None if share is None else share * n_trials / (n_trials + seeds)


def _steps(run_dir: Path) -> int | None:
    """The optimizer steps a finished trial trained (its `end` event)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    ends = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if '"event": "end"' in x]
    return ends[-1].get("step") if ends else None


def _trials(search_dir: Path) -> tuple[int, int, list[int]]:
    """(complete, finished or failed, steps of each complete trial) of a variant's search."""
    path = search_dir / "trials.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []
    complete = [r for r in rows if r["state"] == "complete"]
    steps = [s for s in (_steps(Path(r["run_dir"])) for r in complete if r.get("run_dir")) if s is not None]
    return len(complete), sum(r["state"] != "running" for r in rows), steps


def _steps_shown(steps: list[int]) -> str:
    if not steps:
        return "—"
    return f"{min(steps):,}" if min(steps) == max(steps) else f"{min(steps):,}–{max(steps):,}"


def report_lines(out_dir: Path, variants: list[str]) -> list[str]:
    """The report's "Each variant's search" section: space, fixed settings, trials, steps, chosen values."""
    body = []
    for name in variants:
        where = out_dir / "cells" / name
        if not (where / SPACE_FILE).is_file():
            continue
        record = json.loads((where / SPACE_FILE).read_text(encoding="utf-8"))
        complete, tried, steps = _trials(where / "search")
        best_path = where / "search" / "best.json"
        best = json.loads(best_path.read_text(encoding="utf-8")) if best_path.is_file() else None
        searched = "; ".join(f"`{k}` {v}" for k, v in record["space"].items()) or "nothing (every key fixed)"
        fixed = ", ".join(f"`{k}={fmt_value(v)}`" for k, v in record["fixed"].items())
        own = ", ".join(f"`{k}`" for k in record["own"])
        chosen = ", ".join(f"`{k}={fmt_value(v)}`" for k, v in best["params"].items()) if best else "—"
        body.append([name, searched, fixed or "—", own or "—", f"{complete} of {record['n_trials']}"
                     + (f" ({tried - complete} not complete)" if tried > complete else ""), _steps_shown(steps),
                     chosen, f"{best['value']:.4f}" if best else "—"])
    if not body:
        return []
    sources = sorted({json.loads((out_dir / "cells" / n / SPACE_FILE).read_text(encoding="utf-8"))["source"]
                      for n in variants if (out_dir / "cells" / n / SPACE_FILE).is_file()})
    return ["## Hyperparameters chosen on validation: each variant's own search (first seed)", "",
            f"Every variant searched its own space: the baseline's ({'; '.join(sources)}) through the variant's "
            "boosters (LoRA: the learning rate up to 10× higher; an adversarial method: its strength, in units of the "
            "model's mean per-token embedding norm), the same number of trials at the same step budget. A key a "
            "variant sets itself is kept, not searched.", "",
            *table(["variant", "searched", "fixed with it", "set by the variant (not searched)", "trials complete",
                    "steps per trial", "chosen on validation", "best validation value"], body), ""]
