"""`fit()`: THE training loop, used unchanged by every stage.

Per optimizer step: take the step's micro-batches from a deterministic `BatchStream`, count the
loss units of the whole step (all processes together), run `objective.step` on each micro-batch
with scale world/units so the accumulated gradient is the exact mean over the step, clip, set
the learning rate from the pure schedule, step AdamW. Around it: bf16 autocast chosen by a
measured probe, validation every N steps, the best model kept, early stopping, atomic periodic
checkpoints, exact resume (model, optimizer, RNG, data position), Ctrl-C/SIGTERM leaving a
resumable checkpoint, and a non-finite loss stopping the run with the step named.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from honelm import runtime as rt
from honelm.boosters.lora import autocast_inputs
from honelm.checkpoint import list_checkpoints, load_training_checkpoint, save_training_checkpoint
from honelm.config import TrainConfig
from honelm.errors import HonelmError, TrainingError
from honelm.frozen import SPILL_NAME, FrozenBf16
from honelm.objectives.base import Objective
from honelm.optim import lr_at, make_optimizer, set_lr, warmup_steps
from honelm.tracking import Tracker

Batch = dict[str, Any]

# Observers of validation, set around a whole run by a caller that is not the stage (the search's
# pruner). Each gets (run_dir, step, val metrics) after every evaluation of the run in `run_dir`
# and may return a reason (e.g. "pruned") to stop it there: the run then ends cleanly, with its
# best model, a final checkpoint and an `end` event carrying that reason.
EvalHook = Callable[[Path, int, dict[str, float]], "str | None"]
_EVAL_HOOKS: contextvars.ContextVar[tuple[EvalHook, ...]] = contextvars.ContextVar("honelm_eval_hooks", default=())


@contextlib.contextmanager
def eval_hook(hook: EvalHook) -> Any:
    """Call `hook(run_dir, step, metrics)` after each validation of every fit() inside this block."""
    token = _EVAL_HOOKS.set(_EVAL_HOOKS.get() + (hook,))
    try:
        yield
    finally:
        _EVAL_HOOKS.reset(token)


class BatchStream:
    """A deterministic, resumable stream of micro-batches, sharded across processes.

    The stream is the concatenation of epochs; epoch e visits the items in an order fixed by
    (seed, e). Optimizer step k consumes stream positions [k*G, (k+1)*G) with
    G = batch_size * grad_accum * world; micro-batch a of rank r takes the slice starting at
    (a*world + r) * batch_size. So one process with grad_accum=2 sees exactly the items that two
    processes with grad_accum=1 see, and the data position is a single integer.
    With `lengths`, items are sorted by length inside windows of 50 steps (then the step chunks
    are shuffled) so padded batches waste little compute.
    """

    def __init__(self, n_items: int, collate: Callable[[list[int]], Batch], batch_size: int, grad_accum: int,
                 seed: int, world: int = 1, rank: int = 0, shuffle: bool = True, lengths: Sequence[int] | None = None):
        if n_items <= 0:
            raise HonelmError("the training split is empty")
        self.n, self.collate, self.bs, self.accum = n_items, collate, batch_size, grad_accum
        self.seed, self.world, self.rank, self.shuffle = seed, world, rank, shuffle
        self.lengths = lengths
        self.position = 0
        self._epoch_cache: tuple[int, list[int]] | None = None

    @property
    def step_items(self) -> int:
        return self.bs * self.accum * self.world

    def epoch_order(self, epoch: int) -> list[int]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        if self.lengths is not None and self.shuffle:
            window = self.step_items * 50
            grouped: list[int] = []
            for start in range(0, self.n, window):
                grouped.extend(sorted(order[start:start + window], key=lambda i: self.lengths[i]))
            chunks = [grouped[i:i + self.step_items] for i in range(0, self.n, self.step_items)]
            perm = torch.randperm(len(chunks), generator=g).tolist()
            order = [i for c in perm for i in chunks[c]]
        self._epoch_cache = (epoch, order)
        return order

    def item_at(self, position: int) -> int:
        return self.epoch_order(position // self.n)[position % self.n]

    def next_step(self) -> list[Batch]:
        """The micro-batches of this rank for the next optimizer step."""
        start = self.position
        batches = []
        for a in range(self.accum):
            first = start + (a * self.world + self.rank) * self.bs
            batches.append(self.collate([self.item_at(p) for p in range(first, first + self.bs)]))
        self.position += self.step_items
        return batches

    @property
    def epoch(self) -> float:
        return self.position / self.n


@dataclass
class FitResult:
    """What a run ended with (also written as the `end` event)."""

    steps: int
    reason: str
    best_step: int
    best_metric: str
    best_value: float | None
    train_time_s: float
    last_eval: dict[str, float] = field(default_factory=dict)
    stop_requested: bool = False
    """A stop (Ctrl-C, SIGTERM) arrived after the last step's check, while the finished run wrote its
    final checkpoint: the run is complete and saved, but nothing that would follow it should start."""


# Set by fit() when it returns with `stop_requested`; the CLI (and a search between trials) reads it,
# so that a stop which came too late to interrupt the run still ends the command (exit 130).
_late_stop = False


def late_stop_requested(clear: bool = False) -> bool:
    """Whether a run in this process finished with a stop request it could not act on; `clear` resets it."""
    global _late_stop
    found = _late_stop
    if clear:
        _late_stop = False
    return found


def metric_is_min(metric: str, mode: str) -> bool:
    if mode != "auto":
        return mode == "min"
    return any(k in metric for k in ("loss", "ppl", "perplexity", "bpb", "mse", "error"))


class _Interrupt:
    """First Ctrl-C/SIGTERM asks for a clean stop at the next step boundary; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _tokens(batch: Batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def accumulate(model: nn.Module, objective: Objective, micro: list[Batch], runtime: rt.Runtime
               ) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """Forward+backward every micro-batch of one optimizer step; `.grad` ends as the exact step mean.

    Each micro-batch's summed loss is scaled by world / U, where U is the number of loss units
    (target tokens, examples) in the whole step across all processes; DDP's gradient averaging
    divides by world again, so the result is sum(losses) / U however the step is cut.
    Returns the summed loss (detached), U, and summed metrics.
    """
    units = torch.tensor([float(sum(objective.units(b) for b in micro))], dtype=torch.float64)
    n_units = float(runtime.all_reduce_sum(units.to(runtime.device)).cpu())
    scale = runtime.world_size / max(n_units, 1.0)
    step_loss = torch.zeros((), device=runtime.device)
    metrics: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        batch = _to_device(batch, runtime.device)
        last = i == len(micro) - 1
        ctx = model.no_sync() if runtime.distributed and not last else contextlib.nullcontext()  # type: ignore[operator]
        with ctx:
            loss = objective.step(model, batch, scale, runtime.autocast)
        step_loss += loss.value.detach().float()
        for k, v in loss.metrics.items():
            metrics[k] = metrics.get(k, 0) + v.detach().float()
    return step_loss, n_units, metrics


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation recomputation in a transformers model (also under a peft wrapper).

    Non-reentrant checkpointing is used: it needs no input that requires grad, so it works with
    frozen embeddings (LoRA) and with `inputs_embeds` fed by boosters.
    """
    kwargs = {"use_reentrant": False}
    target = model
    while True:
        # transformers 5 renamed it (the old name warns and goes away in v6); honelm's PPO wrapper has the old name only
        if hasattr(target, "activation_checkpointing_enable"):
            target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            return
        if hasattr(target, "gradient_checkpointing_enable"):
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            return
        if not hasattr(target, "model"):
            raise HonelmError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
        target = target.model


def _distinct(models: Sequence[nn.Module]) -> list[nn.Module]:
    """Each model once, in order (an objective and a sampler may name the same one)."""
    seen: set[int] = set()
    return [m for m in models if not (id(m) in seen or seen.add(id(m)))]


def total_steps_for(cfg: TrainConfig, n_items: int, step_items: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_items / step_items))


def fit(
    model: nn.Module,
    objective: Objective,
    stream: BatchStream | Any,
    cfg: TrainConfig,
    runtime: rt.Runtime,
    run_dir: Path,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    save_best: Callable[[nn.Module, dict[str, Any]], None],
    metric: str,
    resume: bool = False,
    tracker: Tracker | None = None,
    on_start: Callable[[str], None] | None = None,
    frozen_models: Sequence[nn.Module] = (),
) -> FitResult:
    """Train `model` with `objective` on `stream`; see the module docstring for the contract.

    `on_start(precision)` ("bf16" or "fp32") runs once the precision is chosen and before the
    first step of a fresh run (not on resume: the weights are then the checkpoint's), for work
    that must use the training precision on the starting model (DPO's precomputed reference).

    `stream` is a `BatchStream` or anything with its interface (`next_step()`, `position`, `n`,
    `step_items`, `epoch`, `bs`, `accum`, and `collate`/`item_at` or a `probe_batch()`), such as
    PPO's `honelm.rl.rollout.RolloutStream`.

    `frozen_models`: models that run beside the trained one outside the objective and are never trained
    (PPO's sampler: a reference copy, a reward model). With the objective's own
    (`Objective.frozen_models()`, DPO's reference) they are held in bf16 under bf16 autocast like
    the trained model's frozen weights (`train.bf16_frozen`, honelm.frozen) and are fp32 again after.

    `evaluate(model)` returns validation metrics named `val_*`; `save_best(model, info)` writes
    the loadable best model (main process only). With `resume`, the newest checkpoint under
    run_dir/checkpoints is restored first.
    """
    device = runtime.device
    model.to(device)
    total = total_steps_for(cfg, stream.n, stream.step_items)
    warm = warmup_steps(cfg, total)
    optimizer = make_optimizer(model, cfg)
    ckpt_root = run_dir / "checkpoints"
    minimize = metric_is_min(metric, cfg.metric_mode)
    tracker = tracker or Tracker(run_dir, enabled=runtime.is_main, tensorboard=cfg.tensorboard)
    state: dict[str, Any] = {"step": 0, "position": 0, "best_value": None, "best_step": 0, "bad_evals": 0,
                             "precision": None, "precision_reason": "", "train_time_s": 0.0, "finished": False}
    if resume:
        found = list_checkpoints(ckpt_root)
        if not found:
            raise HonelmError(f"{run_dir}: --resume asked for, but there is no checkpoint under {ckpt_root}")
        saved, rng = load_training_checkpoint(found[-1], model, optimizer)
        state.update(saved)
        stream.position = state["position"]
        if state["finished"]:
            tracker.say(f"run already finished at step {state['step']}; nothing to resume")
            return FitResult(state["step"], "already finished", state["best_step"], metric, state["best_value"],
                             state["train_time_s"])
        tracker.event("info", state["step"], message=f"resumed from {found[-1].name}")

    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        tracker.say("gradient checkpointing: on (activations recomputed in the backward pass)")
    train_model: nn.Module = model
    if runtime.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    if state["precision"] is None:
        # a stream may supply its own probe batch (PPO's rollout stream: no items to collate before a rollout)
        # Half a micro-batch: the fp32 probe keeps fp32 activations, which for a batch sized for bf16
        # training would set the run's peak memory above anything training itself reaches.
        own_probe = getattr(stream, "probe_batch", None)
        probe_rows = max(1, min(stream.bs, stream.n) // 2)
        probe_batch = _to_device(own_probe() if own_probe is not None else
                                 stream.collate([stream.item_at(p) for p in range(probe_rows)]), device)

        def probe(mode: str) -> None:
            ctx = rt.Runtime(device=device, precision=mode).autocast
            objective.step(model, probe_batch, 1.0, ctx)
            model.zero_grad(set_to_none=True)

        model.train()
        state["precision"], state["precision_reason"] = rt.choose_precision(cfg.precision, device, probe)
        if runtime.distributed:  # every rank must agree: take rank 0's measurement
            flag = torch.tensor([1 if state["precision"] == "bf16" else 0], device=device)
            torch.distributed.broadcast(flag, 0)
            state["precision"] = "bf16" if int(flag) else "fp32"
        tracker.event("info", 0, message=f"precision: {state['precision_reason']}")
    runtime.precision = state["precision"]
    if on_start is not None and not resume:
        on_start(state["precision"])
    if resume:
        rt.set_rng_state(rng)  # last: everything above must not consume the restored streams

    params = [p for p in model.parameters() if p.requires_grad]
    from honelm.models import count_parameters

    n_trainable, n_total = count_parameters(model)
    step = state["step"]
    start_time = time.perf_counter() - state["train_time_s"]
    last_eval: dict[str, float] = {}
    reason = "max_steps"
    check_every = 1 if device.type == "cpu" else max(cfg.log_every, 1)
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, loss sum, grad norm) not yet checked
    run_loss = torch.zeros((), device=device)
    run_units = 0
    run_tokens = 0
    run_metrics: dict[str, torch.Tensor] = {}
    window_start = time.perf_counter()
    kill_at = int(os.environ.get("HONELM_TEST_KILL_AT_STEP", "0"))  # test hook: SIGKILL ourselves
    stop_reason: list[str] = [""]  # set by an eval hook (see eval_hook)

    # Frozen Linear weights in bf16 while training under bf16 autocast (identical results; see honelm.frozen).
    frozen = FrozenBf16(model, run_dir / SPILL_NAME.format(rank=runtime.rank),
                        enabled=runtime.precision == "bf16" and cfg.bf16_frozen,
                        extra=_distinct([*getattr(objective, "frozen_models", list)(), *frozen_models]))

    def saving() -> contextlib.AbstractContextManager:
        """The fp32 weights around save_best when it writes base weights (not for an adapter-only save)."""
        from honelm.boosters.lora import is_peft_model

        adapter_only = is_peft_model(model) and not (getattr(model, "honelm_base_pending", False)
                                                       and not (run_dir / "base" / "config.json").is_file())
        return contextlib.nullcontext() if adapter_only else frozen.restored()

    def checkpoint(finished: bool = False) -> None:
        state.update(step=step, position=stream.position, finished=finished,
                     train_time_s=time.perf_counter() - start_time)
        rng = rt.rng_state()
        if runtime.is_main:
            with frozen.restored():  # checkpoints hold the exact fp32 weights
                path = save_training_checkpoint(ckpt_root, step, model, optimizer, dict(state), rng, cfg.keep_checkpoints)
            tracker.event("checkpoint", step, path=str(path.relative_to(run_dir)))
        runtime.barrier()

    def run_eval() -> None:
        nonlocal last_eval
        if evaluate is None:
            return
        # Validation allocates in other sizes than training (a larger batch, no autograd graph); freed
        # training blocks glibc keeps resident would not fit them and the heap would grow on top, and
        # the same again the other way after. Handing the free pages back at both ends keeps the
        # process's resident peak near what is live (milliseconds: no garbage collection here, the
        # tensors of a step or a validation are freed by reference counting).
        rt.release_freed_memory(collect=False)
        model.eval()
        with torch.no_grad(), runtime.autocast():
            last_eval = evaluate(model)
        model.train()
        rt.release_freed_memory(collect=False)
        tracker.event("eval", step, split="val", **last_eval)
        value = last_eval.get(metric)
        if value is None:
            raise HonelmError(f"train.metric={metric!r} is not among the validation metrics {sorted(last_eval)}")
        best = state["best_value"]
        # A coarse metric (accuracy on a small validation set) often ties; a tie with a lower
        # validation loss is progress, so it becomes the best and patience is not spent on it.
        loss, best_loss = last_eval.get("val_loss"), state.get("best_loss")
        tie_better = (value == best and metric != "val_loss" and loss is not None and best_loss is not None
                      and loss < best_loss)
        if best is None or (value < best if minimize else value > best) or tie_better:
            state.update(best_value=value, best_step=step, bad_evals=0, best_loss=loss)
            if runtime.is_main:
                with saving():
                    save_best(model, {"step": step, "metric": metric, "value": value, **last_eval})
            tracker.event("best", step, metric=metric, value=value)
        else:
            state["bad_evals"] += 1
        for hook in _EVAL_HOOKS.get():
            stop = hook(run_dir, step, dict(last_eval))
            if stop:
                stop_reason[0] = str(stop)

    def check_finite() -> None:
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending])
        norms = torch.stack([p[2] for p in pending])
        bad = ~(torch.isfinite(losses) & torch.isfinite(norms))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            bad_step, what = pending[i][0], ("loss" if not torch.isfinite(losses[i]) else "gradient norm")
            last = list_checkpoints(ckpt_root)
            hint = f"; the last good checkpoint is {last[-1]}" if last else ""
            raise TrainingError(f"non-finite {what} ({float(losses[i] if what == 'loss' else norms[i])}) at step {bad_step}: "
                                f"try a lower train.lr, train.precision=fp32 or check the data{hint}")
        pending.clear()

    model.train()
    tracker.say(f"training {total} steps ({warm} warmup, {cfg.schedule}), {stream.step_items} sequences per step "
                f"({stream.bs} x {stream.accum} accumulation x {runtime.world_size} processes)")
    tracker.start_progress(total)
    tracker.progress(step, "")
    # Under autocast, LoRA branches skip peft's bf16 -> fp32 -> bf16 input round trip (identical results).
    with _Interrupt() as interrupt, frozen, autocast_inputs(model, enabled=runtime.precision == "bf16"):
        if frozen.count or frozen.skipped:
            tracker.say(frozen.describe())
        while step < total:
            micro = stream.next_step()
            tokens = sum(_tokens(b) for b in micro)
            step_loss, n_units, metrics = accumulate(train_model, objective, micro, runtime)
            for k, v in metrics.items():
                run_metrics[k] = run_metrics.get(k, 0) + v
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            pending.append((step + 1, step_loss, grad_norm.detach()))
            if len(pending) >= check_every:
                check_finite()  # on CPU before the update, so a bad step never touches the weights
            lr = lr_at(step, peak=cfg.lr, total=total, warmup=warm, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run_loss += step_loss
            run_units += int(n_units)
            run_tokens += tokens

            if step % max(cfg.log_every, 1) == 0 or step == total:
                check_finite()
                elapsed = time.perf_counter() - window_start
                local_units = max(run_units / runtime.world_size, 1)
                fields = {"epoch": round(stream.epoch, 4), "loss": float(run_loss) / local_units, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_per_s": run_tokens * runtime.world_size / max(elapsed, 1e-9)}
                fields.update({k: float(v) / local_units for k, v in run_metrics.items()})
                tracker.event("train", step, **fields)
                tracker.progress(step, f"loss {fields['loss']:.4f} · {fields['tokens_per_s']:,.0f} tok/s")
                run_loss.zero_()
                run_units = run_tokens = 0
                run_metrics = {}
                window_start = time.perf_counter()

            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == total:
                run_eval()
                if stop_reason[0]:
                    reason = stop_reason[0]
                    tracker.event("info", step, message=f"stopped by {reason} after this validation")
                    break
                if cfg.patience > 0 and state["bad_evals"] >= cfg.patience:
                    reason = "early_stop"
                    tracker.event("early_stop", step, patience=cfg.patience, best_step=state["best_step"])
                    break
            if cfg.save_every > 0 and step % cfg.save_every == 0 and step < total:
                checkpoint()
            if interrupt.requested:
                reason = "interrupted"
                break

        check_finite()
        if evaluate is None and runtime.is_main:
            state.update(best_step=step)
            with saving():
                save_best(model, {"step": step, "metric": None, "value": None})
        checkpoint(finished=reason != "interrupted")
        late_stop = interrupt.requested and reason != "interrupted"

    train_time = state["train_time_s"]
    if reason == "interrupted":
        tracker.say(f"interrupted at step {step}: resume with `--resume` (checkpoint saved)")
    if late_stop:  # the request came after the last step's check: the run is complete, the command stops here
        global _late_stop
        _late_stop = True
        tracker.say(f"stop requested while the final checkpoint was written: the run finished at step {step} "
                    "and is saved; nothing after it starts")
    # cost of the run, read by `honelm ablate`: peak memory since the CLI (or the search) started
    # this run (rt.reset_peak_memory; after a resume, only the resumed part)
    tracker.event("end", step, reason=reason, best_step=state["best_step"], best_metric=metric,
                  best_value=state["best_value"], train_time_s=round(train_time, 2), trainable_params=n_trainable,
                  total_params=n_total, **rt.peak_memory_mb(device))
    return FitResult(step, reason, state["best_step"], metric, state["best_value"], train_time, last_eval,
                     stop_requested=late_stop)

