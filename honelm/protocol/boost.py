"""`honelm boost`: the boosters tried on a classification task, each with its own search; the best tested once.

    honelm boost out_dir=runs/boost/reviews config=demo set.data.train=reviews.jsonl \\
        set.model.init_from=runs/pretrain/latest steps=200 time_budget=3600 \\
        domain_text=corpus.txt teacher=runs/classify/big
    honelm boost boost.yaml                  # the same fields in a file (key=value on top)

Given a task (a classify config or preset and its settings: the data, the starting model) and a
budget (steps per trial and/or wall time), boost writes an ablation file, OUT_DIR/ablation.yaml
(`honelm ablate` runs it the same way), and runs it with honelm.protocol.ablate: the baseline and
one variant per method that applies — TAPT (adapt on the task's own train text, when the starting
model is a pre-trained one that adapt continues), DAPT (adapt on `domain_text`), LoRA, each listed
adversarial method that the stage accepts (plae among them), and distillation from `teacher` — each
with its own small search on validation (honelm.protocol.spaces: the baseline's space through the
variant's boosters; the same trials and steps for every variant), then every seed. Verdicts and
intervals against the baseline, and the choice (the best validation mean), are made on validation
with the test split sealed; only the chosen variant's cells are tested, once each (`test: chosen`,
into the project's test ledger). A method that does not apply is listed with the reason.

Budget: `steps` is train.max_steps of every trial and cell, the same for every variant (TAPT and
DAPT first train their `adapt_steps`, plae its teacher: in their cost). `time_budget` is shared by
the variants as honelm.protocol.spaces says: each in turn gets an equal share of what is left; its
search starts no new trial once its part of the share is used; a variant left with no time, or
whose search finished no trial, is reported as such, never dropped silently.

OUT_DIR/report.md (+ .html, `honelm report OUT_DIR`): what was tried and what was not (why), what
each cost, what won and by how much (interval on validation), the one test number; then the
ablation's report. Resumable like `ablate`: the same command again reuses every finished trial,
cell and test look, and continues the rest (with the time budget afresh). The settings are read as
`BoostConfig` by honelm.config's `from_mapping`; `honelm boost --help` lists every field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml

from honelm import config as C
from honelm import registry
from honelm.boosters.adversarial import REGISTRY as ADVERSARIAL_METHODS
from honelm.bounds import at_least, between
from honelm.errors import ConfigError, HonelmError
from honelm.pipeline import _as_override, _flatten
from honelm.protocol import ablate, stats
from honelm.reporting import finish_report, fmt_duration_short, table
from honelm.stages.adapt import Adapt
from honelm.stages.classify import Classification, ClassifyConfig
from honelm.stages.distill import Distillation, DistillConfig
from honelm.stages.resolve import init_kind

BOOST_FILE = "boost.json"  # marks a boost directory (honelm report recognises it)
ABLATION_YAML = "ablation.yaml"  # the generated ablation file, beside its cells
TAPT, DAPT, LORA, DISTILL = "tapt", "dapt", "lora", Distillation.name
METHODS = (TAPT, DAPT, LORA, DISTILL, *ADVERSARIAL_METHODS)
DEFAULT_METHODS = (TAPT, DAPT, LORA, "fgm", "freelb", "smart", "plae", DISTILL)
NESTED = ("set", "search")  # mapping fields a `key=value` may reach into: set.data.train=...


@dataclass
class BoostConfig:
    """`honelm boost`: a classification task, the methods to try and the budget."""

    out_dir: str = ""
    """Directory of everything boost writes: the generated ablation.yaml, its cells and searches, the report.
    Required."""
    config: str = ""
    """The task's classify config: a preset name (configs/classify/NAME.yaml) or a YAML path; empty = classify's
    defaults."""
    vars: dict[str, str] = field(default_factory=dict)
    """Values of the `config` preset's vars (${vars.NAME} in it, e.g. where its data is; docs/presets.md); on the
    command line --var NAME=VALUE."""
    set: dict[str, Any] = field(default_factory=dict)
    """Settings of the task's classify config on top of `config` (dotted keys or nested mappings; on the command line
    set.KEY=VALUE): data.train (required somewhere), the starting model (model.init_from, or a preset's model.arch
    and model.size), ..."""
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """What to try besides the baseline: tapt, dapt, lora, distill and adversarial methods (fgm, pgd, freelb, smart,
    r3f, vat, neftune, plae). One that does not apply (dapt without domain_text, distill without teacher, tapt
    without a pre-trained model that adapt continues, an adversarial method the stage refuses) is listed, with why."""
    domain_text: str = ""
    """Unlabelled in-domain text for DAPT (files, directories or globs, comma-separated: adapt's data.train); empty =
    no DAPT."""
    teacher: str = ""
    """The teacher of the distillation variant: a classify run or model directory with the task's labels (distill's
    teacher.model); the student is the baseline's model. Empty = no distillation."""
    steps: Annotated[int, at_least(0)] = 0
    """Optimizer steps of every trial and cell (train.max_steps of the compared stage), the same for every variant;
    0 = the config's own budget."""
    adapt_steps: Annotated[int, at_least(0)] = 0
    """Optimizer steps of the TAPT and DAPT runs (adapt's train.max_steps); 0 = `steps`, or adapt's own (one epoch)
    when steps is 0 too."""
    time_budget: Annotated[float, at_least(0)] = 0.0
    """Wall-clock seconds for one invocation, 0 = none: the variants still to run share what is left equally, each in
    turn, and a variant's search starts no new trial after its part of the share (honelm.protocol.spaces); one left
    with no time, or whose search finished no trial, is reported as such. Running the command again continues."""
    n_trials: Annotated[int, at_least(1)] = 4
    """Trials of each variant's own search on validation (the same for every variant)."""
    seeds: Annotated[int, at_least(1)] = 1
    """Seeds per variant after its search (seeds 0..N-1); with one, training noise is not in the intervals."""
    space: dict[str, Any] = field(default_factory=dict)
    """The baseline's search space (a search file's `space`); empty = train.lr a factor 3 either side of the config's.
    Each variant searches it through its boosters (LoRA: lr 10x higher; adversarial: the method's strength)."""
    search: dict[str, Any] = field(default_factory=dict)
    """More fields of every variant's search (sampler, pruner, prune_after, seed, metric): an ablation's `search`
    section without n_trials, space and timeout, which boost sets."""
    metric: str = "accuracy"
    """Validation metric of the intervals, verdicts and choice: accuracy, macro_f1, mse or pearson."""
    bootstrap: Annotated[int, at_least(100)] = 2000
    """Paired-bootstrap resamples of each interval (at least 100)."""
    confidence: Annotated[float, between(0.5, 1, open_hi=True)] = 0.95
    """Confidence level of the intervals, in [0.5, 1)."""

    def validate(self) -> None:
        if not self.out_dir.strip():
            raise C.FieldError("out_dir", "missing")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise C.FieldError("methods", f"{', '.join(unknown)}: not among {', '.join(METHODS)}")
        for name in ("steps", "adapt_steps"):
            if getattr(self, name) < 0:
                raise C.FieldError(name, "must be a non-negative integer (0 = the config's own)")
        if self.n_trials < 1 or self.seeds < 1:
            raise C.FieldError("n_trials" if self.n_trials < 1 else "seeds", "must be at least 1")
        if self.time_budget < 0:
            raise C.FieldError("time_budget", "must be a number of seconds (0 = none)")
        taken = sorted({"n_trials", "space", "timeout", "verb", "config", "set", "out_dir"} & set(self.search))
        if taken:
            raise C.FieldError("search", f"{', '.join(taken)}: set by boost (use its own fields)")


# ----------------------------------------------------------------------------------------------
# the ablation boost runs


def _overrides(cfg: BoostConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compared stage's settings: the task's, the step budget, `extra`."""
    settings = dict(_flatten(cfg.set))
    if cfg.steps:
        settings["train.max_steps"] = cfg.steps
    return {**settings, **(extra or {})}


def _build(cls: type, path: str, settings: dict[str, Any], variables: dict[str, str]) -> Any:
    return C.build(cls, path or None, [f"{k}={_as_override(v)}" for k, v in settings.items()],
                   variables if path else None)


def _adapt_stage(cfg: BoostConfig, task: ClassifyConfig, name: str, text: dict[str, Any]) -> dict[str, Any]:
    """A shared before-stage that continues the starting model on `text` (adapt's data.* or task.* settings)."""
    steps = cfg.adapt_steps or cfg.steps
    settings = {**text, "model.init_from": task.model.init_from, "model.trust_remote_code": task.model.trust_remote_code,
                "data.block_size": task.data.max_length}
    if steps:
        settings["train.max_steps"] = steps
    return {"name": name, "verb": Adapt.name, "shared": True, "set": settings}


def _adapted(cfg: BoostConfig, task: ClassifyConfig, name: str) -> tuple[dict[str, Any] | None, str]:
    """The TAPT or DAPT variant (its adapt stage, then the baseline from it), or why it does not apply."""
    if name == DAPT and not cfg.domain_text:
        return None, "no domain text given (domain_text=FILES)"
    if not task.model.init_from:
        return None, "the starting model is a preset's random init: there is no pre-trained model to continue"
    try:
        init_kind(task.model)
    except HonelmError as e:
        return None, f"adapt cannot continue {task.model.init_from}: {e}"
    # the task, split exactly as the classify stage splits it: TAPT trains on its train text; DAPT
    # names it only so that adapt's leak guard keeps its validation/test texts out of the domain text
    text = {f"task.{f.name}": getattr(task.data, f.name) for f in dataclasses.fields(task.data)}
    if name == DAPT:
        text.update({"data.train": cfg.domain_text, "adapt.task_guard_only": True})
    return {"before": [_adapt_stage(cfg, task, name, text)], "set": {"model.init_from": "${" + name + "}"}}, ""


def _variant(cfg: BoostConfig, path: str, task: ClassifyConfig, method: str) -> tuple[dict[str, Any] | None, str]:
    """The ablation variant of one method, or (None, why it does not apply)."""
    if method in (TAPT, DAPT):
        return _adapted(cfg, task, method)
    if method == DISTILL:
        if not cfg.teacher:
            return None, "no teacher given (teacher=RUN)"
        body: dict[str, Any] = {"verb": Distillation.name, "set": {"teacher.model": cfg.teacher}}
        cls = DistillConfig
    else:
        body = {"set": {"lora.enabled": True} if method == LORA else {"adversarial.method": method}}
        cls = ClassifyConfig
    try:  # the stage × booster checks, before anything runs
        _build(cls, path, _overrides(cfg, body["set"]), cfg.vars)
    except ConfigError as e:
        return None, str(e)
    return body, ""


def ablation(cfg: BoostConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """The ablation boost runs (an ablation file's mapping) and {method: why it is not tried}."""
    path = str(registry.find_config(Classification.name, cfg.config).resolve()) if cfg.config else ""
    task = _build(ClassifyConfig, path, _overrides(cfg), cfg.vars)
    variants, not_tried = {}, {}
    for method in dict.fromkeys(cfg.methods):
        body, why = _variant(cfg, path, task, method)
        if body is None:
            not_tried[method] = why
        else:
            variants[method] = body
    search = {**cfg.search, "n_trials": cfg.n_trials, **({"space": cfg.space} if cfg.space else {})}
    stage = {"name": Classification.name, "verb": Classification.name, "set": _overrides(cfg),
             **({"config": path, "args": [w for k, v in cfg.vars.items() for w in ("--var", f"{k}={v}")]}
                if path else {})}
    return {"out_dir": cfg.out_dir, "seeds": cfg.seeds, "metric": cfg.metric, "bootstrap": cfg.bootstrap,
            "confidence": cfg.confidence, "test": "chosen", "time_budget": cfg.time_budget, "stages": [stage],
            "search": search, "variants": variants}, not_tried


def run_boost(cfg: BoostConfig, ledger: str | None = None) -> Path:
    """Write OUT_DIR/ablation.yaml and boost.json, run (or continue) the ablation, write the report; its path."""
    out = Path(cfg.out_dir)
    mapping, not_tried = ablation(cfg)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ABLATION_YAML
    path.write_text(f"# written by `honelm boost` (see {BOOST_FILE}); `honelm ablate {path}` runs the same ablation\n"
                    + yaml.safe_dump(mapping, sort_keys=False, allow_unicode=True), encoding="utf-8")
    marker = {"kind": "boost", "config": dataclasses.asdict(cfg), "tried": [ablate.BASELINE, *mapping["variants"]],
              "not_tried": not_tried}
    (out / BOOST_FILE).write_text(json.dumps(marker, indent=2, default=str), encoding="utf-8")
    for method, why in not_tried.items():
        print(f"boost: not trying {method}: {why}", flush=True)
    spec = ablate.load_spec(path, ledger=ledger)
    ablate.run_ablation(spec)
    return write_report(out, spec.ledger)


# ----------------------------------------------------------------------------------------------
# the report


def _search_cost(out: Path, variant: str) -> tuple[float, int]:
    """(seconds of every trial of the variant's search, trials complete)."""
    trials = out / "cells" / variant / "search" / "trials.jsonl"
    lines = trials.read_text(encoding="utf-8").splitlines() if trials.is_file() else []
    rows = [json.loads(x) for x in lines if x.strip()]
    return sum(r.get("time_s") or 0.0 for r in rows), sum(r["state"] == "complete" for r in rows)


def _ci(row: dict[str, Any]) -> str:
    if row.get("low") is None:
        return "—"
    return f"{row['diff']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}] ({row['verdict']})"


def _cost_lines(out: Path, meta: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """What was tried and what each cost: validation result, search time, training time, trials."""
    seeds, body = len(results.get("seeds") or [1]), []
    rows = {r["variant"]: r for r in results.get("rows", [])}
    for name in meta["tried"]:
        spent, complete = _search_cost(out, name)
        row = rows.get(name)
        why = (results.get("skipped") or {}).get(name, "not run yet")
        train = row["train_time_s"] * len(row["seeds"]) if row and row.get("train_time_s") is not None else None
        body.append([name, f"{row['mean']:.4f}" + (f" ± {row['std']:.4f}" if seeds > 1 and math.isfinite(row["std"])
                                                   else "") if row else why,
                     "—" if name == ablate.BASELINE else (_ci(row) if row else "—"), complete,
                     fmt_duration_short(spent), fmt_duration_short(train) if train is not None else "—",
                     fmt_duration_short(spent + (train or 0.0)),
                     f"{row['trainable_params']:,}" if row and row.get("trainable_params") else "—"])
    metric = results.get("metric", meta["config"]["metric"])
    return ["## What was tried, and what each cost", "",
            *table(["variant", f"validation {metric}", "Δ vs baseline [CI] (verdict)", "trials complete",
                    "search time", f"training time ({seeds} seed{'s' if seeds > 1 else ''})", "total", "trainable"],
                   body), "",
            *(["Not tried: " + "; ".join(f"**{m}**: {why}" for m, why in meta["not_tried"].items()) + ".", ""]
              if meta["not_tried"] else [])]


def _winner_lines(results: dict[str, Any]) -> list[str]:
    """What won and by how much (on validation), and the one test number."""
    chosen, metric = results.get("chosen"), results.get("metric", "accuracy")
    if chosen is None:
        return ["## Winner", "", "Nothing chosen yet: some variants have not finished. Run the same command again to "
                "continue.", ""]
    rows = {r["variant"]: r for r in results["rows"]}
    best = rows[chosen]
    if chosen == ablate.BASELINE:
        others = [r for r in results["rows"] if r["variant"] != ablate.BASELINE]
        sign = -1.0 if metric in stats.LOWER_IS_BETTER else 1.0
        closest = max(others, key=lambda r: sign * r["mean"], default=None)
        won = ("**No method beat the baseline on validation.**"
               + (f" The closest, {closest['variant']}: Δ {_ci(closest)}." if closest else ""))
    else:
        won = f"**{chosen} won on validation**: Δ {metric} vs baseline {_ci(best)}."
    test = [r for r in results.get("test_rows") or [] if r["variant"] == chosen]
    number = (f"**Test {metric} of {chosen}: {test[0]['mean']:.4f}**"
              + (f" ± {test[0]['std']:.4f} over {len(test[0]['seeds'])} seeds" if len(test[0]["seeds"]) > 1 else "")
              + ", read once, after the choice: the number to report." if test else "Not tested yet.")
    return ["## Winner", "", won, "", number, ""]


def write_report(path: Path, ledger: str | Path | None = None) -> Path:
    """OUT_DIR/report.md (+ .html): the boost summary, then the ablation's own report below it."""
    meta = json.loads((path / BOOST_FILE).read_text(encoding="utf-8"))
    body = ablate.write_report(path, ledger).read_text(encoding="utf-8").splitlines()[1:]  # without its title
    results_path = path / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
    c = meta["config"]
    budget = (f"{c['steps']} steps per trial and cell" if c["steps"] else "the config's own steps per trial and cell") \
        + (f", {c['time_budget']:g} s of wall time shared by the variants" if c["time_budget"] else "")
    lines = [f"# Boost report: {path.name}", "",
             f"Tried on the task: {', '.join(meta['tried'])}; each with its own {c['n_trials']}-trial search on "
             f"validation, {c['seeds']} seed{'s' if c['seeds'] > 1 else ''} after it; budget: {budget}. The winner is "
             "the best validation mean; only it was tested, once. Validation picked the hyperparameters and the "
             "checkpoints too, so every validation number is somewhat optimistic, for all alike.", ""]
    lines += _winner_lines(results) if results else ["No results yet.", ""]
    lines += _cost_lines(path, meta, results) if results else []
    return finish_report(path, [*lines, "# The ablation behind it", "", f"`honelm ablate {path / ABLATION_YAML}` runs "
                                "it the same way.", "", *body])


# ----------------------------------------------------------------------------------------------
# the verb


def load_config(file: str | None, pairs: list[tuple[str, str]], variables: dict[str, str] | None = None
                ) -> BoostConfig:
    """BoostConfig from an optional YAML file with `key=value` on top (`set.KEY=VALUE` into `set`, `search.KEY=VALUE`
    into `search`) and `variables` (--var) into `vars`."""
    source: str | Path = "the command line"
    raw: dict[str, Any] = {}
    if file:
        source = Path(file)
        read = C.read_yaml(source, "boost file", C.LineLoader)
        if not isinstance(read, dict):
            raise ConfigError(f"{source}: a boost file is a mapping of BoostConfig's fields (honelm boost --help)")
        raw = dict(read)
    for key, value in pairs:
        head, _, rest = key.partition(".")
        if rest and head in NESTED:  # set.data.train=..., search.pruner=...
            raw[head] = {**dict(_flatten(raw.get(head) or {})), rest: yaml.safe_load(value)}
        else:
            raw[key] = value
    if variables:
        raw["vars"] = {**(raw.get("vars") or {}), **variables}
    return C.from_mapping(BoostConfig, raw, source)


def main(argv: list[str]) -> Path:
    p = argparse.ArgumentParser(prog="honelm boost", description="Try every booster on a classification task (TAPT, "
                                "DAPT, LoRA, adversarial training, plae, distillation), each with its own search on "
                                "validation; choose the best on validation, test it once, write one report.",
                                epilog=C.fields_help(BoostConfig, "fields (key=value, or a YAML file of them):"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", metavar="[FILE] key=value", help="a YAML file (or a preset name: "
                   "configs/boost/NAME.yaml) of the fields and/or "
                   "key=value (set.KEY=VALUE: a setting of the task's classify config; search.KEY=VALUE likewise)")
    p.add_argument("--ledger", default=None, metavar="PATH", help="the project's test ledger (default: as ablate's)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="a value for the task config's vars (e.g. where its data is)")
    args = p.parse_intermixed_args(argv)
    words = list(args.settings)
    file = words.pop(0) if words and "=" not in words[0] else None
    cfg = load_config(str(registry.find_config("boost", file)) if file else None, C.parse_overrides(words),
                      dict(C.parse_overrides(args.var)))
    report = run_boost(cfg, args.ledger)
    results = json.loads((Path(cfg.out_dir) / "results.json").read_text(encoding="utf-8"))
    print("\n" + "\n".join(_winner_lines(results)[2:]).replace("**", "").strip())
    print(f"\nreport: {report}")
    return report


def is_boost(path: Path) -> bool:
    """Whether `path` is a boost directory (its report is boost's)."""
    return (path / BOOST_FILE).is_file()
