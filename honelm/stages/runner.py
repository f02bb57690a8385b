"""The one runner: what every training stage shares, done once, around a `Stage`'s own hooks.

`run_stage(stage, cfg, resume, callbacks)` seeds, opens (or reopens) the run directory, reads the
data through the stage, resolves the tokenizer and the model, hands the model to the boosters,
asks the stage for its plan, lets the boosters wrap the objective, calls `fit`, and returns the
run's summary. The order of these steps is the order of the RNG use, which exact resume depends
on: the stage hooks are called where the stage modules used to do the same work by hand.
"""

from __future__ import annotations

from typing import Any, Sequence

from honelm import boosters
from honelm import runtime as rt
from honelm.checkpoint import best_writes_base
from honelm.loop import Callback, FitResult, TrainPlan, fit
from honelm.models import LoadedModel
from honelm.rundir import run_directory, tracker_for
from honelm.stages import setup as S
from honelm.stages.contract import Plan, RunContext, Stage


def open_run(stage: Stage, cfg: Any, resume: str | None) -> RunContext:
    """Runtime, seed, the run directory and its tracker: the context every hook receives."""
    runtime = rt.setup(cfg.train.threads)
    rt.seed_everything(cfg.run.seed)
    stage.check(cfg)
    run_dir = run_directory(stage.name, cfg, runtime, resume)
    tracker = tracker_for(run_dir, runtime, cfg)
    return RunContext(cfg=cfg, runtime=runtime, run_dir=run_dir, tracker=tracker, resume=resume is not None)


def load(stage: Stage, ctx: RunContext) -> LoadedModel:
    """Data, tokenizer and model, up to the boosters (the stage's own adjustments included)."""
    cfg = ctx.cfg
    stage.read(ctx)
    ctx.tokenizer = S.resolve_tokenizer(cfg.model, ctx.run_dir, lambda: stage.tokenizer_texts(ctx),
                                        stage.tokenizer_kind(cfg), ctx.say, ctx.runtime, ctx.resume)
    stage.prepare(ctx)
    spec = stage.model_spec(ctx)
    loaded = S.resolve_model(cfg.model, spec.task, ctx.tokenizer, cfg.run.seed, ctx.say, num_labels=spec.num_labels,
                             id2label=spec.id2label, carry=boosters.carries_adapter(cfg, stage.name))
    stage.before_boosters(ctx, loaded)
    ctx.loaded = boosters.apply(loaded, cfg, spec.task, ctx.say)
    return ctx.loaded


def train(stage: Stage, ctx: RunContext, loaded: LoadedModel, callbacks: Sequence[Callback] = ()
          ) -> tuple[Plan, FitResult]:
    """The stage's plan with the boosters' objective, through `fit` (the plan's callbacks, then the caller's)."""
    plan = stage.plan(ctx, loaded)
    model = plan.model if plan.model is not None else loaded.model
    run_dir = ctx.run_dir
    train_plan = TrainPlan(objective=boosters.objective(plan.objective, ctx.cfg, ctx.tokenizer, ctx.say),
                           stream=plan.stream, evaluate=plan.evaluate, save_best=plan.save_best or ctx.save_best,
                           metric=plan.metric, frozen_models=plan.frozen_models,
                           best_writes_base=lambda: best_writes_base(model, loaded.base_pending, run_dir))
    result = fit(model, train_plan, ctx.cfg.train, ctx.runtime, run_dir, tracker=ctx.tracker, resume=ctx.resume,
                 callbacks=[*plan.callbacks, *callbacks])
    return plan, result


def summary(ctx: RunContext, result: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """What a stage run returns (the CLI, a search trial and a pipeline read it)."""
    return {"run_dir": str(ctx.run_dir), "steps": result.steps, "reason": result.reason,
            "best_step": result.best_step, **result.last_eval, **extra, "stop_requested": result.stop_requested}


def run_stage(stage: Stage, cfg: Any, resume: str | None = None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train one run of `stage` with `cfg` (or continue `resume`); returns the run's summary."""
    rt.reset_peak_memory()  # the run's `end` event reports its own peak, not an earlier run's in this process
    ctx = open_run(stage, cfg, resume)
    loaded = load(stage, ctx)
    plan, result = train(stage, ctx, loaded, callbacks)
    extra = stage.finish(ctx, plan, result)
    assert ctx.tracker is not None
    ctx.tracker.close()
    return summary(ctx, result, extra)
