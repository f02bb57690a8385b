"""`honelm ablate FILE`: which booster helped — variants × seeds, verdicts on validation, the chosen one tested once.

    # honelm ablate configs/ablate/demo.yaml
    out_dir: runs/ablate/demo
    seeds: 2                      # seeds 0..N-1, or a list [0, 1, 2]; default 3
    metric: accuracy              # validation metric of the interval, verdict and choice (see "Which stages")
    bootstrap: 2000               # paired-bootstrap resamples
    confidence: 0.95
    test: chosen                  # chosen (default): test only the chosen variant's cells, once;
                                  #   all: every cell (a report, not a selection); none
    vars: {data: runs/demo/data}  # as in a pipeline file: ${vars.data}
    stages:                       # the baseline, as pipeline stages; the LAST one is compared
      - {name: classify, verb: classify, config: demo, set: {data.train: "${vars.data}/reviews.jsonl"}}
    search:                       # each variant's own search on validation (the default; `search: none` = none)
      n_trials: 4                 #   the same count and step budget for every variant (default 4)
      metric: val_accuracy
      space: {train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}}   # the baseline's (default: lr ×/÷ 3)
    variants:                     # the baseline is always there, named "baseline"
      lora: {set: {lora.r: 8}}                       # overrides of the compared stage
      fgm: {set: {adversarial.method: fgm}}
      tapt:                                          # stages that run before the compared one
        before: [{name: tapt, verb: adapt, config: tapt-mlm, set: {task.train: "${vars.data}/reviews.jsonl"}}]
        set: {model.init_from: "${tapt}"}
      dapt:                                          # shared: run once (first seed), used by every seed
        before: [{name: dapt, verb: adapt, shared: true, set: {data.train: "${vars.data}/corpus.txt"}}]
        set: {model.init_from: "${dapt}"}
      lora+fgm: {combine: [lora, fgm]}               # a combination of listed variants
      distill:                                       # the compared stage as another verb (same config and set)
        verb: distill
        set: {teacher.model: runs/classify/big}

A cell is one variant at one seed: a pipeline (honelm.pipeline) in OUT_DIR/cells/VARIANT/seed-S
whose run stages all get `run.seed=S` (the data split, `data.seed`, stays the same so every
cell is validated and tested on the same examples). A before-stage marked `shared: true` (an expensive DAPT,
say) runs once, at the first seed, in OUT_DIR/shared/VARIANT and every seed's cell starts from it;
the interval then carries no variation of that stage (say so when reporting), and its time counts
in each cell's cost.

Each variant searches its own space (honelm.protocol.spaces): the baseline's (the file's
`search.space`, or the learning rate a factor 3 either side of the config's) through the variant's
boosters (LoRA's learning rate up to 10× higher, an adversarial method's strength in units of the model's
embedding norm), with the same number of trials and the same step budget for all, in
OUT_DIR/cells/VARIANT/search on the first seed after its `before` stages; the best values are then
used at every seed. An ablation without a `search` section does the same with the defaults (4
trials). Only `search: none`, the user's explicit choice, trains every variant with the settings
the file gives it, untuned, and the report says so. `time_budget` shares a wall-clock budget
equally among the variants (honelm.protocol.spaces says how); a variant left without time, or
whose search finished no trial, is listed with the reason and not compared.

Selection on validation, test once (the protocol). The compared stage's selected checkpoint (best
validation) keeps its per-example validation records (RUN/best/val_predictions.jsonl,
honelm.predictions, written in the same atomic save as best/); cell.json records them. The
paired-bootstrap interval of the difference from baseline (honelm.protocol.stats), the verdict and
the CHOICE (the variant with the best validation mean of `metric`; of equals, the first listed, so
the baseline before any variant) are computed from those alone, with the test split sealed
(`forbid_test_split`) while cells train and verdicts are computed. A stage that writes no
per-example validation records is refused with a message saying so. Only then are cells
tested, each once by `honelm test`'s own code (CELL/test.json keeps the metrics and test records):
with `test: chosen` the chosen variant's cells, every seed, their looks one group in the project's
test ledger (honelm.protocol.ledger); with `test: all` every cell, and that table is labelled a
report, not a selection: nothing is chosen from it (the ledger flags those looks). With one seed,
the interval resamples validation examples only and the verdict says that training noise is not in it.

Which stages, and which metrics (`metric`, named as the stage logs it as val_NAME; checked with the
file, before anything runs; empty: the first listed):

    classify, distill, prompt    accuracy, macro_f1, mse, pearson     predictions (gold, pred) per example
    sft, pretrain, distill of    loss                                 score records per example / block
      an LM (data.task=generation)
    adapt                        loss (masked LM: also accuracy)        (units: target tokens)
    reward                       accuracy, margin, loss, reward_mean    per pair (units 1; chosen > rejected)
    dpo                          rewards_accuracy, rewards_margin,      per pair, implicit rewards
                                 loss, rewards_chosen, rewards_rejected
      with dpo.loss=kto          rewards_accuracy, rewards_margin,      per example (docs/preference.md)
                                 loss, rewards, kl

A score record holds each example's units and its sum of every metric over them, so the metric of a
resample is Σ sums / Σ units: the stage's own val_NAME (sft's validation loss is the token-weighted
mean of the examples' per-token losses). Lower is better for loss and mse: the verdict and the
choice follow. sft's reference-scored answers (exact match, token F1, chrF, BLEU) are scored once, at
the end of a run, on a few validation prompts (samples.jsonl), not at every validation, so they are
not a metric of the verdict; `honelm test` scores them on the test split, and the test table of the
report shows them beside the loss. `test: chosen` (or all) needs a stage `honelm test` applies to: an adapt run with no
domain corpus (no test split of its own) or ppo is refused when the file is read, naming `test`.

Results (results.json, results.csv, report.md/.html, plots/ablation.png): mean ± std over seeds of
every validation metric; the interval and verdict on `metric`; the chosen variant; the test numbers
of the tested cells; the ledger's count of looks at the test split; cost per variant (train time of
all its stages, trainable parameters of the compared stage, and peak memory only for a cell that
was its process's first run: a later run in the same process carries what earlier ones left
resident, so its peak would depend on the order the cells ran).

The file is read as `AblateConfig` (its sections `AblateStageConfig` and `VariantConfig`) by
honelm.config's `from_mapping`; `honelm ablate --help` lists every field.

Resumable: a finished cell (cell.json) is never recomputed, a tested one (test.json) never tested
again; an unfinished one continues through its pipeline (finished stages skipped, interrupted ones
resumed). A cell whose planned configs no longer match what the file asks for is an error naming
it. A cell finished by an older honelm, which tested every cell, is read on: its validation
predictions from its run, its one test look kept as a report.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from honelm import config as C
from honelm import registry
from honelm import runtime as rt
from honelm.bounds import ANY, at_least, between
from honelm.data.splits import forbid_test_split
from honelm.errors import ConfigError, HonelmError
from honelm.pipeline import (Pipeline, PipelineStageConfig, Stage, _as_override, _flatten, config_differences, execute,
                             has_run_dir, plan, resolve, var_args)
from honelm.predictions import TEST_FILE, VAL_FILE, is_scores, read_records
from honelm.protocol import ledger as L
from honelm.protocol import search as S
from honelm.protocol import spaces
from honelm.protocol import stats
from honelm.protocol.test import run_test
from honelm.reporting import finish_report, fmt_duration_short, fmt_value, table
from honelm.stages.contract import RunContext

BASELINE = "baseline"
ABLATION_FILE = "ablation.json"  # marks an ablation directory
AGAIN = "honelm ablate FILE (the same command)"  # how to continue after an interruption
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # it names a directory
TEST_MODES = ("chosen", "all", "none")
TEST_RECORD = "test.json"  # CELL/test.json: the cell's one test look (metrics, per-example predictions)
ONE_SEED = "one seed: training noise is not in the interval"


@dataclass
class AblateStageConfig(PipelineStageConfig):
    """A pipeline stage of an ablation file (the baseline's stages, a variant's before-stages)."""

    shared: bool = False
    """Only for a variant's before-stage: run it once, at the first seed, in OUT_DIR/shared/VARIANT, and start
    every seed's cell from it."""


@dataclass
class VariantConfig:
    """One variant of an ablation: settings of the compared stage, stages run before the baseline's, or a combination."""

    set: dict[str, Any] = field(default_factory=dict)
    """Overrides of the compared (last) stage's config: dotted keys or nested mappings."""
    before: list[AblateStageConfig] = field(default_factory=list)
    """Pipeline stages that run before the baseline's (a DAPT or TAPT run, say); ${NAME} in `set` names them."""
    combine: list[str] = field(default_factory=list)
    """Two or more variants defined above it, whose settings and before-stages this one joins (then nothing else)."""
    verb: str = ""
    """Run the compared stage as this training verb instead (distill: a student taught by a teacher), with the
    baseline's config and settings and `set` on top; a preset name in the baseline's `config` is then looked up
    among this verb's presets, so give a path to share the file. Empty = the baseline's verb."""

    def validate(self) -> None:
        if self.combine and (len(self.combine) < 2 or self.set or self.before or self.verb):
            raise C.FieldError("combine", "list two or more variants defined above (and nothing else)")
        if self.verb and self.verb not in registry.training_verbs():
            raise C.FieldError("verb", f"{self.verb!r} is not a training verb ({', '.join(registry.training_verbs())})")


@dataclass
class AblateConfig:
    """An ablation file (configs/ablate/*.yaml): the baseline's stages, the variants, the seeds and the statistics."""

    out_dir: str = ""
    """Directory of the cells, shared runs and results (--out-dir overrides it). Required."""
    seeds: Annotated[int | list[int], ANY] = 3
    """Seeds of every variant: a count N (seeds 0..N-1) or a list of distinct integers (--seeds N)."""
    metric: str = ""
    """Metric of the interval, verdict and choice, computed on each cell's per-example validation records (its best
    checkpoint's), named as the compared stage logs it (val_NAME): accuracy, macro_f1, mse or pearson (classify,
    distill, prompt); loss (sft, pretrain, adapt, an LM's distill; adapt's masked LM also accuracy); accuracy,
    margin, loss or reward_mean (reward); rewards_accuracy, rewards_margin, loss, rewards_chosen or rewards_rejected
    (dpo; with dpo.loss=kto rewards and kl instead of the last two). Empty: the first of these for the stage (accuracy, loss, accuracy, rewards_accuracy). Lower is better for
    loss and mse."""
    bootstrap: Annotated[int, at_least(100)] = 2000
    """Paired-bootstrap resamples of the interval (at least 100)."""
    confidence: Annotated[float, between(0.5, 1, open_hi=True)] = 0.95
    """Confidence level of the interval, in [0.5, 1)."""
    test: str = "chosen"
    """Which cells `honelm test` reads, once each, after every cell has trained and the verdicts are in: chosen (the
    chosen variant's, every seed), all (every cell; that table is a report, not a selection) or none (--test)."""
    vars: dict[str, C.VarConfig] = field(default_factory=dict)
    """Named values, ${vars.NAME} in the stages as in a pipeline file (--var NAME=VALUE sets one): `NAME: VALUE`, or
    NAME: {description, source} for one that --var must give."""
    stages: list[AblateStageConfig] = field(default_factory=list)
    """The baseline, as pipeline stages; the LAST one is the compared stage (validated, tested if chosen). At least one."""
    search: dict[str, Any] | None = field(default_factory=dict)
    """Each variant's own search, on validation at the first seed, before its seeds train: a search file's fields
    (space, metric, n_trials, sampler, pruner, prune_after, seed, timeout) without verb, config, set and out_dir;
    absent = the defaults (4 trials; space: train.lr a factor 3 either side of the config's). The space given is the baseline's;
    each variant searches it through its boosters (LoRA: lr 10x higher; adversarial: the method's strength, relative
    to the embedding norm). `none` = no search: every variant trains with the settings the file gives it, untuned,
    and the report says so."""
    time_budget: Annotated[float, at_least(0)] = 0.0
    """Wall-clock seconds for one invocation, 0 = none: the variants still to run share what is left equally, each
    in turn; a variant whose turn comes with nothing left is not run (listed; run again to continue it)."""
    variants: dict[str, VariantConfig] = field(default_factory=dict)
    """Variants by name, each compared with the baseline (always there, named baseline)."""

    def validate(self) -> None:
        if not self.out_dir.strip():
            raise C.FieldError("out_dir", "missing")
        count = isinstance(self.seeds, int) and self.seeds > 0
        listed = isinstance(self.seeds, list) and len(set(self.seeds)) == len(self.seeds) > 0
        if not (count or listed):
            raise C.FieldError("seeds", "must be a positive count or a list of distinct integers")
        if not self.stages:
            raise C.FieldError("stages", "must be a non-empty list of pipeline stages (the last one is compared)")
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
        if self.test not in TEST_MODES:
            raise C.FieldError("test", f"{self.test!r} is not one of {', '.join(TEST_MODES)}")
        if not 0.5 <= self.confidence < 1:
            raise C.FieldError("confidence", "must be in [0.5, 1)")
        if self.time_budget < 0:
            raise C.FieldError("time_budget", "must be a number of seconds (0 = none)")


@dataclass
class Variant:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)  # dotted overrides of the compared stage
    before: list[AblateStageConfig] = field(default_factory=list)  # pipeline stages run first
    verb: str = ""  # the compared stage's verb when not the baseline's (distill)


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
    test: str = "chosen"
    ledger: Path | None = None  # the project's test ledger (honelm.protocol.ledger); None: ledger_path(out_dir)
    time_budget: float = 0.0  # seconds for this invocation, shared by the variants (honelm.protocol.spaces)
    skipped: dict[str, str] = field(default_factory=dict)  # variant → why it has no cells (no time, no trial)

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in stats.LOWER_IS_BETTER


def load_spec(path: str | Path, variables: dict[str, str] | None = None, out_dir: str | None = None,
              seeds: int | None = None, test: str | None = None, ledger: str | None = None) -> AblationSpec:
    """Read and check an ablation file (with the command line's --var, --out-dir, --seeds, --test and --ledger on
    top); errors name the file and the field."""
    p = Path(path)
    raw = C.read_yaml(p, "ablation file", C.LineLoader)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: an ablation file is a mapping with out_dir, stages and variants")
    if out_dir:
        raw["out_dir"] = out_dir
    if seeds is not None:
        raw["seeds"] = seeds
    if test is not None:
        raw["test"] = test
    cfg = C.from_mapping(AblateConfig, raw, p)
    values = C.file_var_values(cfg.vars, variables or {}, p)
    seed_list = list(range(cfg.seeds)) if isinstance(cfg.seeds, int) else list(cfg.seeds)
    spec = AblationSpec(p, Path(cfg.out_dir), seed_list, cfg.metric, cfg.stages, _variants(cfg, p), values,
                        cfg.search, cfg.bootstrap, cfg.confidence, cfg.test, L.ledger_path(cfg.out_dir, ledger),
                        cfg.time_budget)
    for variant in spec.variants:  # every cell's configs build (and validate) before anything runs
        plan(cell_pipeline(spec, variant, spec.seeds[0]))
        plan(shared_pipeline(spec, variant))
    check_compared(spec)
    return spec


def check_compared(spec: AblationSpec) -> None:
    """The compared (last) stage can be ablated on `spec.metric` (set here to the stage's first when empty) and, unless
    `spec.test` is none, tested: ConfigError naming the file and the field otherwise, before anything runs."""
    last = plan(cell_pipeline(spec, Variant(BASELINE), spec.seeds[0]))[-1]
    verb = last.stage.verb
    if last.run_dir is None or verb not in registry.training_verbs():
        raise ConfigError(f"{spec.path}: stages: the last stage ({last.stage.name}: {verb}) is compared, so it must be "
                          "a training stage")
    stage = registry.stage(verb)
    metrics = stage.record_metrics_of(last.config) or stats.METRICS  # score records, else predictions
    if not spec.metric:
        spec.metric = metrics[0]
    elif spec.metric not in metrics:
        raise ConfigError(f"{spec.path}: metric: {spec.metric!r} is not one of {', '.join(metrics)} (the metrics of "
                          f"{verb}'s per-example validation records)")
    if spec.test == "none":
        return
    try:
        if not stage.testable:
            raise HonelmError(f"`honelm test` does not apply to {verb} runs")
        stage.check_testable(RunContext(cfg=last.config, runtime=rt.Runtime(torch.device("cpu")), run_dir=last.run_dir))
    except HonelmError as e:
        raise ConfigError(f"{spec.path}: test: {spec.test}, but the compared stage cannot be tested ({e}); set "
                          "test: none (verdicts and the choice on validation only)") from None


def _variants(cfg: AblateConfig, p: Path) -> list[Variant]:
    """The baseline, then the file's variants in order, a `combine` one joining those defined above it."""
    variants: dict[str, Variant] = {BASELINE: Variant(BASELINE)}
    for name, body in cfg.variants.items():
        if not body.combine:
            variants[name] = Variant(name, dict(_flatten(body.set)), list(body.before), body.verb)
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
            if variants[part].verb and merged.verb and variants[part].verb != merged.verb:
                raise ConfigError(f"{where}: the combined variants run different verbs")
            merged.verb = merged.verb or variants[part].verb
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
    at `run.seed=seed`, the compared (last) stage with the variant's settings and `extra` on top.
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
    """Pipeline stages from the file's: every run stage at `run.seed=seed`, the compared (last) one with the
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
        verb = variant.verb if tested and i == len(items) - 1 and variant.verb else item.verb
        stages.append(Stage(item.name or item.verb, verb, 0, _substitute(item.config, shared), settings,
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


def _read(path: Path) -> list[dict[str, Any]]:
    """Prediction records read by honelm.predictions' strict reader (file:line errors, split order checked)."""
    try:
        return read_records(path)
    except ValueError as e:
        raise HonelmError(str(e)) from None


def _examples(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a cell keeps of per-example records: the gold labels and predictions of a classification or regression
    run, or each example's units and metric sums (score records: sft, pretrain, adapt, reward, dpo)."""
    if is_scores(rows):
        return {"units": [r["units"] for r in rows], "sums": {m: [r["sums"][m] for r in rows] for m in rows[0]["sums"]}}
    return {"gold": [r["gold"] for r in rows], "pred": [r["pred"] for r in rows]}


def compared(metric: str, record: dict[str, Any]) -> tuple[str, list[Any], list[Any]]:
    """(stats metric, gold, pred) of a cell's validation record or test look on `metric`: the labels and predictions
    of a classification or regression run, or each example's units and sum of `metric` (stats.PER_UNIT: Σ sums /
    Σ units, the stage's own mean). An error when the records carry no such metric."""
    where = record.get("run_dir") or f"{record.get('variant')} seed {record.get('seed')}"
    if "units" not in record:
        if metric not in stats.METRICS:
            raise HonelmError(f"{where}: its per-example records are predictions (accuracy, macro_f1, mse, pearson), "
                              f"not {metric!r}")
        return metric, record["gold"], record["pred"]
    if metric not in record["sums"]:
        raise HonelmError(f"{where}: its per-example records carry {', '.join(record['sums'])}, not {metric!r}")
    return stats.PER_UNIT, record["units"], record["sums"][metric]


def read_test_records(run_dir: Path) -> dict[str, Any]:
    """`_examples` of RUN/test_predictions.jsonl (written by `honelm test`)."""
    path = run_dir / TEST_FILE
    if not path.is_file():
        raise HonelmError(f"{run_dir}: no {TEST_FILE}: `honelm ablate` compares the tested cells by their per-example "
                          "test records, which `honelm test` writes for every stage that validates")
    return _examples(_read(path))


def read_validation(run_dir: Path) -> dict[str, Any]:
    """The selected checkpoint's validation record: its val_* metrics and step (best/best.json) and its
    per-example validation records (best/val_predictions.jsonl), what verdicts and the choice are made from."""
    path = run_dir / "best" / VAL_FILE
    if not path.is_file():
        raise HonelmError(f"{run_dir}: no best/{VAL_FILE}: `honelm ablate` computes its intervals, verdicts and choice "
                          "from the per-example validation records of each cell's selected checkpoint, which "
                          "classify, distill, prompt, sft, pretrain, adapt, reward and dpo write; this run's stage "
                          "writes none (or it predates them), so it cannot be ablated on validation")
    best_path = run_dir / "best" / "best.json"
    best = json.loads(best_path.read_text(encoding="utf-8")) if best_path.is_file() else {}
    val = {k: v for k, v in best.items() if k.startswith("val_") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"val": val, "best_step": best.get("step"), **_examples(_read(path))}


def _cost(spec: AblationSpec, variant: Variant, common: Pipeline, pipe: Pipeline, alone: bool) -> dict[str, Any]:
    """Train time of every stage the cell ran (a shared stage's in every cell that uses it: it is part of what the
    variant costs), the compared stage's trainable parameters, and the peak memory only when `alone`."""
    time_s, peak, trainable = 0.0, 0.0, None
    out = pipe.out_dir
    for where, stage in [(shared_dir(spec, variant), s) for s in common.stages] + [(out, s) for s in pipe.stages]:
        ends = _events(where / stage.name, "end")
        if ends:
            end = ends[-1]
            time_s += float(end.get("train_time_s") or 0)
            peak = max(peak, float(end.get("peak_rss_mb") or 0), float(end.get("peak_cuda_mb") or 0))
            if stage is pipe.stages[-1]:
                trainable = end.get("trainable_params")
    return {"train_time_s": round(time_s, 2), "peak_memory_mb": round(peak, 1) if alone and peak else None,
            "trainable_params": trainable}


def _upgrade(record: dict[str, Any], out: Path, write: bool) -> dict[str, Any]:
    """A cell record of an older honelm (which tested every cell and compared on test): the validation part read
    from its run, its one test look moved to CELL/test.json (written when `write`), its memory no longer claimed
    (it was measured in a process shared with other cells)."""
    if record.get("split") == "validation":
        return record
    if write and "test" in record and not (out / TEST_RECORD).is_file():
        _write_json(out / TEST_RECORD, {"variant": record["variant"], "seed": record["seed"], "test": record["test"],
                                        "gold": record["gold"], "pred": record["pred"]})
    new = {k: v for k, v in record.items() if k not in ("test", "gold", "pred")}
    new.update(read_validation(Path(record["run_dir"])), split="validation", peak_memory_mb=None)
    return new


def _write_json(path: Path, payload: Any) -> None:
    """Atomically: a crash while writing must not lose a finished cell or a test look."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    tmp.replace(path)


def _reuse(spec: AblationSpec, variant: Variant, seed: int, pipes: list[Pipeline], ident: str) -> dict[str, Any]:
    """A finished cell's record, checked against what the file now asks for (and brought up to date)."""
    out = cell_dir(spec, variant, seed)
    record_path = out / "cell.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    changed = record.get("split") != "validation"
    if record.get("identity") != ident:  # a new honelm version or a changed file: compare the settings
        diffs = _cell_differences(pipes, record)
        if diffs:
            shown = ", ".join(diffs[:8]) + (f" and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise HonelmError(f"{spec.path}: cell {variant.name}/seed-{seed} finished with other settings than the "
                              f"file now asks for ({shown}); delete {out} to run it again")
        record["identity"], changed = ident, True
    if changed:
        record = _upgrade(record, out, write=True)
        _write_json(record_path, record)
    print(f"= {variant.name} seed {seed}: finished earlier, reused ({out})", flush=True)
    return record


def run_cell(spec: AblationSpec, variant: Variant, seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Train (or continue) the cell's pipeline and record cell.json: the selected checkpoint's validation metrics and
    per-example predictions, and the cost. It takes no test look (`test_cell` does, after the choice)."""
    pipe = cell_pipeline(spec, variant, seed, extra)
    common = shared_pipeline(spec, variant)
    ident = _planned_identity(pipe) + (_planned_identity(common) if common.stages else "")
    pipes = [common, pipe] if common.stages else [pipe]  # what the cell runs, shared stages first
    out = cell_dir(spec, variant, seed)
    if (out / "cell.json").is_file():
        return _reuse(spec, variant, seed, pipes, ident)
    print(f"\n>> {variant.name} seed {seed}", flush=True)
    first = rt.PROCESS_PEAK.runs_started == 0  # no run before this cell's in this process
    ran = execute(common, again=AGAIN) if common.stages else []
    ran += execute(pipe, again=AGAIN)
    # its memory is its own only when its runs were the process's first and all of them ran here
    alone = first and all(row["status"] != "done" for row in ran if row.get("run_dir"))
    compared = out / pipe.stages[-1].name
    record = {"variant": variant.name, "seed": seed, "run_dir": str(compared), "identity": ident,
              "commands": _commands(pipes), "split": "validation", **read_validation(compared),
              **_cost(spec, variant, common, pipe, alone), "settings": extra}
    _write_json(out / "cell.json", record)
    return record


def test_cell(spec: AblationSpec, record: dict[str, Any], group: str | None) -> dict[str, Any]:
    """The cell's one test look, by `honelm test`'s own code, into the ablation's ledger (`group`: the looks of the
    chosen variant's seeds, not flagged against each other); CELL/test.json keeps its metrics and predictions. A
    look taken before a crash (test_metrics.json) is read back, never taken again."""
    out = spec.out_dir / "cells" / record["variant"] / f"seed-{record['seed']}"
    path = out / TEST_RECORD
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    run = Path(record["run_dir"])
    if (run / "test_metrics.json").is_file():
        metrics = json.loads((run / "test_metrics.json").read_text(encoding="utf-8"))
    else:
        print(f"\n>> test {record['variant']} seed {record['seed']} (once)", flush=True)
        metrics = run_test(run, ledger=spec.ledger, group=group)
    result = {"variant": record["variant"], "seed": record["seed"], **read_test_records(run),
              "test": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    _write_json(path, result)
    return result


test_cell.__test__ = False  # type: ignore[attr-defined]  # a name starting with "test": not a pytest test


@dataclass
class Searched:
    """What a variant's search gives its cells: the variant with the settings its space is meant with
    (adversarial.relative: true), and the values chosen on validation (None: no trial completed)."""

    variant: Variant
    params: dict[str, Any] | None
    why: str = ""


def search_variant(spec: AblationSpec, variant: Variant, timeout: float | None = None) -> Searched:
    """The variant's own search (honelm.protocol.spaces: the baseline's space through its boosters, the same trial
    count for all) on the first seed, after its before-stages; `timeout`: no new trial after so many seconds."""
    seed = spec.seeds[0]
    full = cell_pipeline(spec, variant, seed)
    common = shared_pipeline(spec, variant)
    if common.stages:
        execute(common, again=AGAIN)
    if len(full.stages) > 1:  # the stages the searched one starts from, at the first seed
        execute(cell_pipeline(spec, variant, seed, upto=len(full.stages) - 1), again=AGAIN)
    search = {k: v for k, v in (spec.search or {}).items() if k != "space"}
    space, source, kept = _space_of(spec, variant)
    n_trials = search.setdefault("n_trials", spaces.DEFAULT_TRIALS)
    if timeout is not None:
        search["timeout"] = max(timeout, 1e-3)  # a spent share still lets one trial run: Optuna starts one first
    spaces.write_space(spec.out_dir / "cells" / variant.name, variant.name, space, source, kept, n_trials, timeout)
    tuned = Variant(variant.name, {**variant.settings, **space.fixed}, variant.before, variant.verb)
    if not space.ranges:  # the variant sets every searched key itself
        return Searched(tuned, {})
    last, index = full.stages[-1], len(full.stages) - 1
    settings = {k: resolve(full, index, _as_override(v), f"set.{k}") for k, v in last.set.items()}
    raw = {**search, "verb": last.verb, "config": resolve(full, index, last.config, "config"), "space": space.ranges,
           "set": {k: v for k, v in {**settings, **space.fixed}.items() if k not in space.ranges},
           "out_dir": str(spec.out_dir / "cells" / variant.name / "search"),
           "vars": var_args([resolve(full, index, a, "args") for a in last.args])}  # its preset's --var
    raw.setdefault("metric", "val_loss" if spec.metric in stats.LOWER_IS_BETTER else f"val_{spec.metric}")
    search_spec = S.spec_from_mapping(raw, spec.path)
    print(f"\n>> {variant.name}: search ({search_spec.n_trials} trials on validation, seed {seed}; "
          + ", ".join(f"{k} {spaces.shown(v)}" for k, v in space.ranges.items()) + ")", flush=True)
    best = S.run_search(search_spec)
    if not best:
        return Searched(tuned, None, "its search finished no trial"
                        + (" within its share of the time budget" if timeout is not None else ""))
    return Searched(tuned, dict(best["params"]))


def _space_of(spec: AblationSpec, variant: Variant) -> tuple[spaces.Space, str, list[str]]:
    """The variant's search space, where its base comes from, and the keys it sets itself (honelm.protocol.spaces)."""
    baseline_cfg = plan(cell_pipeline(spec, spec.variants[0], spec.seeds[0]))[-1].config
    base, source = spaces.baseline_space((spec.search or {}).get("space"), baseline_cfg)
    space, kept = spaces.variant_space(base, plan(cell_pipeline(spec, variant, spec.seeds[0]))[-1].config,
                                       variant.settings)
    return space, source, kept


def searched_earlier(spec: AblationSpec, variant: Variant, record: dict[str, Any]) -> Searched:
    """A variant whose first cell has finished: its search is over, the values that cell trained with are kept (a
    search a time budget cut short is not continued under cells already trained). A changed space is an error."""
    space, _, _ = _space_of(spec, variant)
    path = spec.out_dir / "cells" / variant.name / spaces.SPACE_FILE
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if recorded is not None and recorded["space"] != {k: spaces.shown(v) for k, v in space.ranges.items()}:
        raise HonelmError(f"{spec.path}: variant '{variant.name}' searched another space than the file now gives it "
                          f"({path}); delete {path.parent} to search and train it again")
    fixed = recorded["fixed"] if recorded is not None else {}
    return Searched(Variant(variant.name, {**variant.settings, **fixed}, variant.before, variant.verb),
                    dict(record.get("settings") or {}))


# ----------------------------------------------------------------------------------------------
# results


def summarise(spec: AblationSpec, cells: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant with finished cells, from their VALIDATION records only: mean ± std of each validation
    metric, the interval vs baseline, verdict, cost. An unfinished ablation (some seeds or variants still to run)
    gives the rows it can, each marked with `complete`; the interval pairs each variant seed with the baseline's
    run of the same seed, so it only uses seeds both sides have. With one such seed the row's `note` says that
    training noise is not in the interval."""
    base = cells[BASELINE]
    _, gold, _ = compared(spec.metric, base[0])
    base_by_seed = {r["seed"]: r for r in base}
    for records in cells.values():
        for r in records:
            if compared(spec.metric, r)[1] != gold:
                raise HonelmError(f"{r['run_dir']}: its validation examples differ from the baseline's; every cell must "
                                  "be validated on the same split (same data and data.seed)")
    rows = []
    for variant in spec.variants:
        records = cells.get(variant.name) or []
        if records:
            rows.append(_row(spec, variant, records, gold, base_by_seed))
    return rows


def _row(spec: AblationSpec, variant: Variant, records: list[dict[str, Any]], gold: list[Any],
         base_by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    metric_names = sorted({k for r in records for k in r["val"] if k.startswith("val_") and k != "val_loss"})
    row: dict[str, Any] = {"variant": variant.name, "seeds": [r["seed"] for r in records],
                           "complete": len(records) == len(spec.seeds)}
    for m in metric_names:
        row[f"{m}_mean"], row[f"{m}_std"] = stats.mean_std([r["val"].get(m) for r in records])
    row["metric"] = spec.metric
    kind = compared(spec.metric, records[0])[0]
    row["values"] = [stats.metric_value(kind, _arr(gold), _arr(compared(spec.metric, r)[2])) for r in records]
    row["mean"], row["std"] = stats.mean_std(row["values"])
    paired = [r for r in records if r["seed"] in base_by_seed]
    if variant.name == BASELINE:
        row.update(diff=0.0, low=None, high=None, verdict="—", note="")
    elif not paired:
        row.update(diff=None, low=None, high=None, verdict="pending", note="")  # its seeds' baselines are still to run
    else:
        ci = stats.paired_bootstrap(kind, gold, [compared(spec.metric, r)[2] for r in paired],
                                    [compared(spec.metric, base_by_seed[r["seed"]])[2] for r in paired],
                                    spec.bootstrap, spec.confidence, seed=0)
        row.update(diff=ci.diff, low=ci.low, high=ci.high, verdict=stats.verdict(ci.low, ci.high, spec.higher_is_better),
                   note=ONE_SEED if len(paired) == 1 else "")
    row["train_time_s"] = stats.mean_std([r["train_time_s"] for r in records])[0]
    measured = [r["peak_memory_mb"] for r in records if r.get("peak_memory_mb")]
    row["peak_memory_mb"] = max(measured) if measured else None
    row["trainable_params"] = records[0].get("trainable_params")
    row["settings"] = records[0].get("settings") or {}
    return row


def _arr(values: list[Any]) -> Any:
    return np.asarray(values)


def choose(spec: AblationSpec, rows: list[dict[str, Any]]) -> str | None:
    """The variant with the best validation mean of `metric` (of equals the first listed: the baseline before any
    variant); None until every variant has all its seeds. A variant without cells (spec.skipped: no time, no complete
    trial) is not among the candidates; the report lists it."""
    if len(rows) < len(spec.variants) - len(spec.skipped) or not all(r.get("complete") for r in rows):
        return None
    sign = 1.0 if spec.higher_is_better else -1.0
    scored = [(sign * r["mean"] if math.isfinite(r["mean"]) else -math.inf, -i, r["variant"]) for i, r in enumerate(rows)]
    return max(scored)[2]


def test_summary(spec: AblationSpec, tests: list[dict[str, Any]], chosen: str | None) -> dict[str, Any]:
    """The tested cells' numbers per variant (mean ± std of every test metric) and what the table is: "chosen" when
    only the chosen variant's cells were tested, else "report" (a report, not a selection)."""
    if not tests:
        return {"role": None, "rows": []}
    kind, gold, _ = compared(spec.metric, tests[0])
    for t in tests:
        if compared(spec.metric, t)[1] != gold:
            raise HonelmError(f"{spec.out_dir}/cells/{t['variant']}/seed-{t['seed']}: its test examples differ from "
                              f"{tests[0]['variant']} seed {tests[0]['seed']}'s; every cell must be tested on the same split")
    rows = []
    for variant in spec.variants:
        mine = [t for t in tests if t["variant"] == variant.name]
        if not mine:
            continue
        row: dict[str, Any] = {"variant": variant.name, "seeds": [t["seed"] for t in mine]}
        for m in sorted({k for t in mine for k in t["test"] if k.startswith("test_") and k != "test_loss"}):
            row[f"{m}_mean"], row[f"{m}_std"] = stats.mean_std([t["test"].get(m) for t in mine])
        row["values"] = [stats.metric_value(kind, _arr(gold), _arr(compared(spec.metric, t)[2])) for t in mine]
        row["mean"], row["std"] = stats.mean_std(row["values"])
        rows.append(row)
    role = "chosen" if chosen is not None and all(t["variant"] == chosen for t in tests) else "report"
    return {"role": role, "rows": rows}


test_summary.__test__ = False  # type: ignore[attr-defined]  # a name starting with "test": not a pytest test


def write_results(spec: AblationSpec, rows: list[dict[str, Any]], cells_done: int | None = None,
                  chosen: str | None = None, tested: dict[str, Any] | None = None) -> None:
    """results.json/csv and the chart; `cells_done` (of variants × seeds) when the ablation is unfinished."""
    out = spec.out_dir
    planned = (len(spec.variants) - len(spec.skipped)) * len(spec.seeds)
    done = planned if cells_done is None else cells_done
    tested = tested or {"role": None, "rows": []}
    (out / "results.json").write_text(json.dumps({"metric": spec.metric, "split": "validation",
                                                  "confidence": spec.confidence, "bootstrap": spec.bootstrap,
                                                  "seeds": spec.seeds, "complete": done == planned, "cells_done": done,
                                                  "cells_planned": planned, "rows": rows, "chosen": chosen,
                                                  "test_mode": spec.test, "test_role": tested["role"],
                                                  "skipped": spec.skipped,
                                                  "test_rows": tested["rows"]},
                                                 indent=2, default=_json_default), encoding="utf-8")
    columns = ["variant", "metric", "mean", "std", "diff", "low", "high", "verdict", "note", "train_time_s",
               "peak_memory_mb", "trainable_params"]
    with open(out / "results.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "chosen", *columns])
        for row in rows:
            writer.writerow(["validation", row["variant"] == chosen, *[row.get(c) for c in columns]])
        for row in tested["rows"]:  # the test look(s): chosen, or a report (never a selection)
            writer.writerow([f"test ({tested['role']})", row["variant"] == chosen, row["variant"], spec.metric,
                             row["mean"], row["std"]] + [None] * (len(columns) - 4))
    plot_ablation(spec, rows, out / "plots" / "ablation.png")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def plot_ablation(spec: AblationSpec, rows: list[dict[str, Any]], path: Path) -> None:
    """Left: each variant's validation metric per seed and mean; right: difference from baseline with its interval."""
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
    left.set_xlabel(f"validation {spec.metric} (dots: seeds, bar: mean)")
    colours = {"helps": "tab:green", "hurts": "tab:red", "no evidence": "tab:gray", "—": "black"}
    for y, r in zip(ys, rows):
        if r["variant"] == BASELINE or r.get("low") is None:  # no interval (yet)
            continue
        c = colours[r["verdict"]]
        right.errorbar([r["diff"]], [y], xerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]], fmt="o", color=c,
                       capsize=4)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel(f"Δ validation {spec.metric} vs baseline, {int(spec.confidence * 100)}% paired-bootstrap CI")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _spec_of(out_dir: Path, meta: dict[str, Any]) -> AblationSpec:
    """The parts of the spec that results and reports need, from OUT_DIR/ablation.json."""
    return AblationSpec(Path(meta["file"]), out_dir, list(meta["seeds"]), meta["metric"], [],
                        [Variant(name) for name in meta["variants"]], bootstrap=int(meta["bootstrap"]),
                        confidence=float(meta["confidence"]), test=meta.get("test", "all"),
                        ledger=Path(meta["ledger"]) if meta.get("ledger") else L.ledger_path(out_dir),
                        skipped=spaces.skipped(out_dir, meta["variants"]))


def results_from_cells(out_dir: Path) -> bool:
    """Rewrite results.json/csv and the chart from the cells finished on disk (what `honelm report`
    calls for an ablation stopped midway, or one whose results predate its newest cell or this protocol); False
    when no baseline cell has finished yet, so there is nothing to compare. Nothing is trained or tested here."""
    spec = _spec_of(out_dir, json.loads((out_dir / ABLATION_FILE).read_text(encoding="utf-8")))
    cells: dict[str, list[dict[str, Any]]] = {}
    tests: list[dict[str, Any]] = []
    for variant in spec.variants:
        for seed in spec.seeds:
            where = cell_dir(spec, variant, seed)
            if (where / "cell.json").is_file():
                record = json.loads((where / "cell.json").read_text(encoding="utf-8"))
                cells.setdefault(variant.name, []).append(_upgrade(record, where, write=False))
            if (where / TEST_RECORD).is_file():
                tests.append(json.loads((where / TEST_RECORD).read_text(encoding="utf-8")))
            elif (where / "cell.json").is_file() and "test" in record and record.get("split") != "validation":
                tests.append({k: record[k] for k in ("variant", "seed", "test", "gold", "pred")})  # an older honelm's
    if not cells.get(BASELINE):
        return False
    with forbid_test_split("the verdicts of an ablation (computed on validation)"):
        rows = summarise(spec, cells)
    chosen = choose(spec, rows)
    write_results(spec, rows, cells_done=sum(len(v) for v in cells.values()), chosen=chosen,
                  tested=test_summary(spec, tests, chosen))
    return True


def cells_to_test(spec: AblationSpec, cells: dict[str, list[dict[str, Any]]], chosen: str | None) -> list[dict[str, Any]]:
    """The records `spec.test` asks to test: the chosen variant's cells, every cell, or none."""
    if spec.test == "all":
        return [r for records in cells.values() for r in records]
    if spec.test == "chosen" and chosen is not None:
        return list(cells[chosen])
    return []


def _n_trials(spec: AblationSpec) -> int:
    return int((spec.search or {}).get("n_trials") or spaces.DEFAULT_TRIALS)


def _run_variant(spec: AblationSpec, variant: Variant, share: float | None, cells: dict[str, list[dict[str, Any]]],
                 progress: bool = True) -> None:
    """The variant's search and cells (every seed) into `cells`, or none when it was not run because the time budget
    was spent before its turn or its search finished no trial (recorded in spec.skipped and on disk, with why).
    `progress`: write the results so far after every cell (not when other processes train other variants)."""
    where = spec.out_dir / "cells" / variant.name
    done = all((cell_dir(spec, variant, seed) / "cell.json").is_file() for seed in spec.seeds)
    why = None
    if share is not None and share <= 0 and not done:
        why = "not run: the time budget was spent before its turn (run the command again to continue it)"
    found = Searched(variant, {})
    first = cell_dir(spec, variant, spec.seeds[0]) / "cell.json"
    if spec.search is not None and first.is_file():
        found = searched_earlier(spec, variant, json.loads(first.read_text(encoding="utf-8")))
    elif why is None and spec.search is not None:
        found = search_variant(spec, variant, spaces.TimeBudget.search_timeout(share, _n_trials(spec), len(spec.seeds)))
        why = found.why or None
    spaces.mark_skipped(where, why)
    if why is not None:
        if variant.name == BASELINE:
            raise HonelmError(f"{spec.out_dir}: the baseline was {why}; nothing can be compared without it")
        spec.skipped[variant.name] = why
        print(f"\n>> {variant.name}: {why}", flush=True)
        return
    spec.skipped.pop(variant.name, None)
    cells[variant.name] = []
    for seed in spec.seeds:
        cells[variant.name].append(run_cell(spec, found.variant, seed, found.params or {}))
        # results so far after every cell: an ablation that takes sessions can be read (and reported) midway
        if progress:
            write_results(spec, summarise(spec, cells), cells_done=sum(len(v) for v in cells.values()))


def write_marker(spec: AblationSpec) -> None:
    """OUT_DIR/ablation.json: what makes OUT_DIR an ablation to `honelm report` (and holds the file's settings).
    Written by every process, `--variants` ones too, so that a report midway reads their cells (on validation,
    nothing chosen until the baseline has finished); several processes on one OUT_DIR write the same content, each
    through its own temporary file and an atomic rename, so none reads a half-written one."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"kind": "ablation", "file": str(spec.path), "metric": spec.metric, "seeds": spec.seeds,
              "variants": [v.name for v in spec.variants], "search": spec.search, "bootstrap": spec.bootstrap,
              "confidence": spec.confidence, "test": spec.test, "ledger": str(spec.ledger), "split": "validation",
              "time_budget": spec.time_budget, "spaces": "per variant"}
    tmp = spec.out_dir / f".{ABLATION_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(marker, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, spec.out_dir / ABLATION_FILE)


def train_only(spec: AblationSpec, names: Sequence[str]) -> None:
    """`honelm ablate FILE --variants A,B`: only these variants' searches and cells, with the test split sealed, and
    nothing compared, chosen, written to results.json or tested; it writes the marker, so `honelm report` reads the
    cells so far. Other processes (another GPU, another machine on
    the same OUT_DIR) can train the other variants meanwhile: every variant has its own cells, search and shared
    before-stages. `honelm ablate FILE` afterwards reuses every finished cell, then compares and tests."""
    known = [v.name for v in spec.variants]
    unknown = [n for n in names if n not in known]
    if not names:
        raise ConfigError(f"--variants names no variant of {spec.path} (its variants: {', '.join(known)})")
    if unknown:
        raise ConfigError(f"--variants {','.join(names)}: {', '.join(unknown)} is not a variant of {spec.path} "
                          f"(its variants: {', '.join(known)})")
    if spec.time_budget:
        raise ConfigError(f"--variants with the file's time_budget ({spec.time_budget:g} s): the budget is shared by "
                          "the variants in order, which processes that each train some of them cannot do; drop one")
    write_marker(spec)
    chosen = [v for v in spec.variants if v.name in names]
    print(f"ablation {spec.out_dir}: training {', '.join(v.name for v in chosen)} only (--variants); "
          f"run `honelm ablate {spec.path}` without --variants afterwards to compare and test", flush=True)
    cells: dict[str, list[dict[str, Any]]] = {}
    with forbid_test_split("an ablation's training (--variants: nothing is tested)"):
        for variant in chosen:
            _run_variant(spec, variant, None, cells, progress=False)
    for name, why in spec.skipped.items():
        print(f"{name}: {why}", flush=True)


def run_ablation(spec: AblationSpec) -> list[dict[str, Any]]:
    """Train every cell and compute the verdicts and the choice with the test split sealed; then test what
    `spec.test` asks for, once each. Returns the validation rows."""
    write_marker(spec)
    print(f"ablation {spec.out_dir}: {len(spec.variants)} variants × {_seeds(len(spec.seeds))}, "
          + (f"each variant's own {_n_trials(spec)}-trial search" if spec.search is not None
             else "no search (search: none): the file's settings, untuned")
          + (f", {spec.time_budget:g} s shared by the variants" if spec.time_budget else "")
          + f"; verdicts on validation, test: {spec.test}", flush=True)
    cells: dict[str, list[dict[str, Any]]] = {}
    budget = spaces.TimeBudget(spec.time_budget, len(spec.variants))
    with forbid_test_split("an ablation's training and verdicts (chosen on validation; the test comes after)"):
        for i, variant in enumerate(spec.variants):
            _run_variant(spec, variant, budget.share(i), cells)
        rows = summarise(spec, cells)
    chosen = choose(spec, rows)
    write_results(spec, rows, chosen=chosen)  # the verdicts and the choice are on disk before any test look
    group = f"{spec.out_dir.resolve()}#chosen:{chosen}" if spec.test == "chosen" else None
    tests = [test_cell(spec, record, group) for record in cells_to_test(spec, cells, chosen)]
    earlier = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(spec.out_dir.glob(f"cells/*/seed-*/{TEST_RECORD}"))]
    seen = {(t["variant"], t["seed"]) for t in tests}
    tests += [t for t in earlier if (t["variant"], t["seed"]) not in seen]  # looks an earlier run of the file took
    write_results(spec, rows, chosen=chosen, tested=test_summary(spec, tests, chosen))
    return rows


def main(argv: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="honelm ablate", description="Variants × seeds: mean ± std, paired-bootstrap "
                                "interval vs baseline and verdict on validation, the variant with the best validation "
                                "mean chosen and tested once; cost. See configs/ablate/.",
                                epilog=C.fields_help(AblateConfig, "fields of the file (key: type = default   doc):"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="ablation YAML or a preset name (e.g. configs/ablate/demo.yaml, or demo)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set one of the file's vars")
    p.add_argument("--out-dir", default=None, help="where the cells and results live (overrides the file)")
    p.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (overrides the file)")
    p.add_argument("--test", choices=TEST_MODES, default=None, help="which cells are tested once: the chosen variant's "
                   "(default), all (a report, not a selection) or none (overrides the file)")
    p.add_argument("--ledger", default=None, metavar="PATH", help="the project's test ledger (default: "
                   ".honelm/test_ledger.jsonl in the nearest directory above OUT_DIR that has .honelm/, else the "
                   "current directory when OUT_DIR is inside it, else OUT_DIR's parent)")
    p.add_argument("--variants", default=None, metavar="A,B", help="train only these variants (baseline included "
                   "by name), compare and test nothing: one process per GPU or machine on the same OUT_DIR, then the "
                   "command without --variants reuses their cells, compares and tests (so not with --test)")
    args = p.parse_args(argv)
    variables = dict(C.parse_overrides(args.var))
    spec = load_spec(registry.find_config("ablate", args.file), variables, args.out_dir, args.seeds, args.test,
                     args.ledger)
    if args.variants is not None:
        if args.test is not None:  # it would be ignored: a --variants process tests nothing
            raise ConfigError(f"--variants with --test {args.test}: a --variants process trains only and tests "
                              "nothing; give --test to the command without --variants, which compares and tests")
        train_only(spec, [n.strip() for n in args.variants.split(",") if n.strip()])
        return []
    rows = run_ablation(spec)
    report = write_report(spec.out_dir, spec.ledger)
    _print_results(spec, rows)
    print(f"\nreport: {report}")
    return rows


def _print_results(spec: AblationSpec, rows: list[dict[str, Any]]) -> None:
    """The validation table, the choice and the test look(s), as the report has them."""
    results = json.loads((spec.out_dir / "results.json").read_text(encoding="utf-8"))
    width = max(len(r["variant"]) for r in rows)
    print(f"\n{'variant':<{width}}  val {spec.metric:<11} Δ vs baseline [{int(spec.confidence * 100)}% CI]   verdict")
    for r in rows:
        spread = f"± {r['std']:.4f}" if math.isfinite(r["std"]) else ""
        ci = "" if r["low"] is None else f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
        print(f"{r['variant']:<{width}}  {r['mean']:.4f} {spread:<9} {ci:<30} {r['verdict']}"
              + (f" ({r['note']})" if r.get("note") else ""))
    for name, why in (results.get("skipped") or {}).items():
        print(f"{name:<{width}}  not compared: {why}")
    print(f"\nchosen on validation: {results['chosen']}")
    label = {"chosen": "tested once", "report": "tested (a report, not a selection)"}
    for r in results["test_rows"]:
        print(f"test {spec.metric} of {r['variant']} ({label[results['test_role']]}, {_seeds(len(r['seeds']))}): "
              + _pm(r["mean"], r["std"]))


# ----------------------------------------------------------------------------------------------
# the report


def _seeds(n: int) -> str:
    return f"{n} seed{'' if n == 1 else 's'}"


def _pm(mean: Any, std: Any) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


def _verdict_rule(metric: str) -> str:
    """How a verdict reads off the interval: the better side of zero is above it, or below it for a loss."""
    if metric in stats.LOWER_IS_BETTER:
        return (f"Verdict (a lower {metric} is better): the interval below zero → helps, above → hurts, containing "
                "zero → no evidence.")
    return "Verdict: the interval above zero → helps, below → hurts, containing zero → no evidence."


def _intro(meta: dict[str, Any]) -> list[str]:
    metric, conf = meta["metric"], int(round(meta["confidence"] * 100))
    test = {"chosen": "then only the chosen variant's cells were tested, once each",
            "all": "then every cell was tested once: that table is a report, not a selection",
            "none": "no cell was tested"}[meta.get("test", "all")]
    lines = [f"# Ablation report: {Path(meta['out_dir']).name if meta.get('out_dir') else meta['file']}", "",
             f"{len(meta['variants'])} variants × {_seeds(len(meta['seeds']))} ({', '.join(map(str, meta['seeds']))}); "
             + _search_words(meta) + ". **Verdicts and the choice are made on validation**: Δ is the difference from "
             f"baseline in validation {metric} of each cell's selected checkpoint (mean over seeds); the interval is "
             f"a {conf}% paired bootstrap over validation examples and seed pairs ({meta['bootstrap']} resamples). "
             f"{_verdict_rule(metric)} The variant with the best validation mean "
             f"is chosen. The test split was sealed while the cells trained and the verdicts were computed; {test}.", "",
             "Validation also picked each cell's checkpoint (and, with a search, its hyperparameters), so every "
             "validation number is somewhat optimistic, for every variant alike; the test look is the unbiased one.", ""]
    if len(meta["seeds"]) == 1:
        lines += ["> **One seed:** each interval resamples validation examples only. Training noise (initialisation, "
                  "data order) is not in it, so a verdict may be one lucky or unlucky seed; run more seeds.", ""]
    return lines


def _search_words(meta: dict[str, Any]) -> str:
    """How the variants' hyperparameters were set, in words (the report's first paragraph)."""
    search = meta.get("search", None)
    if search is None:
        return ("**no hyperparameter search** (`search: none`, as the file asks): every variant trained with the "
                "settings the file gives it, untuned, so a booster's verdict holds for those settings only (a "
                "booster that needs, say, a higher learning rate than the baseline's is judged at the baseline's)")
    trials = search.get("n_trials") or spaces.DEFAULT_TRIALS
    if meta.get("spaces") != "per variant":  # an ablation of an older honelm: one space, one budget for all
        return f"each variant got the same hyperparameter search on validation ({search.get('n_trials', 10)} trials)"
    budget = f"; a time budget of {meta['time_budget']:g} s shared by the variants" if meta.get("time_budget") else ""
    return (f"each variant searched its own space on validation ({trials} trials each, the same step budget; the "
            f"spaces and chosen values are below){budget}")


def _skipped_lines(results: dict[str, Any]) -> list[str]:
    skipped = results.get("skipped") or {}
    if not skipped:
        return []
    return ["**Not compared** (no cells): " + "; ".join(f"{name}: {why}" for name, why in skipped.items()) + ".", ""]


def _results_table(rows: list[dict[str, Any]], metric: str, conf: int, n_seeds: int, chosen: str | None) -> list[str]:
    memory = any(r.get("peak_memory_mb") for r in rows)
    body = []
    for r in rows:
        name = r["variant"] if r.get("complete", True) else f"{r['variant']} ({len(r['seeds'])}/{n_seeds} seeds)"
        name += " (chosen)" if r["variant"] == chosen else ""
        ci = "—" if r.get("low") is None else f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
        verdict = "—" if r["variant"] == BASELINE else f"**{r['verdict']}**" + (f" ({r['note']})" if r.get("note") else "")
        body.append([name, _pm(r["mean"], r["std"]), ci, verdict,
                     fmt_duration_short(r["train_time_s"]) if r.get("train_time_s") is not None else "—",
                     *([f"{r['peak_memory_mb']:,.0f} MiB" if r.get("peak_memory_mb") else "—"] if memory else []),
                     f"{r['trainable_params']:,}" if r.get("trainable_params") else "—"])
    header = ["variant", f"validation {metric} (mean ± std)", f"Δ vs baseline [{conf}% CI]", "verdict", "train time",
              *(["peak memory (own process)"] if memory else []), "trainable params"]
    note = ("Peak memory is shown only for a cell whose runs were the first of their process: a run that follows "
            "others in one process carries what they left resident, so its peak would depend on the order the cells "
            "ran." + ("" if memory else " No cell here ran first in its process, so the column is left out."))
    return ["## Results on validation (the selection)", "", *table(header, body), "", note, ""]


def _test_lines(results: dict[str, Any], metric: str) -> list[str]:
    role, rows, chosen = results.get("test_role"), results.get("test_rows") or [], results.get("chosen")
    if not rows:
        if chosen is None:
            return []
        return ["## Test", "", f"**Chosen on validation: {chosen}.** Not tested yet (test: {results.get('test_mode')}): "
                f"test its cells once with `honelm test CELL_RUN` or run the ablation with `--test chosen`.", ""]
    others = sorted({k[:-5] for r in rows for k in r if k.startswith("test_") and k.endswith("_mean")} - {f"test_{metric}"})
    body = [[r["variant"], len(r["seeds"]), _pm(r["mean"], r["std"]),
             *[_pm(r.get(f"{m}_mean"), r.get(f"{m}_std")) for m in others]] for r in rows]
    header = ["variant", "seeds", f"test {metric} (mean ± std)", *others]
    if role == "chosen":
        return ["## Test: the chosen variant, tested once", "",
                f"**Chosen on validation: {chosen}.** Each of its cells was tested once, after the choice; this is the "
                "number to report.", "", *table(header, body), ""]
    return ["## Test: a report, not a selection", "",
            (f"**Chosen on validation: {chosen}.** " if chosen else "")
            + "More cells than the chosen variant's were tested: this table describes them, and nothing may be chosen "
            "from it (choosing by these numbers would select on test). The choice above was made on validation.", "",
            *table(header, body), ""]


def _cells_lines(path: Path, metric: str) -> list[str]:
    cell_rows = []
    for cell in sorted((path / "cells").glob("*/seed-*/cell.json")):
        c = json.loads(cell.read_text(encoding="utf-8"))
        tested = cell.parent / TEST_RECORD
        test = json.loads(tested.read_text(encoding="utf-8"))["test"] if tested.is_file() else c.get("test", {})
        val = c.get("val", {}) if c.get("split") == "validation" else {}
        cell_rows.append([c["variant"], c["seed"], fmt_value(val.get(f"val_{metric}")),
                          fmt_value(test.get(f"test_{metric}")) if test else "not tested", f"`{c['run_dir']}`",
                          fmt_duration_short(c["train_time_s"])])
    return ["## Cells", "", *table(["variant", "seed", f"validation {metric}", f"test {metric}", "run", "train time"],
                                   cell_rows), ""]


def _test_hash(path: Path) -> str | None:
    for cell in sorted((path / "cells").glob("*/seed-*/cell.json")):
        found = L.test_hash_of(Path(json.loads(cell.read_text(encoding="utf-8"))["run_dir"]))
        if found:
            return found
    return None


def write_report(path: Path, ledger: str | Path | None = None) -> Path:
    """ABLATION/report.md (+ .html): validation results with intervals, verdicts and the choice; the test look(s) of
    what was tested; the test ledger's count; every validation metric; chosen settings; cells."""
    meta = json.loads((path / ABLATION_FILE).read_text(encoding="utf-8"))
    metric = meta["metric"]
    lines = _intro({**meta, "out_dir": str(path)})
    results_path = path / "results.json"
    newest_cell = max((c.stat().st_mtime for c in (path / "cells").glob("*/seed-*/*.json")), default=None)
    stale = results_path.is_file() and json.loads(results_path.read_text(encoding="utf-8")).get("split") != "validation"
    if newest_cell is not None and (stale or not results_path.is_file() or results_path.stat().st_mtime < newest_cell):
        results_from_cells(path)  # stopped midway, or written by an older honelm: the results of the cells on disk
    if not results_path.is_file():
        lines += ["No results yet: run `honelm ablate " + meta["file"] + "` to finish the cells.", ""]
        return finish_report(path, lines)
    results = json.loads(results_path.read_text(encoding="utf-8"))
    rows = results["rows"]
    if not results.get("complete", True):
        lines += [f"> **Unfinished:** {results['cells_done']} of {results['cells_planned']} cells done. Variants with "
                  "fewer seeds than planned are marked; their intervals pair only the seeds the baseline has too, "
                  f"and every number here can still change. Nothing is chosen or tested until every cell is done. Run "
                  f"`honelm ablate {meta['file']}` to continue.", ""]
    lines += _results_table(rows, metric, int(round(meta["confidence"] * 100)), len(meta["seeds"]), results.get("chosen"))
    lines += _skipped_lines(results)
    if (path / "plots" / "ablation.png").is_file():
        lines += ["![ablation](plots/ablation.png)", ""]
    lines += _test_lines(results, metric)
    ledger_path = L.ledger_path(path, ledger or meta.get("ledger"))
    if results.get("test_rows") or L.looks_on(_test_hash(path), [ledger_path]):
        lines += L.report_lines(_test_hash(path), [ledger_path])
    others = sorted({k[:-5] for r in rows for k in r if k.startswith("val_") and k.endswith("_mean")})
    if others:
        lines += ["## Every validation metric (mean ± std over seeds)", "",
                  *table(["variant", *others], [[r["variant"], *[_pm(r.get(f"{m}_mean"), r.get(f"{m}_std")) for m in others]]
                                                for r in rows]), ""]
    searched = spaces.report_lines(path, meta["variants"])
    lines += searched
    chosen_settings = [r for r in rows if r.get("settings")]
    if chosen_settings and not searched:  # an ablation of an older honelm: one shared space
        lines += ["## Hyperparameters chosen on validation", "",
                  *table(["variant", "values"], [[r["variant"], ", ".join(f"`{k}={fmt_value(v)}`" for k, v in r["settings"].items())]
                                                 for r in chosen_settings]), ""]
    return finish_report(path, lines + _cells_lines(path, metric))
