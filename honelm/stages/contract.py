"""The stage contract: what a verb owns, and the context the runner hands it.

A training stage is a `Stage` subclass that keeps only what is its own: its config class, how its
data is read and split, which model task it needs, what happens to the loaded model before the
boosters see it, its training plan (objective, batch stream, validation, how `best/` is saved)
and one `score` used for validation and for `honelm test` alike. Everything stages share (runtime,
seed, run directory, tracker, split manifest, tokenizer, model loading, boosters, `fit`, close)
is done once, by `honelm.stages.runner`, in this order:

    check(cfg) → run directory, tracker → read(ctx) → tokenizer (tokenizer_texts, tokenizer_kind)
    → prepare(ctx) → model_spec(ctx) → model loaded → before_boosters(ctx, loaded) → boosters
    → plan(ctx, loaded) → boosters calibrate (on the starting model) → boosters prepare (a run of
    their own with the plan, in `ctx.sub_run`, then a fresh model: a teacher run) → objective
    wrapped by boosters → fit → finish(ctx, plan, result)

A stage that trains nothing (`trains = False`: a prompted LM) goes the same way up to `plan`, whose
`evaluate` then runs once on the loaded model instead of `fit` (the runner's `evaluate_once`:
the same `eval`, `best` and `end` events, `save_best` with the same info); its plan has no
objective or stream and saves `best/` its own way (it records its model, never copies it).

`honelm test` uses the same object: `splits` rebuilds the run's split, `test_tokenizer` gives the
tokenizer (best/'s), `test(ctx, rows)` loads `best/` (`load_best`), `encode`s the rows and `score`s
them with the prefix "test" (per-example files it returns under the key "files", {name: text}, are
written into the run by the look), and `report_sections` are the stage's parts of `honelm report`.

Per-example records. A `score` that fills `ctx.records(split)` with score records
(honelm.predictions: each example's units and metric sums, named as its metrics) gets them written
with no wiring of its own: the validation ones as best/val_predictions.jsonl in the same atomic
save as the model they describe (`RunContext.kept_files`, what the runner saves when the plan has
no `best_files` of its own: classify builds its predictions there), the test ones as
test_predictions.jsonl by `honelm test`. `record_metrics` names the metrics they carry, which
`honelm ablate` compares on validation.
`honelm compare` loads `best/` the same way and times `inference(ctx, model, rows)` (one forward
over encoded rows, as `test` scores them) on rows that are never test rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Sequence

import torch
from torch import nn

from honelm import predictions as P
from honelm.checkpoint import save_pretrained_atomic
from honelm.data.large_corpus import CorpusPart
from honelm.errors import HonelmError
from honelm.loop import BatchStream, Callback
from honelm.models import LoadedModel, load_model
from honelm.objectives.base import Objective
from honelm.rundir import tracker_for
from honelm.runtime import Runtime
from honelm.tokenizer import load_tokenizer
from honelm.tracking import Tracker
from honelm.validation import Validation, Whole, rows_for, spread


@dataclass
class ModelSpec:
    """The model a stage needs: the task head (lm, mlm, classify) and, for classify, its labels."""

    task: str
    num_labels: int | None = None
    id2label: dict[int, str] | None = None


@dataclass(frozen=True)
class ReportSection:
    """A part of `honelm report` a stage contributes (PPO's rollouts, classify's predictions).

    `build` names a function "module:function" with the signature (RunData, plots_dir, written) ->
    markdown lines (none when the run has nothing for it), which adds the plot files it wrote to
    `written`; it is imported when a report is written, so training never loads the plotting code.
    `plots` lists every plot it may write (the report removes stale copies); `place`: after the
    training curves, or after the test results.
    """

    place: Literal["curves", "results"]
    plots: tuple[str, ...]
    build: str


@dataclass
class Plan:
    """What a stage hands the loop (the runner wraps `objective` with the boosters first)."""

    objective: Objective | None
    """None only for a stage that trains nothing (`Stage.trains`), as is `stream`."""
    stream: Any
    evaluate: Callable[[nn.Module], dict[str, float]] | None
    metric: str
    save_best: Callable[[nn.Module, dict[str, Any]], None] | None = None
    """None: the model and the run's tokenizer are written to RUN/best (`RunContext.save_best`). A plan that
    saves its own way cannot train a booster's sub-run (a teacher saves into its own best/)."""
    model: nn.Module | None = None
    """What trains when it is not the loaded model itself (PPO: the policy with its value function)."""
    frozen_models: Sequence[nn.Module] = ()
    callbacks: Sequence[Callback] = ()
    """The stage's own observers of the run (DPO's reference precomputed once the precision is chosen)."""
    best_files: Callable[[dict[str, Any]], dict[str, str] | None] | None = None
    """Extra files written into best/ beside the model, from the best evaluation's info (classify's
    val_predictions.jsonl); used when `save_best` is None."""
    reset: Callable[[], None] | None = None
    """Called before every fit of this plan: a booster's sub-run (a teacher) trains with the same plan
    before the main run, and nothing of it may carry over (the stream's position, kept evaluation outputs)."""


@dataclass(frozen=True)
class Inference:
    """What `honelm compare` times of a stage's model: `batch(idx)` builds the model's inputs for rows[idx]
    (encoded by the run's own tokenizer, on the run's device; not timed) and `forward(batch)` runs the model
    on them as `test` does (timed)."""

    batch: Callable[[Sequence[int]], Any]
    forward: Callable[[Any], Any]


@dataclass
class RunContext:
    """One run as a stage sees it: its config, where it lives, and what the runner has built so far.

    `honelm test` builds one too (no tracker; `tokenizer` is best/'s), so `score` and `encode`
    serve validation and test alike.
    """

    cfg: Any
    runtime: Runtime
    run_dir: Path
    tracker: Tracker | None = None
    resume: bool = False
    splits: Any = None
    tokenizer: Any = None
    loaded: LoadedModel | None = None
    """The model as loaded and boosted (set by the runner before `plan`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Stage-owned values computed in one hook and read in a later one (label maps, encoded data)."""

    def say(self, line: str) -> None:
        if self.tracker is not None:
            self.tracker.say(line)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def stream(self, items: Any, lengths: Sequence[int] | None = None) -> BatchStream:
        """This process's training batches of `items` (their `len` and `collate`) by train.* and run.seed;
        grouped by length when `lengths` are given."""
        cfg = self.cfg
        return BatchStream(len(items), items.collate, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                           self.runtime.world_size, self.runtime.rank, lengths=lengths)

    def write_json(self, name: str, payload: Any) -> None:
        """RUN/name as indented JSON, from the main process only."""
        if self.runtime.is_main:
            (self.run_dir / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str),
                                             encoding="utf-8")

    def records(self, split: str) -> list[dict[str, Any]]:
        """A fresh list for `score` to fill with the per-example score records of `split` (honelm.predictions),
        kept as ctx.extra["{split}_records"] until the next scoring of that split."""
        kept: list[dict[str, Any]] = []
        self.extra[f"{split}_records"] = kept
        return kept

    def kept_files(self, info: dict[str, Any]) -> dict[str, str] | None:
        """best/val_predictions.jsonl from the validation records kept by the evaluation that made it best (fit saves
        best/ right after it); None without an evaluation (`info` has no metric) or without records."""
        records = self.extra.get("val_records")
        if info.get("metric") is None or not records:
            return None
        return {P.VAL_FILE: P.dumps_records(records)}

    def save_best(self, model: nn.Module, info: dict[str, Any], files: dict[str, str] | None = None) -> None:
        """The model with this run's tokenizer as RUN/best (a plain HF or PEFT directory)."""
        save_pretrained_atomic(model, self.tokenizer, self.run_dir / "best", info, files=files,
                               base_pending=self.loaded.base_pending)

    def sub_run(self, name: str) -> RunContext:
        """A run kept inside this one, RUN/name (a booster's teacher): the same config, data and tokenizer, its own
        log.txt, metrics.jsonl, checkpoints and best/. The caller closes its tracker."""
        run_dir = self.run_dir / name
        return replace(self, run_dir=run_dir, tracker=tracker_for(run_dir, self.runtime, self.cfg))


class Stage:
    """A training verb. Subclasses set `name` and `config` and override what is their own."""

    name: ClassVar[str]
    config: ClassVar[type]
    testable: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    """False: nothing trains (a prompted LM); the runner evaluates the plan once on the loaded model, no `fit`."""
    """Whether `honelm test` applies (PPO has no test split of answers to score)."""
    report_sections: ClassVar[tuple[ReportSection, ...]] = ()
    """Parts of `honelm report` this stage contributes (each decides from a run's files whether it applies)."""
    record_metrics: ClassVar[tuple[str, ...]] = ()
    """The metrics its per-example score records carry (named as its val_*/test_* metrics, each their mean over
    units): what `honelm ablate` compares. Empty: classification or regression predictions (accuracy, macro_f1, mse,
    pearson), or no records."""

    # ---- training: called by the runner, in this order

    def check(self, cfg: Any) -> None:
        """Checks that need nothing but the config, before the run directory exists."""

    def splits(self, cfg: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        """The stage's train/val/test split (`honelm.data.splits.Splits`); `leak_texts` only from `honelm test`."""
        raise NotImplementedError(f"{type(self).__name__} does not define splits()")

    def read(self, ctx: RunContext) -> None:
        """Read and split the data into ctx.splits and write the manifest."""
        ctx.splits = self.splits(ctx.cfg, ctx.say)
        ctx.write_json("split_manifest.json", ctx.splits.manifest)

    def tokenizer_texts(self, ctx: RunContext) -> Iterable[str]:
        """The texts a tokenizer trained on the fly learns from (train split only; streamed from the files for a
        large corpus, data.memmap)."""
        train = ctx.splits.train
        return train.texts() if isinstance(train, CorpusPart) else [d.text for d in train]

    def tokenizer_kind(self, cfg: Any) -> Literal["bpe", "wordpiece"]:
        """What a tokenizer trained on the fly is: byte-level BPE (decoders) or WordPiece (encoders)."""
        return "bpe"

    def prepare(self, ctx: RunContext) -> None:
        """After the tokenizer, before the model (a chat template, label maps)."""

    def model_spec(self, ctx: RunContext) -> ModelSpec:
        return ModelSpec("lm")

    def before_boosters(self, ctx: RunContext, loaded: LoadedModel) -> None:
        """Work on the loaded model before LoRA wraps it (dropout off, a reference copy, checks)."""

    def plan(self, ctx: RunContext, loaded: LoadedModel) -> Plan:
        raise NotImplementedError(f"{type(self).__name__} does not define plan()")

    def finish(self, ctx: RunContext, plan: Plan, result: Any) -> dict[str, Any]:
        """After training (samples from the best model); returns extra summary fields."""
        return {}

    # ---- validation and test

    def record_metrics_of(self, cfg: Any) -> tuple[str, ...]:
        """`record_metrics` of the runs `cfg` makes (a verb with several kinds of run answers for the one it runs)."""
        return self.record_metrics

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> Any:
        """Rows of a split → what `score` reads (blocks, encoded examples, pairs)."""
        raise NotImplementedError(f"{type(self).__name__} does not define encode()")

    def score(self, ctx: RunContext, model: nn.Module, data: Any, split: str) -> dict[str, float]:
        """Metrics named `{split}_*` of `model` on encoded data: validation and test use this one function."""
        raise NotImplementedError(f"{type(self).__name__} does not define score()")

    def validation(self, ctx: RunContext, rows: Any, unit: str = "items",
                   data: Any = None) -> Validation | Whole | None:
        """The validation of a plan over `rows` (None when there are none): `score` on all of them encoded (`data`
        when the stage has encoded them already; required for rows by source, {name: rows}, scored as
        {name: encoded}), and on a fixed subset when train.eval_max_batches caps periodic validations (rows evenly
        spread over the split, the same share of each source, encoded once: honelm.validation)."""
        if not rows:
            return None
        data = self.encode(ctx, rows, "val") if data is None else data
        if not isinstance(rows, (list, dict)):  # a streamed corpus split (data.memmap): scored whole every time
            return Whole(lambda m: self.score(ctx, m, data, "val"), len(data))
        items = sum(len(d) for d in data.values()) if isinstance(data, dict) else len(data)

        def part(docs: list[Any], cap: int) -> Any:
            return self.encode(ctx, spread(docs, rows_for(len(docs), items, cap)), "val")

        def subset(cap: int) -> tuple[Callable[[nn.Module], dict[str, float]], int]:
            some = {n: part(d, cap) for n, d in rows.items()} if isinstance(rows, dict) else part(rows, cap)
            size = sum(len(d) for d in some.values()) if isinstance(some, dict) else len(some)
            return (lambda m: self.score(ctx, m, some, "val")), size
        return Validation(lambda m: self.score(ctx, m, data, "val"), subset, items, unit)

    def check_testable(self, ctx: RunContext) -> None:
        """Refuse `honelm test` on a run that has no test split of its own (before anything is read)."""
        if not self.testable:
            raise HonelmError(f"{ctx.run_dir}: `honelm test` does not apply to {self.name} runs")

    def test_tokenizer(self, ctx: RunContext) -> Any:
        """The tokenizer `honelm test` encodes with: best/'s (the run's own, chat template included)."""
        return load_tokenizer(best_dir(ctx.run_dir))

    def load_best(self, ctx: RunContext) -> nn.Module:
        """The run's best/ model for `honelm test`, as `model_spec` describes it (an adapter directory is merged)."""
        spec = self.model_spec(ctx)
        return load_model(best_dir(ctx.run_dir), spec.task, num_labels=spec.num_labels, id2label=spec.id2label)

    def inference(self, ctx: RunContext, model: nn.Module, rows: list[Any]) -> Inference:
        """`model` (best/, loaded by `load_best`) on `rows` (validation or train rows, never test rows), encoded and
        run as `test` would: what `honelm compare` times. A stage that does not define it is compared on quality only."""
        raise NotImplementedError(f"{type(self).__name__} does not define inference()")

    def test(self, ctx: RunContext, rows: list[Any]) -> dict[str, Any]:
        """Test metrics of best/ on `rows` (called only by honelm.protocol.test, inside the unlock)."""
        model = self.load_best(ctx).to(ctx.device).eval()
        data = self.encode(ctx, rows, "test")
        with torch.no_grad():
            return self.score(ctx, model, data, "test")


def best_dir(run_dir: Path) -> Path:
    """RUN/best, or an error when the run kept no model (a LoRA run's best/ is an adapter directory)."""
    best = run_dir / "best"
    if not ((best / "config.json").is_file() or (best / "adapter_config.json").is_file()):
        raise HonelmError(f"{run_dir}: no best/ model to test")
    return best
