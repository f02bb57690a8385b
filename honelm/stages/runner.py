"""The one runner: what every training stage shares, done once, around a `Stage`'s own hooks.

`run_stage(stage, cfg, resume, callbacks)` seeds, opens (or reopens) the run directory, reads the
data through the stage, resolves the tokenizer and the model, hands the model to the boosters,
asks the stage for its plan, lets the boosters wrap the objective, calls `fit`, and returns the
run's summary. The order of these steps is the order of the RNG use, which exact resume depends
on: the stage hooks are called where the stage modules used to do the same work by hand.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Sequence

from honelm import boosters
from honelm import runtime as rt
from honelm.loop import fit
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


def train(stage: Stage, ctx: RunContext, loaded: LoadedModel, callbacks: Sequence[Any] = ()) -> tuple[Plan, Any]:
    """The stage's plan with the boosters' objective, through `fit`."""
    plan = stage.plan(ctx, loaded)
    objective = boosters.objective(plan.objective, ctx.cfg, ctx.tokenizer, ctx.say)
    save = plan.save_best or ctx.save_best
    result = fit(plan.model if plan.model is not None else loaded.model, objective, plan.stream, ctx.cfg.train,
                 ctx.runtime, ctx.run_dir, plan.evaluate, save, metric=plan.metric, resume=ctx.resume,
                 tracker=ctx.tracker, on_start=_on_start(plan.callbacks), frozen_models=plan.frozen_models)
    return plan, result


def _on_start(callbacks: Sequence[Any]) -> Callable[[str], None] | None:
    """TRANSITION (issue 17): the plan callbacks' `on_start(state)` as today's `fit(on_start=precision)`.

    fit calls it on a fresh run only, so the state says `resumed=False`; removed when fit takes
    callbacks itself.
    """
    starters = [cb for cb in callbacks if hasattr(cb, "on_start")]
    if not starters:
        return None

    def on_start(precision: str) -> None:
        for cb in starters:
            cb.on_start(SimpleNamespace(precision=precision, resumed=False))

    return on_start


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
