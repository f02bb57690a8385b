"""The one runner: what every training stage shares, done once, around a `Stage`'s own hooks.

`run_stage(stage, cfg, resume, callbacks)` seeds, opens (or reopens) the run directory, reads the
data through the stage, resolves the tokenizer and the model, hands the model to the boosters,
asks the stage for its plan, lets the boosters measure what depends on the starting model
(`calibrate`) and prepare (a run of their own with that plan, such as a teacher, after which the
main run trains a fresh model from the same start), lets the boosters wrap the objective, calls
`fit`, and returns the run's summary; a stage that trains nothing (`Stage.trains` false) is
evaluated once instead (`evaluate_once`). The run directory's lock is held from its opening to the
run's end; a fresh run pins its inputs (honelm.pins), a resumed one checks them and first tidies
what a killed write left behind (honelm.checkpoint.clean_stale). The order of these steps is the
order of the RNG use, which exact resume depends on: the stage hooks are called where the stage
modules used to do the same work by hand.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from honelm import boosters
from honelm import runtime as rt
from honelm import sharding
from honelm.checkpoint import best_writes_base, clean_stale, list_checkpoints
from honelm.errors import HonelmError
from honelm.loop import Callback, FitResult, TrainPlan, TrainState, fit
from honelm.models import LoadedModel, count_parameters
from honelm.pins import check_inputs, check_models, record_inputs
from honelm.rundir import discard_failed_start, latest_of, release_run, run_directory, runs_parent, tracker_for
from honelm.stages.contract import Plan, RunContext, Stage
from honelm.stages.resolve import resolve_model, resolve_tokenizer
from honelm.tracking import phase


STARTED = "training_started"
"""ctx.extra key set when the run's training (or its one evaluation) begins: a failure before it is a failed start."""


def open_run(stage: Stage, cfg: Any, resume: str | None) -> RunContext:
    """Runtime, seed, the run directory and its tracker: the context every hook receives."""
    runtime = rt.setup(cfg.train.threads)
    rt.seed_everything(cfg.run.seed)
    check_models(cfg)  # first: a stage's own check may load a teacher or a reward model by its path
    stage.check(cfg)
    run_dir = run_directory(stage.name, cfg, runtime, resume)
    try:
        tracker = tracker_for(run_dir, runtime, cfg)
    except BaseException:
        release_run(run_dir)
        raise
    return RunContext(cfg=cfg, runtime=runtime, run_dir=run_dir, tracker=tracker, resume=resume is not None)


def settle_inputs(ctx: RunContext, allow_changed_data: bool) -> None:
    """A fresh run pins its inputs; a resumed one tidies stale temporary copies and checks its inputs."""
    main = ctx.runtime.is_main
    if not ctx.resume:
        if main:
            record_inputs(ctx.run_dir, ctx.cfg)
        return
    if main:
        subdirs = [d for d in ctx.run_dir.iterdir() if d.is_dir()]
        for directory in (ctx.run_dir, *subdirs, *(d / "checkpoints" for d in subdirs)):
            for line in clean_stale(directory):
                ctx.say(line)
    check_inputs(ctx.run_dir, ctx.cfg, allow_changed_data, ctx.say, write=main)


def load(stage: Stage, ctx: RunContext) -> LoadedModel:
    """Data, tokenizer and model, up to the boosters (the stage's own adjustments included)."""
    cfg = ctx.cfg
    with phase(ctx.say, "reading and splitting the data"):
        stage.read(ctx)
    with phase(ctx.say, "tokenizer"):
        ctx.tokenizer = resolve_tokenizer(cfg.model, ctx.run_dir, lambda: stage.tokenizer_texts(ctx),
                                          stage.tokenizer_kind(cfg), ctx.say, ctx.runtime, ctx.resume)
    stage.prepare(ctx)
    with phase(ctx.say, "loading the model"):
        return load_model(stage, ctx)


def load_model(stage: Stage, ctx: RunContext) -> LoadedModel:
    """The stage's model, adjusted by the stage and transformed by the boosters; kept as ctx.loaded."""
    cfg = ctx.cfg
    spec = stage.model_spec(ctx)
    loaded = resolve_model(cfg.model, spec.task, ctx.tokenizer, cfg.run.seed, ctx.say, num_labels=spec.num_labels,
                           id2label=spec.id2label, carry=boosters.carries_adapter(cfg))
    stage.before_boosters(ctx, loaded)
    ctx.loaded = boosters.apply(loaded, cfg, spec.task, ctx.say)
    return ctx.loaded


def reload(stage: Stage, ctx: RunContext) -> LoadedModel:
    """A fresh model from the same start as the first: the seed is reset, so random init and new heads repeat."""
    rt.seed_everything(ctx.cfg.run.seed)
    return load_model(stage, ctx)


def fit_plan(ctx: RunContext, plan: Plan, model: nn.Module, objective: Any, resume: bool,
             callbacks: Sequence[Callback] = ()) -> FitResult:
    """One fit of `plan` into ctx.run_dir: the run itself, or a sub-run a booster keeps inside it (`ctx.sub_run`).

    The best/ it saves is that of ctx.loaded's record (a sub-run's context keeps the model it trained).
    """
    if plan.reset is not None:
        plan.reset()
    for kept in ("val_records", "one_class"):  # a sub-run's (a teacher's) records never describe this run's best/,
        ctx.extra.pop(kept, None)  # and its last validations never count toward this run's one-class streak
    ctx.extra[STARTED] = True  # a sub-run's context shares `extra`: a teacher's training counts as started too
    loaded, run_dir = ctx.loaded, ctx.run_dir
    assert loaded is not None
    train_plan = TrainPlan(objective=objective, stream=plan.stream, evaluate=plan.evaluate, save_best=saver(ctx, plan),
                           metric=plan.metric, frozen_models=plan.frozen_models, lr_scale=boosters.lr_scale(ctx.cfg),
                           lr_hold=boosters.lr_hold(ctx.cfg),
                           best_writes_base=lambda: best_writes_base(model, loaded.base_pending, run_dir))
    return fit(model, train_plan, ctx.cfg.train, ctx.runtime, run_dir, tracker=ctx.tracker, resume=resume,
               callbacks=[*plan.callbacks, *callbacks])


def saver(ctx: RunContext, plan: Plan) -> Callable[[nn.Module, dict[str, Any]], None]:
    """How the plan's best model is saved: its own `save_best`, else the model and tokenizer as RUN/best, with the
    plan's `best_files` or else the validation records its evaluation kept (`RunContext.kept_files`)."""
    return plan.save_best or (lambda m, info: ctx.save_best(m, info, files=plan.best_files(info)
                                                            if plan.best_files is not None else ctx.kept_files(info)))


def sub_fit(plan: Plan) -> Callable[[RunContext, nn.Module, Any, bool], FitResult]:
    """`train(sub, model, objective, resume)` for a booster's sub-run: the plan's stream, validation, best/ and
    own callbacks; the caller's callbacks (a search's pruner) observe the run itself only."""
    def train(sub: RunContext, model: nn.Module, objective: Any, resume: bool) -> FitResult:
        if plan.save_best is not None:
            raise HonelmError(f"{sub.run_dir}: this stage saves best/ its own way (Plan.save_best), so a booster "
                              "cannot train a run of its own with the stage's plan")
        return fit_plan(sub, plan, model, objective, resume)
    return train


def train(stage: Stage, ctx: RunContext, loaded: LoadedModel, callbacks: Sequence[Callback] = ()
          ) -> tuple[Plan, FitResult | None]:
    """The stage's plan, what the boosters prepare for it, the boosters' objective, through `fit` (the plan's
    callbacks, then the caller's).

    The result is None when a booster's own run before the main one (a teacher) stopped: the main
    run did not start, and `--resume` continues the booster's run.
    """
    with phase(ctx.say, "preparing the data (tokenising, packing, encoding)"):
        plan = stage.plan(ctx, loaded)
    if sharding.wanted(ctx.cfg.train.distributed, ctx.runtime):  # before training starts: refused = a failed start
        sharding.refuse_unsupported(plan.stream, ctx.cfg.train.compile)
    ctx.cfg = boosters.calibrate(ctx.cfg, loaded, plan, ctx.tokenizer, ctx.say)  # before the checkpoint: resume-exact
    prepared = boosters.prepare(ctx, stage, loaded, plan, sub_fit(plan), lambda: reload(stage, ctx))
    if prepared is not None and prepared.interrupted:
        return plan, None
    if prepared is not None and prepared.loaded is not None:
        loaded = prepared.loaded
    objective = boosters.objective(plan.objective, ctx.cfg, ctx.tokenizer, ctx.say,
                                   stored=prepared.stored if prepared is not None else None)
    # the run resumes from its own checkpoint only: one resumed during a booster's sub-run, or one stopped before
    # its first checkpoint, has none yet and trains from step 0 (deterministic: it repeats what was lost)
    resume = ctx.resume and bool(list_checkpoints(ctx.run_dir / "checkpoints"))
    if ctx.resume and not resume:
        assert ctx.tracker is not None
        dropped = ctx.tracker.drop_after(0)
        ctx.say("no checkpoint of this run to resume from (it stopped before its first one): training from step 0"
                + (f"; {dropped} events of the stopped attempt dropped from metrics.jsonl" if dropped else ""))
    model = plan.model if plan.model is not None else loaded.model
    return plan, fit_plan(ctx, plan, model, objective, resume, callbacks)


def evaluate_once(stage: Stage, ctx: RunContext, loaded: LoadedModel, callbacks: Sequence[Callback] = ()
                  ) -> tuple[Plan, FitResult]:
    """A stage that trains nothing: its plan's validation once on the loaded model, as `fit` records one.

    The same `eval`, `best` and `end` events (step 0, no training time) and `save_best` info as a
    training run's, so `report`, `search` (best/best.json) and `test` read it alike; callbacks see
    the start, the validation (a reason returned, e.g. "pruned", is the run's end reason, as at a
    training run's last validation) and the end.
    """
    plan, tracker = stage.plan(ctx, loaded), ctx.tracker
    assert tracker is not None
    ctx.extra[STARTED] = True
    model, state = loaded.model.to(ctx.device).eval(), TrainState(ctx.run_dir, total=0, reason="evaluated")
    every = [*plan.callbacks, *callbacks]
    for callback in every:
        callback.on_start(state)
    info: dict[str, Any] = {"step": 0, "metric": None, "value": None}
    started = time.perf_counter()
    if plan.evaluate is not None:
        with torch.no_grad():
            state.last_eval = plan.evaluate(model)
        tracker.event("eval", 0, split="val", **state.last_eval)
        if plan.metric not in state.last_eval:
            raise HonelmError(f"train.metric={plan.metric!r} is not among the validation metrics "
                              f"{sorted(state.last_eval)}")
        state.best_value = state.last_eval[plan.metric]
        info = {"step": 0, "metric": plan.metric, "value": state.best_value, **state.last_eval}
    if ctx.runtime.is_main:
        saver(ctx, plan)(model, info)
    if plan.evaluate is not None:
        tracker.event("best", 0, metric=plan.metric, value=state.best_value)
        for callback in every:
            state.reason = str(callback.after_eval(state, dict(state.last_eval)) or state.reason)
    _, n_total = count_parameters(model)
    tracker.event("end", 0, reason=state.reason, best_step=0, best_metric=plan.metric, best_value=state.best_value,
                  train_time_s=0.0, eval_time_s=round(time.perf_counter() - started, 2), trainable_params=0,
                  total_params=n_total, **rt.peak_memory_mb(ctx.device))
    result = FitResult(0, state.reason, 0, plan.metric, state.best_value, 0.0, state.last_eval)
    for callback in every:
        callback.on_end(state, result)
    return plan, result


def summary(ctx: RunContext, result: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """What a stage run returns (the CLI, a search trial and a pipeline read it)."""
    return {"run_dir": str(ctx.run_dir), "steps": result.steps, "reason": result.reason,
            "best_step": result.best_step, **result.last_eval, **extra, "stop_requested": result.stop_requested}


def run_stage(stage: Stage, cfg: Any, resume: str | None = None, callbacks: Sequence[Callback] = (),
              allow_changed_data: bool = False) -> dict[str, Any]:
    """Train one run of `stage` with `cfg` (or continue `resume`; `allow_changed_data`: even on inputs that changed
    since it started); returns the run's summary.

    A new run that fails before training starts (bad data, a model that does not fit the config) leaves
    nothing behind: its directory is removed and `latest` points where it did (`discard_failed_start`).
    """
    rt.reset_peak_memory()  # the run's `end` event reports its own peak, not an earlier run's in this process
    latest_before = latest_of(runs_parent(stage.name, cfg)) if resume is None else None
    ctx = open_run(stage, cfg, resume)
    try:
        return _run(stage, ctx, callbacks, latest_before, allow_changed_data)
    finally:
        release_run(ctx.run_dir)


def _run(stage: Stage, ctx: RunContext, callbacks: Sequence[Callback], latest_before: Any,
         allow_changed_data: bool) -> dict[str, Any]:
    assert ctx.tracker is not None
    try:
        settle_inputs(ctx, allow_changed_data)  # inside: a fresh run whose inputs cannot be pinned is a failed start
        loaded = load(stage, ctx)
        if stage.trains:
            plan, result = train(stage, ctx, loaded, callbacks)
        else:
            plan, result = evaluate_once(stage, ctx, loaded, callbacks)
    except BaseException:
        ctx.tracker.close(failed=True)  # an MLflow / W&B run is marked failed, not left running
        if not ctx.resume and not ctx.extra.get(STARTED):
            if discard_failed_start(ctx.run_dir, latest_before, ctx.runtime):
                print(f"{ctx.run_dir}: removed, as the run failed before training (run the same command again once "
                      "the error is fixed)", file=sys.stderr, flush=True)
        raise
    if result is None:  # a booster's own run stopped before the main run started
        ctx.tracker.close()
        return {"run_dir": str(ctx.run_dir), "steps": 0, "reason": "interrupted", "best_step": 0}
    extra = stage.finish(ctx, plan, result)
    ctx.tracker.close()
    return summary(ctx, result, extra)
