"""`honelm ablate FILE`: which booster helped — variants × seeds, each tested once, with intervals.

    # honelm ablate configs/ablate/demo.yaml
    out_dir: runs/ablate/demo
    seeds: 2                      # seeds 0..N-1, or a list [0, 1, 2]; default 3
    metric: accuracy              # test metric of the interval and verdict: accuracy, macro_f1, mse, pearson
    bootstrap: 2000               # paired-bootstrap resamples
    confidence: 0.95
    vars: {data: runs/demo/data}  # as in a pipeline file: ${vars.data}
    stages:                       # the baseline, as pipeline stages; the LAST one is tested
      - {name: classify, verb: classify, config: demo, set: {data.train: "${vars.data}/reviews.jsonl"}}
    search:                       # optional: every variant gets this search on validation;
      n_trials: 4                 #   without it, hyperparameters are fixed
      metric: val_accuracy
      space: {train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}}
    variants:                     # the baseline is always there, named "baseline"
      lora: {set: {lora.r: 8}}                       # overrides of the tested stage
      fgm: {set: {adversarial.method: fgm}}
      tapt:                                          # stages that run before the tested one
        before: [{name: tapt, verb: adapt, config: tapt-mlm, set: {task.train: "${vars.data}/reviews.jsonl"}}]
        set: {model.init_from: "${tapt}"}
      dapt:                                          # shared: run once (first seed), used by every seed
        before: [{name: dapt, verb: adapt, shared: true, set: {data.train: "${vars.data}/corpus.txt"}}]
        set: {model.init_from: "${dapt}"}
      lora+fgm: {combine: [lora, fgm]}               # a combination of listed variants

A cell is one variant at one seed: a pipeline (honelm.pipeline) in OUT_DIR/cells/VARIANT/seed-S
whose run stages all get `run.seed=S` (the data split, `data.seed`, stays the same so every
cell is tested on the same examples). A before-stage marked `shared: true` (an expensive DAPT,
say) runs once, at the first seed, in OUT_DIR/shared/VARIANT and every seed's cell starts from it;
the interval then carries no variation of that stage (say so when reporting), and its time counts
in each cell's cost. With `search`, each variant first runs that search (the
same space and trial budget for all) in OUT_DIR/cells/VARIANT/search, on the first seed, after
its `before` stages; the best values are then used at every seed. The tested stage's selected
checkpoint (best validation) is tested once by `honelm test`'s own code; predictions are kept.

Results (results.json, results.csv, report.md/.html, plots/ablation.png): mean ± std over seeds of
every test metric; the paired-bootstrap interval of the difference from baseline on `metric`
(honelm.protocol.stats) and its verdict; cost per variant (train time of all its stages, peak
memory, trainable parameters of the tested stage).

The file is read as `AblateConfig` (its sections `AblateStageConfig` and `VariantConfig`) by
honelm.config's `from_mapping`; `honelm ablate --help` lists every field.

Resumable: a finished cell (cell.json) is never recomputed; an unfinished one continues through
its pipeline (finished stages skipped, interrupted ones resumed). A cell whose planned configs no
longer match what the file asks for is an error naming it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from honelm import config as C
from honelm import registry
from honelm.errors import ConfigError, HonelmError
from honelm.pipeline import (Pipeline, PipelineStageConfig, Stage, _as_override, _flatten, config_differences, execute,
                             has_run_dir, plan, resolve)
from honelm.predictions import TEST_FILE, read_records
from honelm.protocol import search as S
from honelm.protocol import stats
from honelm.protocol.test import run_test
from honelm.reporting import finish_report, fmt_duration_short, fmt_value, table

BASELINE = "baseline"
ABLATION_FILE = "ablation.json"  # marks an ablation directory
AGAIN = "honelm ablate FILE (the same command)"  # how to continue after an interruption
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # it names a directory


@dataclass
class AblateStageConfig(PipelineStageConfig):
    """A pipeline stage of an ablation file (the baseline's stages, a variant's before-stages)."""

    shared: bool = False
    """Only for a variant's before-stage: run it once, at the first seed, in OUT_DIR/shared/VARIANT, and start
    every seed's cell from it."""


@dataclass
class VariantConfig:
    """One variant of an ablation: settings of the tested stage, stages run before the baseline's, or a combination."""

    set: dict[str, Any] = field(default_factory=dict)
    """Overrides of the tested (last) stage's config: dotted keys or nested mappings."""
    before: list[AblateStageConfig] = field(default_factory=list)
    """Pipeline stages that run before the baseline's (a DAPT or TAPT run, say); ${NAME} in `set` names them."""
    combine: list[str] = field(default_factory=list)
    """Two or more variants defined above it, whose settings and before-stages this one joins (then nothing else)."""

    def validate(self) -> None:
        if self.combine and (len(self.combine) < 2 or self.set or self.before):
            raise C.FieldError("combine", "list two or more variants defined above (and nothing else)")


@dataclass
class AblateConfig:
    """An ablation file (configs/ablate/*.yaml): the baseline's stages, the variants, the seeds and the statistics."""

    out_dir: str = ""
    """Directory of the cells, shared runs and results (--out-dir overrides it). Required."""
    seeds: int | list[int] = 3
    """Seeds of every variant: a count N (seeds 0..N-1) or a list of distinct integers (--seeds N)."""
    metric: str = "accuracy"
    """Test metric of the interval and verdict: accuracy, macro_f1, mse or pearson."""
    bootstrap: int = 2000
    """Paired-bootstrap resamples of the interval (at least 100)."""
    confidence: float = 0.95
    """Confidence level of the interval, in [0.5, 1)."""
    vars: dict[str, str] = field(default_factory=dict)
    """Named values, ${vars.NAME} in the stages as in a pipeline file (--var NAME=VALUE sets one)."""
    stages: list[AblateStageConfig] = field(default_factory=list)
    """The baseline, as pipeline stages; the LAST one is the tested stage. At least one."""
    search: dict[str, Any] | None = None
    """A search every variant runs first, on validation at the first seed: a search file's fields (space, metric,
    n_trials, sampler, ...) without verb, config, set and out_dir; none = fixed hyperparameters."""
    variants: dict[str, VariantConfig] = field(default_factory=dict)
    """Variants by name, each compared with the baseline (always there, named baseline)."""

    def validate(self) -> None:
        if not self.out_dir.strip():
            raise C.FieldError("out_dir", "missing")
        count = isinstance(self.seeds, int) and self.seeds > 0
        listed = isinstance(self.seeds, list) and len(set(self.seeds)) == len(self.seeds) > 0
        if not (count or listed):
            raise C.FieldError("seeds", "must be a positive count or a list of distinct integers")
        if self.metric not in stats.METRICS:
            raise C.FieldError("metric", f"{self.metric!r} is not one of {', '.join(stats.METRICS)}")
        if not self.stages:
            raise C.FieldError("stages", "must be a non-empty list of pipeline stages (the last one is tested)")
        if any(stage.shared for stage in self.stages):
            raise C.FieldError("stages", "only a variant's before-stages can be shared")
        for name in self.variants:
            if name == BASELINE:
                raise C.FieldError(f"variants.{name}", "the baseline is the file's stages; name the variant otherwise")
            if not VARIANT_NAME.fullmatch(name):
                raise C.FieldError(f"variants.{name}", "a variant name is letters, digits, '+', '-', '_' or '.' "
                                   "(it names a directory)")
        if self.bootstrap < 100:
            raise C.FieldError("bootstrap", "must be an integer ≥ 100")
        if not 0.5 <= self.confidence < 1:
            raise C.FieldError("confidence", "must be in [0.5, 1)")


@dataclass
class Variant:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)  # dotted overrides of the tested stage
    before: list[AblateStageConfig] = field(default_factory=list)  # pipeline stages run first


@dataclass
class AblationSpec:
    path: Path
    out_dir: Path
    seeds: list[int]
    metric: str
    stages: list[AblateStageConfig]
    variants: list[Variant]
    variables: dict[str, str] = field(default_factory=dict)
    search: dict[str, Any] | None = None
    bootstrap: int = 2000
    confidence: float = 0.95

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in stats.LOWER_IS_BETTER


def load_spec(path: str | Path, variables: dict[str, str] | None = None, out_dir: str | None = None,
              seeds: int | None = None) -> AblationSpec:
    """Read and check an ablation file (with the command line's --var, --out-dir and --seeds on top);
    errors name the file and the field."""
    p = Path(path)
    raw = C.read_yaml(p, "ablation file", C.LineLoader)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: an ablation file is a mapping with out_dir, stages and variants")
    if out_dir:
        raw["out_dir"] = out_dir
    if seeds is not None:
        raw["seeds"] = seeds
    if variables:
        known = raw.get("vars") or {}
        missing = sorted(set(variables) - set(known)) if isinstance(known, dict) else []
        if missing:
            raise ConfigError(f"{p}: --var {', '.join(missing)}: not among the file's vars ({', '.join(known) or 'none'})")
        raw["vars"] = {**known, **variables}
    cfg = C.from_mapping(AblateConfig, raw, p)
    seed_list = list(range(cfg.seeds)) if isinstance(cfg.seeds, int) else list(cfg.seeds)
    spec = AblationSpec(p, Path(cfg.out_dir), seed_list, cfg.metric, cfg.stages, _variants(cfg, p), cfg.vars,
                        cfg.search, cfg.bootstrap, cfg.confidence)
    for variant in spec.variants:  # every cell's configs build (and validate) before anything runs
        plan(cell_pipeline(spec, variant, spec.seeds[0]))
        plan(shared_pipeline(spec, variant))
    return spec


def _variants(cfg: AblateConfig, p: Path) -> list[Variant]:
    """The baseline, then the file's variants in order, a `combine` one joining those defined above it."""
    variants: dict[str, Variant] = {BASELINE: Variant(BASELINE)}
    for name, body in cfg.variants.items():
        if not body.combine:
            variants[name] = Variant(name, dict(_flatten(body.set)), list(body.before))
            continue
        where = f"{p}: variants.{name}.combine"
        merged = Variant(name)
        for part in body.combine:
            if part not in variants or part == BASELINE:
                raise ConfigError(f"{where}: '{part}' is not a variant defined above it")
            for k, v in variants[part].settings.items():
                if k in merged.settings and merged.settings[k] != v:
                    raise ConfigError(f"{where}: '{k}' is set differently by the combined variants")
                merged.settings[k] = v
            merged.before += [s for s in variants[part].before if s not in merged.before]
        variants[name] = merged
    return list(variants.values())


# ----------------------------------------------------------------------------------------------
# cells


def cell_dir(spec: AblationSpec, variant: Variant, seed: int) -> Path:
    return spec.out_dir / "cells" / variant.name / f"seed-{seed}"


def shared_dir(spec: AblationSpec, variant: Variant) -> Path:
    return spec.out_dir / "shared" / variant.name


def shared_pipeline(spec: AblationSpec, variant: Variant) -> Pipeline:
    """The variant's `shared: true` before-stages: run once, at the first seed, used by every seed's cell."""
    items = [s for s in variant.before if s.shared]
    return Pipeline(spec.path, shared_dir(spec, variant), {**spec.variables, "seed": str(spec.seeds[0])},
                    _stages(spec, variant, items, spec.seeds[0], None, tested=False))


def cell_pipeline(spec: AblationSpec, variant: Variant, seed: int, extra: dict[str, Any] | None = None,
                  upto: int | None = None) -> Pipeline:
    """The pipeline of one cell: the variant's `before` stages, then the baseline's, every run stage
    at `run.seed=seed`, the tested (last) stage with the variant's settings and `extra` on top.
    `${NAME}` of a shared before-stage stands for its run in OUT_DIR/shared/VARIANT."""
    shared = {s.name or s.verb: shared_dir(spec, variant) / (s.name or s.verb) for s in variant.before if s.shared}
    items = [s for s in variant.before if not s.shared] + spec.stages
    stages = _stages(spec, variant, items, seed, extra, tested=True, shared=shared)
    if upto is not None:
        stages = stages[:upto]
    return Pipeline(spec.path, cell_dir(spec, variant, seed), {**spec.variables, "seed": str(seed)}, stages)


def _substitute(value: Any, shared: dict[str, Path]) -> Any:
    if not isinstance(value, str) or not shared:
        return value
    return re.sub(r"\$\{\s*([^}]*?)\s*\}", lambda m: str(shared[m.group(1)]) if m.group(1) in shared else m.group(0), value)


def _stages(spec: AblationSpec, variant: Variant, items: list[AblateStageConfig], seed: int,
            extra: dict[str, Any] | None, tested: bool, shared: dict[str, Path] | None = None) -> list[Stage]:
    """Pipeline stages from the file's: every run stage at `run.seed=seed`, the tested (last) one with the
    variant's settings and `extra`, `${NAME}` of a shared stage replaced by its run directory."""
    shared = shared or {}
    stages: list[Stage] = []
    for i, item in enumerate(items):
        settings = dict(_flatten(item.set))
        if tested and i == len(items) - 1:
            settings.update(variant.settings)
            settings.update(extra or {})
        if has_run_dir(item.verb):
            settings.setdefault("run.seed", seed)
        settings = {k: _substitute(v, shared) for k, v in settings.items()}
        stages.append(Stage(item.name or item.verb, item.verb, 0, _substitute(item.config, shared), settings,
                            [_substitute(a, shared) for a in item.args], item.output))
    names = [s.name for s in stages] + list(shared)
    if len(set(names)) != len(names):
        raise ConfigError(f"{spec.path}: variant '{variant.name}' has two stages named alike ({', '.join(names)})")
    return stages


def _planned_identity(pipe: Any) -> str:
    """A short hash of the cell's planned configs, kept in cell.json as a record of what ran."""
    configs = []
    for planned in plan(pipe):
        configs.append(C.to_dict(planned.config) if planned.config is not None else planned.argv)
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cell_differences(pipes: list[Any], record: dict[str, Any]) -> list[str]:
    """What a finished cell ran differently from what the file now asks for: `stage: key` for every
    config key whose saved value (config.yaml read with today's defaults, as the pipeline does)
    differs, and `stage: command` for a command stage whose arguments changed. A config field added
    to honelm after the cell ran takes its default and is no difference, so finished hours of work
    survive an upgrade; a changed default is one."""
    diffs: list[str] = []
    commands = record.get("commands", {})
    for pipe in pipes:
        for planned in plan(pipe):
            name = planned.stage.name
            if planned.run_dir is None:
                if commands.get(name) != planned.argv:
                    diffs.append(f"{name}: command")
            elif not (planned.run_dir / "config.yaml").is_file():
                diffs.append(f"{name}: no run in {planned.run_dir}")
            else:
                diffs += [f"{name}: {key}" for key in config_differences(planned)]
    return diffs


def _commands(pipes: list[Any]) -> dict[str, list[str]]:
    return {p.stage.name: p.argv for pipe in pipes for p in plan(pipe) if p.run_dir is None}


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("event") == kind:
                out.append(row)
    return out


def read_predictions(run_dir: Path) -> tuple[list[Any], list[Any]]:
    """(gold, pred) per test example from RUN/test_predictions.jsonl (written by `honelm test`),
    read by honelm.predictions' strict reader (file:line errors, split order checked)."""
    path = run_dir / TEST_FILE
    if not path.is_file():
        raise HonelmError(f"{run_dir}: no {TEST_FILE}: `honelm ablate` compares classification or "
                          "regression runs by their per-example test predictions")
    try:
        rows = read_records(path)
    except ValueError as e:
        raise HonelmError(str(e)) from None
    return [r["gold"] for r in rows], [r["pred"] for r in rows]


def run_cell(spec: AblationSpec, variant: Variant, seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Train (or continue) the cell's pipeline, test its last stage once, record cell.json."""
    pipe = cell_pipeline(spec, variant, seed, extra)
    common = shared_pipeline(spec, variant)
    ident = _planned_identity(pipe) + (_planned_identity(common) if common.stages else "")
    pipes = [common, pipe] if common.stages else [pipe]  # what the cell runs, shared stages first
    out = cell_dir(spec, variant, seed)
    record_path = out / "cell.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("identity") != ident:  # a new honelm version or a changed file: compare the settings
            diffs = _cell_differences(pipes, record)
            if diffs:
                shown = ", ".join(diffs[:8]) + (f" and {len(diffs) - 8} more" if len(diffs) > 8 else "")
                raise HonelmError(f"{spec.path}: cell {variant.name}/seed-{seed} finished with other settings than the "
                                  f"file now asks for ({shown}); delete {out} to run it again")
            record["identity"] = ident
            tmp = record_path.with_suffix(".json.tmp")  # atomic: a crash here must not lose the finished cell
            tmp.write_text(json.dumps(record), encoding="utf-8")
            tmp.replace(record_path)
        print(f"= {variant.name} seed {seed}: finished earlier, reused ({out})", flush=True)
        return record
    print(f"\n>> {variant.name} seed {seed}", flush=True)
    if common.stages:
        execute(common, again=AGAIN)
    execute(pipe, again=AGAIN)
    tested = out / pipe.stages[-1].name
    if (tested / "test_metrics.json").is_file():  # tested just before a crash: never look twice
        metrics = json.loads((tested / "test_metrics.json").read_text(encoding="utf-8"))
    else:
        metrics = run_test(tested)
    gold, pred = read_predictions(tested)
    time_s, peak, trainable = 0.0, 0.0, None
    # a shared stage's time counts in every cell that uses it: it is part of what the variant costs
    for where, stage in [(shared_dir(spec, variant), s) for s in common.stages] + [(out, s) for s in pipe.stages]:
        ends = _events(where / stage.name, "end")
        if ends:
            end = ends[-1]
            time_s += float(end.get("train_time_s") or 0)
            peak = max(peak, float(end.get("peak_rss_mb") or 0), float(end.get("peak_cuda_mb") or 0))
            if stage is pipe.stages[-1]:
                trainable = end.get("trainable_params")
    record = {"variant": variant.name, "seed": seed, "run_dir": str(tested), "identity": ident,
              "commands": _commands(pipes),
              "test": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
              "gold": gold, "pred": pred, "train_time_s": round(time_s, 2), "peak_memory_mb": round(peak, 1),
              "trainable_params": trainable, "settings": extra}
    record_path.write_text(json.dumps(record), encoding="utf-8")
    return record


def search_variant(spec: AblationSpec, variant: Variant) -> dict[str, Any]:
    """The variant's search (same space and budget for every variant) on the first seed; returns best params."""
    seed = spec.seeds[0]
    full = cell_pipeline(spec, variant, seed)
    common = shared_pipeline(spec, variant)
    if common.stages:
        execute(common, again=AGAIN)
    if len(full.stages) > 1:  # the stages the searched one starts from, at the first seed
        execute(cell_pipeline(spec, variant, seed, upto=len(full.stages) - 1), again=AGAIN)
    last = full.stages[-1]
    index = len(full.stages) - 1
    settings = {k: resolve(full, index, _as_override(v), f"set.{k}") for k, v in last.set.items()}
    raw = {**(spec.search or {}), "verb": last.verb, "config": resolve(full, index, last.config, "config"),
           "set": settings, "out_dir": str(spec.out_dir / "cells" / variant.name / "search")}
    raw.setdefault("metric", "val_loss" if spec.metric in stats.LOWER_IS_BETTER else f"val_{spec.metric}")
    raw["set"] = {k: v for k, v in settings.items() if k not in {str(s) for s in (spec.search or {}).get("space", {})}}
    search_spec = S.spec_from_mapping(raw, spec.path)
    print(f"\n>> {variant.name}: search ({search_spec.n_trials} trials on validation, seed {seed})", flush=True)
    best = S.run_search(search_spec)
    if not best:
        raise HonelmError(f"{search_spec.out_dir}: the search of variant '{variant.name}' has no complete trial")
    return dict(best["params"])


# ----------------------------------------------------------------------------------------------
# results


def summarise(spec: AblationSpec, cells: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant with finished cells: mean ± std of each test metric, the interval vs
    baseline, verdict, cost. An unfinished ablation (some seeds or variants still to run) gives the
    rows it can, each marked with `complete`; the interval pairs each variant seed with the
    baseline's run of the same seed, so it only uses seeds both sides have."""
    base = cells[BASELINE]
    gold = base[0]["gold"]
    base_by_seed = {r["seed"]: r for r in base}
    for name, records in cells.items():
        for r in records:
            if r["gold"] != gold:
                raise HonelmError(f"{r['run_dir']}: its test examples differ from the baseline's; every cell must be "
                                  "tested on the same split (same data and data.seed)")
    rows = []
    for variant in spec.variants:
        records = cells.get(variant.name) or []
        if not records:
            continue
        metric_names = sorted({k for r in records for k in r["test"] if k.startswith("test_") and k != "test_loss"})
        row: dict[str, Any] = {"variant": variant.name, "seeds": [r["seed"] for r in records],
                               "complete": len(records) == len(spec.seeds)}
        for m in metric_names:
            row[f"{m}_mean"], row[f"{m}_std"] = stats.mean_std([r["test"].get(m) for r in records])
        row["metric"] = spec.metric
        row["values"] = [stats.metric_value(spec.metric, _arr(gold), _arr(r["pred"])) for r in records]
        row["mean"], row["std"] = stats.mean_std(row["values"])
        if variant.name == BASELINE:
            row.update(diff=0.0, low=None, high=None, verdict="—")
        elif not (paired := [r for r in records if r["seed"] in base_by_seed]):
            row.update(diff=None, low=None, high=None, verdict="pending")  # its seeds' baselines are still to run
        else:
            ci = stats.paired_bootstrap(spec.metric, gold, [r["pred"] for r in paired],
                                        [base_by_seed[r["seed"]]["pred"] for r in paired],
                                        spec.bootstrap, spec.confidence, seed=0)
            row.update(diff=ci.diff, low=ci.low, high=ci.high,
                       verdict=stats.verdict(ci.low, ci.high, spec.higher_is_better))
        row["train_time_s"] = stats.mean_std([r["train_time_s"] for r in records])[0]
        row["peak_memory_mb"] = max(r["peak_memory_mb"] for r in records)
        row["trainable_params"] = records[0].get("trainable_params")
        row["settings"] = records[0].get("settings") or {}
        rows.append(row)
    return rows


def _arr(values: list[Any]) -> Any:
    return np.asarray(values)


def write_results(spec: AblationSpec, rows: list[dict[str, Any]], cells_done: int | None = None) -> None:
    """results.json/csv and the chart; `cells_done` (of variants × seeds) when the ablation is unfinished."""
    out = spec.out_dir
    planned = len(spec.variants) * len(spec.seeds)
    done = planned if cells_done is None else cells_done
    (out / "results.json").write_text(json.dumps({"metric": spec.metric, "confidence": spec.confidence,
                                                  "bootstrap": spec.bootstrap, "seeds": spec.seeds,
                                                  "complete": done == planned, "cells_done": done,
                                                  "cells_planned": planned, "rows": rows},
                                                 indent=2, default=_json_default), encoding="utf-8")
    columns = ["variant", "metric", "mean", "std", "diff", "low", "high", "verdict", "train_time_s", "peak_memory_mb",
               "trainable_params"]
    with open(out / "results.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c) for c in columns])
    plot_ablation(spec, rows, out / "plots" / "ablation.png")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def plot_ablation(spec: AblationSpec, rows: list[dict[str, Any]], path: Path) -> None:
    """Left: each variant's metric per seed and mean; right: difference from baseline with its interval."""
    matplotlib.use("Agg")  # no window, whatever backend the process had
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [r["variant"] if r.get("complete", True) else f"{r['variant']} ({len(r['seeds'])}/{len(spec.seeds)})"
             for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(2.5, 0.55 * len(rows) + 1.2)), sharey=True)
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        left.scatter(r["values"], [y] * len(r["values"]), color="0.6", s=18, zorder=2)
        left.scatter([r["mean"]], [y], color="black", marker="|", s=300, zorder=3)
    left.set_yticks(ys, names)
    left.set_xlabel(f"test {spec.metric} (dots: seeds, bar: mean)")
    colours = {"helps": "tab:green", "hurts": "tab:red", "no evidence": "tab:gray", "—": "black"}
    for y, r in zip(ys, rows):
        if r["variant"] == BASELINE or r.get("low") is None:  # no interval (yet)
            continue
        c = colours[r["verdict"]]
        right.errorbar([r["diff"]], [y], xerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]], fmt="o", color=c,
                       capsize=4)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel(f"Δ {spec.metric} vs baseline, {int(spec.confidence * 100)}% paired-bootstrap CI")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def results_from_cells(out_dir: Path) -> bool:
    """Rewrite results.json/csv and the chart from the cells finished on disk (what `honelm report`
    calls for an ablation stopped midway, or one whose results predate its newest cell); False when
    no baseline cell has finished yet, so there is nothing to compare."""
    meta = json.loads((out_dir / ABLATION_FILE).read_text(encoding="utf-8"))
    spec = AblationSpec(Path(meta["file"]), out_dir, list(meta["seeds"]), meta["metric"], [],
                        [Variant(name) for name in meta["variants"]], bootstrap=int(meta["bootstrap"]),
                        confidence=float(meta["confidence"]))
    cells: dict[str, list[dict[str, Any]]] = {}
    for variant in spec.variants:
        for seed in spec.seeds:
            path = cell_dir(spec, variant, seed) / "cell.json"
            if path.is_file():
                cells.setdefault(variant.name, []).append(json.loads(path.read_text(encoding="utf-8")))
    if not cells.get(BASELINE):
        return False
    write_results(spec, summarise(spec, cells), cells_done=sum(len(v) for v in cells.values()))
    return True


def run_ablation(spec: AblationSpec) -> list[dict[str, Any]]:
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"kind": "ablation", "file": str(spec.path), "metric": spec.metric, "seeds": spec.seeds,
              "variants": [v.name for v in spec.variants], "search": spec.search, "bootstrap": spec.bootstrap,
              "confidence": spec.confidence}
    (spec.out_dir / ABLATION_FILE).write_text(json.dumps(marker, indent=2, default=str), encoding="utf-8")
    print(f"ablation {spec.out_dir}: {len(spec.variants)} variants × {len(spec.seeds)} seeds, "
          + (f"a {spec.search.get('n_trials', 10)}-trial search per variant" if spec.search else "fixed hyperparameters"),
          flush=True)
    cells: dict[str, list[dict[str, Any]]] = {}
    for variant in spec.variants:
        extra = search_variant(spec, variant) if spec.search else {}
        cells[variant.name] = []
        for seed in spec.seeds:
            cells[variant.name].append(run_cell(spec, variant, seed, extra))
            # results so far after every cell: an ablation that takes sessions can be read (and reported) midway
            write_results(spec, summarise(spec, cells), cells_done=sum(len(v) for v in cells.values()))
    rows = summarise(spec, cells)
    write_results(spec, rows)
    return rows


def main(argv: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="honelm ablate", description="Variants × seeds, each tested once; mean ± std, "
                                "paired-bootstrap interval vs baseline, verdict and cost. See configs/ablate/.",
                                epilog=C.fields_help(AblateConfig, "fields of the file (key: type = default   doc):"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="ablation YAML or a preset name (e.g. configs/ablate/demo.yaml, or demo)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set one of the file's vars")
    p.add_argument("--out-dir", default=None, help="where the cells and results live (overrides the file)")
    p.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (overrides the file)")
    args = p.parse_args(argv)
    variables = dict(C.parse_overrides(args.var))
    spec = load_spec(registry.find_config("ablate", args.file), variables, args.out_dir, args.seeds)
    rows = run_ablation(spec)
    report = write_report(spec.out_dir)
    width = max(len(r["variant"]) for r in rows)
    print(f"\n{'variant':<{width}}  test {spec.metric:<10} Δ vs baseline [{int(spec.confidence * 100)}% CI]   verdict")
    for r in rows:
        spread = f"± {r['std']:.4f}" if math.isfinite(r["std"]) else ""
        ci = "" if r["low"] is None else f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
        print(f"{r['variant']:<{width}}  {r['mean']:.4f} {spread:<9} {ci:<30} {r['verdict']}")
    print(f"\nreport: {report}")
    return rows


# ----------------------------------------------------------------------------------------------
# the report


def _pm(mean: Any, std: Any) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


def write_report(path: Path) -> Path:
    """ABLATION/report.md (+ .html): results with intervals and verdicts, every test metric, chosen settings, cells."""
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
        results_from_cells(path)  # stopped midway (or by an older honelm): the results of the cells on disk
    if not results_path.is_file():
        lines += ["No results yet: run `honelm ablate " + meta["file"] + "` to finish the cells.", ""]
        return finish_report(path, lines)
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
                     fmt_duration_short(r["train_time_s"]) if r.get("train_time_s") is not None else "—",
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
                  *table(["variant", "values"], [[r["variant"], ", ".join(f"`{k}={fmt_value(v)}`" for k, v in r["settings"].items())]
                                                 for r in chosen]), ""]
    lines += ["## Cells", ""]
    cell_rows = []
    for cell in sorted((path / "cells").glob("*/seed-*/cell.json")):
        c = json.loads(cell.read_text(encoding="utf-8"))
        cell_rows.append([c["variant"], c["seed"], fmt_value(c["test"].get(f"test_{metric}")), f"`{c['run_dir']}`",
                          fmt_duration_short(c["train_time_s"])])
    lines += table(["variant", "seed", f"test {metric}", "run", "train time"], cell_rows) + [""]
    return finish_report(path, lines)
