"""`honelm search FILE`: hyperparameter search with Optuna, on the validation split only.

    # honelm search configs/search/demo.yaml
    verb: classify                      # any training verb
    config: demo                        # its base preset or YAML (optional)
    set: {train.max_steps: 60}          # fixed settings: dotted keys or nested mappings
    out_dir: runs/search/demo           # the study, the trials' runs and every output
    metric: val_accuracy                # a validation metric the stage logs
    direction: maximize                 # optional: default min for losses/mse/ppl/bpb, else max
    sampler: tpe                        # tpe | qmc | random | grid
    pruner: median                      # median | halving | none (from intermediate validations)
    prune_after: 0.5                    # no trial is stopped in this first share of its steps (0 = none spared)
    n_trials: 8
    timeout: 0                          # seconds for this invocation; 0 = no limit
    seed: 0                             # the sampler's seed
    space:
      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}   # float range (log scale)
      train.batch_size: [16, 32]                         # a list: categorical choices
      lora.r: {low: 4, high: 16, step: 4}                # int range when low/high are ints
      adversarial.method: {values: [none, fgm]}          # the same as a list

The file is read as `SearchConfig` (each dimension a `RangeConfig`) by honelm.config's
`from_mapping`; `honelm search --help` lists every field.

Every trial is one ordinary run of the verb (its directory under OUT_DIR/trials/), built from the
base config, the fixed settings and the sampled values, with `train.metric` set to the search's
metric so the checkpoint each trial keeps is the one the search scores it by (its best
validation value). The whole search runs inside `forbid_test_split`: nothing reachable from it
can read the test split, not even `honelm test`; test the winner once afterwards.

Resuming: the study lives in OUT_DIR/study.db (SQLite). Running the same command again continues
the same study up to `n_trials` finished (complete or pruned) trials. A trial that was running
when the process died or was interrupted, or that failed (its error is in the trials' `error`
column), is marked failed and its parameters are tried again first. With `--storage URL`
(e.g. postgresql://...) several machines can work on one study; stale trials are then detected
by heartbeat and retried (Optuna's RetryHeartbeatStaleTrialCallback).

Outputs, rewritten after every trial: trials.jsonl and trials.csv, best.json, best.yaml (the best
trial's config, ready for `honelm VERB --config best.yaml`), a `best` link to the best trial's
run (its best/ model is the search's best checkpoint), plots/ (optimisation history, parameter
importances, parallel coordinates) and report.md/report.html (`honelm report OUT_DIR`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence

import matplotlib
import matplotlib.pyplot as plt
import optuna
from sqlalchemy.engine import make_url  # optuna's RDB storage depends on sqlalchemy

from honelm import config as C
from honelm import registry
from honelm.bounds import ANY, above, at_least, between
from honelm.data.splits import forbid_test_split
from honelm.errors import ConfigError, HonelmError, TrainingError
from honelm.loop import Callback, TrainState, metric_is_min
from honelm.pipeline import _as_override, _flatten
from honelm.protocol import ledger as L
from honelm.reporting import fenced, finish_report, fmt, fmt_duration_short, fmt_value, table

SEARCH_FILE = "search.json"  # marks a search directory (honelm report/test recognise it)


# ----------------------------------------------------------------------------------------------
# the search file


@dataclass
class Param:
    """One dimension of the space: categorical `choices`, or a numeric range."""

    key: str
    choices: list[Any] | None = None
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high)) and \
            (self.step is None or isinstance(self.step, int))

    def grid_values(self) -> list[Any]:
        """Every value of this dimension for the grid sampler (ranges need an int step)."""
        if self.choices is not None:
            return list(self.choices)
        if self.is_int and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))  # type: ignore[arg-type]
        raise ConfigError(f"space.{self.key}: the grid sampler needs finite values: give a list (or values: [...]) "
                          "or an int range with a step")

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        scale = " (log)" if self.log else ""
        step = f" step {self.step}" if self.step is not None else ""
        return f"{self.low} … {self.high}{step}{scale}"


@dataclass
class SearchSpec:
    """A search as the file (and the command line) gives it."""

    path: Path
    verb: str
    out_dir: Path
    metric: str
    space: list[Param]
    config: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    direction: str = ""
    sampler: str = "tpe"
    pruner: str = "median"
    n_trials: int = 10
    timeout: float = 0.0
    seed: int = 0
    keep_models: str = "best"
    study: str = "honelm"
    storage: str = ""  # set by --storage; default sqlite in out_dir
    variables: dict[str, str] = field(default_factory=dict)  # the base preset's vars (not part of the identity)
    prune_after: float = 0.5  # share of a trial's planned steps in which the pruner stops nothing

    @property
    def minimize(self) -> bool:
        return self.direction == "minimize" if self.direction else metric_is_min(self.metric, "auto")

    def identity(self) -> str:
        """What must not change between invocations on one study (the space, the metric, the base)."""
        ident = {"verb": self.verb, "config": self.config, "set": self.settings, "metric": self.metric,
                 "minimize": self.minimize, "space": [dataclasses.asdict(p) for p in self.space]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trainable_verbs() -> list[str]:
    """The verbs a search can run: those that train a model and select a checkpoint on validation."""
    return registry.training_verbs()


@dataclass
class RangeConfig:
    """One dimension of a search space: a list of choices, or a numeric range."""

    values: list[Any] | None = None
    """Categorical choices (distinct); a plain list in place of the mapping means the same."""
    low: Annotated[int | float | None, ANY] = None
    """Lowest value of a range (ints on both ends and in step make an int range)."""
    high: Annotated[int | float | None, ANY] = None
    """Highest value of a range (included)."""
    step: Annotated[int | float | None, above(0)] = None
    """Spacing of a range's values; none = continuous (or every int)."""
    log: bool = False
    """Sample the range on a log scale (needs low > 0; not with step)."""

    @staticmethod
    def shorthand(value: Any) -> dict[str, Any]:
        """`[a, b]` stands for `{values: [a, b]}`."""
        if not isinstance(value, list):
            raise ValueError("must be a list of choices or a mapping with low/high (or values)")
        return {"values": value}

    def validate(self) -> None:
        if self.values is not None:
            if not self.values or len(set(map(repr, self.values))) != len(self.values):
                raise C.FieldError("values", "must be a non-empty list of distinct values")
            if (self.low, self.high, self.step, self.log) != (None, None, None, False):
                raise ValueError("give either values or low/high, not both")
            return
        for name in ("low", "high"):
            if getattr(self, name) is None:
                raise C.FieldError(name, "must be a number (got None)")
        if not self.low < self.high:  # type: ignore[operator]
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:  # type: ignore[operator]
            raise ValueError("a log scale needs low > 0")
        if self.step is not None and self.step <= 0:
            raise C.FieldError("step", "must be a positive number")
        if self.step is not None and self.log:
            raise ValueError("step and log cannot be combined")

    def param(self, key: str) -> Param:
        """The dimension as the search uses it, for the config key `key`."""
        if self.values is not None:
            return Param(key, choices=self.values)
        return Param(key, low=self.low, high=self.high, step=self.step, log=self.log)


@dataclass
class SearchConfig:
    """A search file (configs/search/*.yaml): the verb and its base config, the metric, the space, the budget."""

    verb: str = ""
    """The training verb every trial runs (pretrain, adapt, classify, sft, reward, dpo, ppo). Required."""
    config: str = ""
    """The verb's base preset name or YAML path; empty = the verb's defaults."""
    set: dict[str, Any] = field(default_factory=dict)
    """Fixed settings of every trial: dotted keys or nested mappings (the command line's key=value add to them)."""
    vars: dict[str, str] = field(default_factory=dict)
    """Values of the base preset's vars (${vars.NAME} in it), e.g. where its data is; --var NAME=VALUE adds one."""
    out_dir: str = ""
    """Directory of the study (study.db), the trials' runs and every output (--out-dir overrides it). Required."""
    metric: str = ""
    """The validation metric (val_*) that scores a trial: its best value during the run. Required."""
    direction: Literal["", "minimize", "maximize"] = ""
    """Whether a smaller metric is better; empty = min for losses, mse, perplexity and bpb, else max."""
    sampler: Literal["tpe", "qmc", "random", "grid"] = "tpe"
    """Optuna sampler. tpe: random for its first 10 trials, then model-based. qmc: a scrambled Sobol sequence (after
    a random first trial), which spreads a few trials over the whole range where independent random draws may fall
    together (for budgets of a handful of trials, as ablations use; needs scipy: pip install 'honelm[qmc]'). grid needs finite dimensions (choices, or int
    ranges with a step)."""
    pruner: Literal["median", "halving", "none"] = "median"
    """Stops unpromising trials at an intermediate validation: median, successive halving, or none."""
    prune_after: Annotated[float, between(0, 1, open_hi=True)] = 0.5
    """Share of a trial's planned steps before which the pruner stops nothing (its validations are still reported):
    early validations rank learning rates by how fast they start, not where they end. 0 = from the first."""
    n_trials: Annotated[int | None, at_least(0)] = None
    """Finished (complete or pruned) trials to reach; empty = 10, or the whole grid with the grid sampler (--n-trials)."""
    timeout: Annotated[float, at_least(0)] = 0.0
    """Seconds after which this invocation starts no new trial; 0 = no limit (--timeout)."""
    seed: Annotated[int, at_least(0)] = 0
    """Seed of the sampler."""
    keep_models: Literal["best", "all"] = "best"
    """Which trials keep their best/ model on disk: only the best trial's, or all."""
    study: str = "honelm"
    """Name of the Optuna study in the storage; empty = honelm."""
    storage: str = ""
    """Optuna storage URL shared by several workers (usually --storage); empty = sqlite in OUT_DIR/study.db."""
    space: dict[str, RangeConfig] = field(default_factory=dict)
    """The searched config keys of the verb (dotted), each a range or a list of choices. At least one."""

    def validate(self) -> None:
        for name in ("verb", "out_dir", "metric"):
            if not getattr(self, name).strip():
                raise C.FieldError(name, "missing")
        if self.verb not in trainable_verbs():
            raise C.FieldError("verb", f"{self.verb!r} is not a training verb ({', '.join(trainable_verbs())})")
        if not self.metric.startswith("val_"):
            raise C.FieldError("metric", f"{self.metric!r} is not a validation metric (val_*): a search selects on "
                               "validation only")
        if not self.space:
            raise C.FieldError("space", "must map config keys to their ranges or choices")
        for name in ("n_trials", "seed"):
            if (getattr(self, name) or 0) < 0:
                raise C.FieldError(name, "must be a non-negative integer")
        if self.timeout < 0:
            raise C.FieldError("timeout", "must be a number of seconds (0 = none)")


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
              variables: dict[str, str] | None = None) -> SearchSpec:
    """Read and check a search file; `overrides` are the command line's options (n_trials, timeout,
    storage, out_dir), `settings` its extra `key=value` fixed settings, `variables` its --var values."""
    p = Path(path)
    raw = C.read_yaml(p, "search file", C.LineLoader)
    if settings and isinstance(raw, dict):
        raw["set"] = {**dict(_flatten(raw.get("set") or {})), **settings}
    if variables and isinstance(raw, dict):
        raw["vars"] = {**(raw.get("vars") or {}), **variables}
    return spec_from_mapping(raw, p, overrides)


def spec_from_mapping(raw: Any, p: Path, overrides: dict[str, Any] | None = None) -> SearchSpec:
    """A SearchSpec from a parsed mapping (a search file, or an ablation's `search` section)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a search file is a mapping with verb, out_dir, metric and space")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    cfg = C.from_mapping(SearchConfig, raw, p)
    space = [dim.param(key) for key, dim in cfg.space.items()]
    spec = SearchSpec(p, cfg.verb, Path(cfg.out_dir), cfg.metric, space, cfg.config, dict(_flatten(cfg.set)),
                      cfg.direction, cfg.sampler, cfg.pruner, 10 if cfg.n_trials is None else cfg.n_trials,
                      cfg.timeout, cfg.seed, cfg.keep_models, cfg.study or "honelm", cfg.storage, dict(cfg.vars),
                      cfg.prune_after)
    if spec.sampler == "qmc" and importlib.util.find_spec("scipy") is None:  # refused before any trial runs
        raise ConfigError(f"{p}: sampler: qmc draws its Sobol sequence with scipy, which is not installed: "
                          "pip install 'honelm[qmc]' (or scipy), or choose sampler: tpe, random or grid")
    if spec.sampler == "grid":  # every dimension must be finite; by default the whole grid is tried
        size = math.prod(len(prm.grid_values()) for prm in space)
        if cfg.n_trials is None:
            spec.n_trials = size
    check_spec(spec)
    return spec


def config_class(verb: str) -> type:
    return registry.config_class(verb)


def trial_overrides(spec: SearchSpec, params: dict[str, Any], run_dir: Path) -> list[str]:
    """The `key=value` overrides of one trial: fixed settings, sampled values, where it runs, what it keeps."""
    out = [f"{k}={_as_override(v)}" for k, v in spec.settings.items()]
    out += [f"{k}={_as_override(v)}" for k, v in params.items()]
    out += [f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", "run.overwrite=true",
            f"train.metric={spec.metric}", f"train.metric_mode={'min' if spec.minimize else 'max'}"]
    return out


def build_trial_config(spec: SearchSpec, params: dict[str, Any], run_dir: Path) -> Any:
    cls = config_class(spec.verb)
    base = registry.find_config(spec.verb, spec.config) if spec.config else None
    return C.build(cls, base, trial_overrides(spec, params, run_dir), spec.variables)


def check_spec(spec: SearchSpec) -> None:
    """Before any trial: every key exists (did-you-mean), fixed settings don't fight the space, and the
    config builds at the corners of the space (types checked, `validate()` run)."""
    cls = config_class(spec.verb)
    known = C.all_keys(cls)
    for prm in spec.space:
        if prm.key not in known:
            raise ConfigError(f"{spec.path}: space: {C.unknown_key(prm.key, cls)}")
        if prm.key in spec.settings:
            raise ConfigError(f"{spec.path}: '{prm.key}' is both searched (space) and fixed (set)")
        if prm.key.startswith("run.") or prm.key in ("train.metric", "train.metric_mode"):
            raise ConfigError(f"{spec.path}: space.{prm.key}: the search owns this key")
    fixed_metric = spec.settings.get("train.metric")
    if fixed_metric and fixed_metric != spec.metric:
        raise ConfigError(f"{spec.path}: set train.metric={fixed_metric} but the search scores trials by {spec.metric}; "
                          "each trial keeps the checkpoint the search scores, so drop train.metric")
    corners = [{}, {}]  # type: list[dict[str, Any]]
    for prm in spec.space:
        if prm.choices is not None:
            corners[0][prm.key], corners[1][prm.key] = prm.choices[0], prm.choices[-1]
        else:
            corners[0][prm.key], corners[1][prm.key] = prm.low, prm.high
    for corner in corners:
        try:
            build_trial_config(spec, corner, spec.out_dir / "trials" / "check")
        except ConfigError as e:
            raise ConfigError(f"{spec.path}: the config does not build with {corner}: {e}") from None


# ----------------------------------------------------------------------------------------------
# the study


def _quiet_optuna() -> None:
    """Before a search: Optuna logs warnings only (we print our own one line per trial), and its
    experimental-feature warnings (the heartbeat retry, the matplotlib plots) are not shown."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(spec: SearchSpec) -> Any:
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid_values() for p in spec.space}, seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "qmc":
        # Optuna draws the first trial at random (it fixes the space) and categorical dimensions always: both by
        # design, so its warnings about them would only be noise in every search log
        with warnings.catch_warnings():  # "experimental" since Optuna 3.0; the interface used here is stable
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=spec.seed,
                                              warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=spec.seed)


def make_pruner(spec: SearchSpec) -> Any:
    if spec.pruner == "median":  # no pruning until a few trials have finished: their medians are the bar
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def storage_for(spec: SearchSpec) -> Any:
    if spec.storage:  # shared: several processes/machines; stale trials found by heartbeat and retried
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9 renamed the hook
            retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
        else:
            retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
        return optuna.storages.RDBStorage(spec.storage, heartbeat_interval=60, grace_period=180, **retry)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{(spec.out_dir / 'study.db').resolve()}")


def suggest(trial: Any, prm: Param) -> Any:
    if prm.choices is not None:
        return trial.suggest_categorical(prm.key, prm.choices)
    if prm.is_int:
        return trial.suggest_int(prm.key, int(prm.low), int(prm.high), step=int(prm.step or 1), log=prm.log)  # type: ignore[arg-type]
    return trial.suggest_float(prm.key, float(prm.low), float(prm.high), step=prm.step, log=prm.log)  # type: ignore[arg-type]


@dataclass
class _Lock:
    """An exclusive lock on the search directory while a local (SQLite) search runs in it."""

    path: Path
    handle: Any = None

    def __enter__(self) -> "_Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise HonelmError(f"{self.path.parent}: another `honelm search` is running in this directory "
                              "(to share one study between processes, give them --storage URL)") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _recover(study: Any, storage: Any, spec: SearchSpec) -> int:
    """Trials left RUNNING by a dead process (we hold the directory's lock, so none is alive), failed by an
    interrupt or by an error: mark them failed and try their parameters again first, once per failed trial (a
    retry that fails is itself retried by the next run). A grid sampler counts a failed point as visited, so
    without this its value would never be tried again. Returns how many."""
    TS = optuna.trial.TrialState
    retried_path = spec.out_dir / "retried.json"
    retried = set(json.loads(retried_path.read_text())) if retried_path.is_file() else set()
    again = 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False):
        stale = t.state == TS.RUNNING and not spec.storage
        if stale:
            storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number), TS.FAIL)
        if (stale or t.state == TS.FAIL) and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            retried.add(t.number)
            again += 1
    if again:
        retried_path.write_text(json.dumps(sorted(retried)))
    return again


def _finished(study: Any) -> int:
    TS = optuna.trial.TrialState
    return sum(t.state in (TS.COMPLETE, TS.PRUNED) for t in study.get_trials(deepcopy=False))


def _best_value(run_dir: Path) -> float | None:
    path = run_dir / "best" / "best.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("value")
    return float(value) if isinstance(value, (int, float)) else None


def _open_study(spec: SearchSpec, storage: Any) -> Any:
    """The spec's Optuna study, created or loaded; one started with another verb, config or space is refused."""
    study = optuna.create_study(storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec),
                                study_name=spec.study, direction="minimize" if spec.minimize else "maximize",
                                load_if_exists=True)
    ident = study.user_attrs.get("identity")
    if ident is None:
        study.set_user_attr("identity", spec.identity())
        study.set_user_attr("spec", {"verb": spec.verb, "config": spec.config, "set": spec.settings,
                                     "metric": spec.metric, "space": [dataclasses.asdict(p) for p in spec.space]})
    elif ident != spec.identity():
        raise HonelmError(f"{spec.out_dir}: this study was started with a different verb, base config, settings, "
                          f"metric or space; use another out_dir (or --study NAME) for the new search, or delete "
                          f"{spec.out_dir} to start over")
    return study


class _Pruner(Callback):
    """The trial's run reports `metric` at every validation to Optuna, which may stop it there ("pruned") once
    the run is `after` of the way through its planned steps. Why wait: at the first validations a faster-starting
    rate leads, so the median of earlier trials there prunes trials that would have finished as well (measured on
    SST-2, MiniLM, 188 steps: a LoRA trial at lr 1.9e-4 pruned at step 31 with 0.558, where an earlier one at 2.0e-4
    stood at 0.560 and finished at 0.848; docs/protocol.md). Optuna's own `n_warmup_steps` counts steps, the same for
    every trial; a share of each trial's own plan is what stays fair when the batch size (so the step count) is
    searched too."""

    def __init__(self, trial: Any, metric: str, after: float) -> None:
        self.trial, self.metric, self.after = trial, metric, after

    def after_eval(self, state: TrainState, metrics: dict[str, float]) -> str | None:
        if self.metric not in metrics:
            return None
        self.trial.report(float(metrics[self.metric]), state.step)
        if state.step < self.after * state.total:  # reported (the pruner's medians need it), never judged yet
            return None
        return "pruned" if self.trial.should_prune() else None


def run_search(spec: SearchSpec, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run (or continue) the study until n_trials trials are finished or the timeout passes; returns best.json
    (+ `"stop_requested": True` if a stop came as a trial finished). `callbacks` reach every trial's run."""
    _quiet_optuna()
    stopped = False  # a stop that came as a trial finished: that trial counts, no other starts
    trials_dir = spec.out_dir / "trials"
    spec.out_dir.mkdir(parents=True, exist_ok=True)  # with --storage URL nothing else creates it before the marker
    with _Lock(spec.out_dir / ".lock") if not spec.storage else contextlib.nullcontext():
        storage = storage_for(spec)
        study = _open_study(spec, storage)
        _write_marker(spec)
        again = _recover(study, storage, spec)
        done = _finished(study)
        todo = max(spec.n_trials - done, 0)
        print(f"search {spec.out_dir}: {spec.verb}, {spec.metric} ({'min' if spec.minimize else 'max'}), "
              f"{spec.sampler} sampler, {spec.pruner} pruner; {done} trial(s) finished, {todo} to run"
              + (f", {again} interrupted or failed trial(s) tried again first" if again else ""), flush=True)

        def objective(trial: Any) -> float:
            nonlocal stopped
            params = {prm.key: suggest(trial, prm) for prm in spec.space}
            run_dir = trials_dir / f"trial-{trial.number:04d}"
            trial.set_user_attr("run_dir", str(run_dir))
            shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
            print(f"\n> trial {trial.number} ({done_now() + 1}/{spec.n_trials}): {shown}", flush=True)

            started = time.time()
            try:
                cfg = build_trial_config(spec, params, run_dir)
                pruner = _Pruner(trial, spec.metric, spec.prune_after)
                result = registry.run_verb(spec.verb, cfg, callbacks=[*callbacks, pruner])
            except Exception as e:  # recorded, and tried again by the next run of the search (`_recover`)
                message = str(e) if isinstance(e, HonelmError) else f"{type(e).__name__}: {e}"
                trial.set_user_attr("error", message[:500])
                trial.set_user_attr("time_s", round(time.time() - started, 1))
                raise
            trial.set_user_attr("time_s", round(time.time() - started, 1))
            reason = result.get("reason") if isinstance(result, dict) else None
            if reason == "interrupted":
                trial.set_user_attr("interrupted", True)
                raise KeyboardInterrupt
            if isinstance(result, dict) and result.get("stop_requested"):  # keep this trial, start no other
                stopped = True
                print("search: stop requested; no further trial starts (run the same command again to continue)",
                      flush=True)
                study.stop()
            if spec.keep_models == "best":
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # trials are never resumed
            if reason == "pruned":
                raise optuna.TrialPruned("stopped by the pruner at an intermediate validation")
            value = _best_value(run_dir)
            if value is None or not math.isfinite(value):
                raise TrainingError(f"{run_dir}: the trial finished without a best validation {spec.metric}")
            return value

        def done_now() -> int:
            return _finished(study)

        def after(study_: Any, frozen: Any) -> None:
            _log_trial(spec, study_, frozen)
            write_outputs(spec, study_)

        if todo:
            finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            study_callbacks = [optuna.study.MaxTrialsCallback(spec.n_trials, states=finished_states), after]
            with forbid_test_split("honelm search"):
                try:
                    study.optimize(objective, n_trials=todo, timeout=spec.timeout or None, callbacks=study_callbacks,
                                   catch=(HonelmError,), gc_after_trial=True)
                except KeyboardInterrupt:
                    write_outputs(spec, study)
                    print(f"search interrupted: run the same `honelm search {spec.path} ...` command again to "
                          "continue the same study", flush=True)
                    raise
                except Exception:  # an unexpected error ends the search; its trial's error is in the outputs
                    write_outputs(spec, study)
                    raise
        best = write_outputs(spec, study, plots=True)
    return {**best, "stop_requested": True} if stopped else best


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _log_trial(spec: SearchSpec, study: Any, t: Any) -> None:
    TS = optuna.trial.TrialState
    tail = f" [{t.user_attrs.get('time_s', 0):.0f} s]"
    if t.state == TS.COMPLETE:
        line = f"trial {t.number}: {spec.metric} {t.value:.4f}"
    elif t.state == TS.PRUNED:
        last = max(t.intermediate_values) if t.intermediate_values else None
        line = f"trial {t.number}: pruned" + (f" after step {last}" if last is not None else "")
    else:
        line = f"trial {t.number}: {t.state.name.lower()}"
    try:
        best = study.best_trial
        line += f"; best so far {best.value:.4f} (trial {best.number})"
    except ValueError:
        pass
    print(line + tail, flush=True)


# ----------------------------------------------------------------------------------------------
# outputs


def _shown_url(url: str) -> str:
    """A storage URL as it may be written to disk and logs: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # sqlalchemy's parse errors have several types; an unparsable URL is shown as a scheme only
        return url.split(":", 1)[0] + ":***"


def _judged_from(meta: dict[str, Any]) -> str:
    """When the pruner may stop a trial (a marker written before `prune_after` existed says nothing)."""
    after = meta.get("prune_after")
    if meta.get("pruner") == "none" or after is None:
        return ""
    return " (from the first validation)" if not after else f" (from {after:.0%} of each trial's steps on)"


def _write_marker(spec: SearchSpec) -> None:
    marker = {"kind": "search", "file": str(spec.path), "verb": spec.verb, "config": spec.config, "set": spec.settings,
              "metric": spec.metric, "direction": "minimize" if spec.minimize else "maximize",
              "sampler": spec.sampler, "pruner": spec.pruner, "prune_after": spec.prune_after,
              "n_trials": spec.n_trials, "study": spec.study,
              "storage": _shown_url(spec.storage) if spec.storage else "sqlite (study.db)",
              "space": {p.key: p.describe() for p in spec.space}}
    (spec.out_dir / SEARCH_FILE).write_text(json.dumps(marker, indent=2, default=str), encoding="utf-8")


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     **{f"params.{k}": v for k, v in t.params.items()},
                     "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                     "time_s": t.user_attrs.get("time_s"), "retry_of": t.user_attrs.get("retry_of"),
                     "error": t.user_attrs.get("error"),
                     "run_dir": t.user_attrs.get("run_dir")})
    return rows


def write_outputs(spec: SearchSpec, study: Any, plots: bool = False) -> dict[str, Any]:
    """trials.jsonl/.csv, best.json/.yaml, the `best` link, unneeded models removed; plots at the end."""
    rows = trial_rows(study)
    out = spec.out_dir
    with open(out / "trials.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "trials.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    try:
        best = study.best_trial
    except ValueError:
        return {}
    run_dir = Path(best.user_attrs["run_dir"])
    info = {"trial": best.number, "value": best.value, "metric": spec.metric, "params": best.params,
            "run_dir": str(run_dir), "n_complete": sum(r["state"] == "complete" for r in rows),
            "n_pruned": sum(r["state"] == "pruned" for r in rows), "n_failed": sum(r["state"] == "fail" for r in rows)}
    (out / "best.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    if (run_dir / "config.yaml").is_file():
        cls = config_class(spec.verb)
        cfg = C.build(cls, run_dir / "config.yaml")
        cfg.run.out_dir, cfg.run.name, cfg.run.overwrite = "", "", False  # a fresh run, never the trial's
        C.dump(cfg, out / "best.yaml", header=f"# honelm {spec.verb} --config {out / 'best.yaml'}\n"
               f"# best of {info['n_complete']} complete trial(s) of {spec.out_dir}: trial {best.number}, "
               f"{spec.metric} = {best.value:.6g}")
    link = out / "best"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("trials") / run_dir.name)
    if spec.keep_models == "best":  # only the best trial's model is worth its disk
        for row in rows:
            other = Path(row["run_dir"]) if row["run_dir"] else None
            if other is not None and other != run_dir and row["state"] != "running" and (other / "best").is_dir():
                shutil.rmtree(other / "best")
    if plots:
        write_plots(study, out / "plots")
    return info


def write_plots(study: Any, plots: Path) -> dict[str, str]:
    """Optimisation history, parameter importances and parallel coordinates as PNGs; returns
    {name: why not} for each plot that could not be drawn (too few trials, one parameter...)."""
    matplotlib.use("Agg")  # Optuna draws with pyplot: no window, whatever backend the process had
    vm = optuna.visualization.matplotlib
    plots.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    TS = optuna.trial.TrialState
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TS.COMPLETE]
    for name, draw, need in (("history", vm.plot_optimization_history, 1),
                             ("importances", vm.plot_param_importances, 2),
                             ("parallel", vm.plot_parallel_coordinate, 2)):
        path = plots / f"{name}.png"
        path.unlink(missing_ok=True)
        if len(complete) < need:
            skipped[name] = f"needs at least {need} complete trials"
            continue
        try:
            ax = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of a constant parameter
            skipped[name] = str(e).splitlines()[0][:200]
            continue
        fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    (plots / "skipped.json").write_text(json.dumps(skipped, indent=2), encoding="utf-8")
    return skipped


# ----------------------------------------------------------------------------------------------
# the verb


def main(argv: list[str], callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """`honelm search`; returns the best trial (best.json), and `stop_requested` as `run_search` does."""
    p = argparse.ArgumentParser(prog="honelm search", description="Hyperparameter search with Optuna on the validation "
                                "split (the test split is sealed throughout). See configs/search/ for examples.",
                                epilog=C.fields_help(SearchConfig, "fields of the file (key: type = default   doc):"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="search YAML or a preset name (e.g. configs/search/demo.yaml, or demo)")
    p.add_argument("--n-trials", type=int, default=None, help="finished trials to reach (overrides the file)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by several workers (default: "
                   "sqlite in OUT_DIR/study.db)")
    p.add_argument("--out-dir", default=None, help="where the study and trials live (overrides the file)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="a value for the base preset's vars (e.g. where its data is)")
    p.add_argument("settings", nargs="*", metavar="key.sub=value", help="extra fixed settings (added to the file's set)")
    args = p.parse_intermixed_args(argv)
    extra = dict(C.parse_overrides(args.settings))
    raw_overrides: dict[str, Any] = {"n_trials": args.n_trials, "timeout": args.timeout, "storage": args.storage,
                                     "out_dir": args.out_dir}
    spec = load_spec(registry.find_config("search", args.file), raw_overrides, extra,
                     dict(C.parse_overrides(args.var)))
    best = run_search(spec, callbacks)
    if "trial" in best:
        print(f"\nbest: trial {best['trial']}, {spec.metric} = {best['value']:.4f} with "
              + ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items()))
        print(f"config: {spec.out_dir / 'best.yaml'}   model: {spec.out_dir / 'best' / 'best'}   "
              f"test it once: honelm test {spec.out_dir}")
    return best


def iter_trials(search_dir: Path) -> Iterator[dict[str, Any]]:
    """The rows of SEARCH/trials.jsonl (for reports)."""
    path = search_dir / "trials.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)


# ----------------------------------------------------------------------------------------------
# the report


def write_report(path: Path, ledger: str | Path | None = None) -> Path:
    """SEARCH/report.md (+ .html): the space, the best trial and its config, the plots, every trial, and the
    test ledger on the trials' test split (`ledger`, default `ledger.ledger_path(SEARCH)`)."""
    meta = json.loads((path / "search.json").read_text(encoding="utf-8"))
    rows = list(iter_trials(path))
    best = json.loads((path / "best.json").read_text(encoding="utf-8")) if (path / "best.json").is_file() else None
    lines = [f"# Search report: {path.name}", "",
             f"`honelm {meta['verb']}`" + (f" from `{meta['config']}`" if meta.get("config") else "")
             + f", scored by **{meta['metric']}** ({meta['direction']}) on the validation split; "
             f"{meta['sampler']} sampler, {meta['pruner']} pruner{_judged_from(meta)}, storage {meta['storage']}.",
             "",
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
                  *table(["parameter", "value"], [[k, fmt_value(v)] for k, v in best["params"].items()]), ""]
    else:
        lines += ["No complete trial yet.", ""]
    if best:  # every trial has the same split; the best trial's manifest names it
        lines += L.report_lines(L.test_hash_of(Path(best["run_dir"])), [L.ledger_path(path, ledger)])
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
        body.append([r["number"], r["state"] + note, fmt_value(r["value"]) if r["value"] is not None else "—",
                     *[fmt_value(r.get(k)) for k in params], fmt(r.get("last_step")),
                     fmt_duration_short(r["time_s"]) if r.get("time_s") is not None else "—"])
    lines += table(header, body) + [""]
    errors = [(r["number"], r["error"]) for r in rows if r.get("error")]
    if errors:
        lines += ["Failed trials:", "", *[f"- trial {n}: {e}" for n, e in errors], ""]
    if best and (path / "best.yaml").is_file():
        lines += ["## Best config", "", "`best.yaml`, ready for `honelm " + meta["verb"] + " --config "
                  + str(path / "best.yaml") + "`:", "", *fenced((path / "best.yaml").read_text(encoding="utf-8"), "yaml"), ""]
    return finish_report(path, lines)
