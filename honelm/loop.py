"""`fit()`: THE training loop, used unchanged by every stage.

Per optimizer step: take the step's micro-batches from a deterministic `BatchStream`, count the
loss units of the whole step (all processes together), run `objective.step` on each micro-batch
with scale world/units so the accumulated gradient is the exact mean over the step, clip, set
the learning rate from the pure schedule, step AdamW. Around it: bf16 autocast chosen by a
measured probe, validation every N steps, the best model kept, early stopping, atomic periodic
checkpoints, exact resume (model, optimizer, RNG, data position), Ctrl-C/SIGTERM leaving a
resumable checkpoint, and a non-finite loss stopping the run with the step named.

A stage hands the loop a `TrainPlan` (objective, data, validation, how to save the best model);
the run's progress is an explicit `TrainState` (what a checkpoint stores, plus what callers may
read); whoever else needs to act during a run (the search's pruner, DPO's precomputed reference,
tests that kill the process) passes a `Callback`. Speed-ups that change no number sit behind one
context, `honelm.speed.TrainingSpeed`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from honelm import choices as ch
from honelm import runtime as rt
from honelm import sharding
from honelm import validation as V
from honelm.checkpoint import (newest_good_checkpoint, restore_newest, save_sharded_checkpoint,
                               save_training_checkpoint, set_aside)
from honelm.config import TrainConfig
from honelm.errors import HonelmError, TrainingError
from honelm.models import count_parameters
from honelm.objectives.base import Objective
from honelm.optim import LrScale, lr_at, make_optimizer, set_lr, warmup_steps
from honelm.speed import SPILL_NAME, TrainingSpeed
from honelm.tracking import Tracker

Batch = dict[str, Any]


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


@dataclass
class TrainPlan:
    """What a stage hands the loop.

    `stream` is a `BatchStream` or anything with its interface (`next_step()`, `position`, `n`,
    `step_items`, `epoch`, `bs`, `accum`, and `collate`/`item_at` or a `probe_batch()`), such as
    PPO's `honelm.rl.rollout.RolloutStream`. `evaluate(model)` returns validation metrics named
    `val_*` (None: no validation; the final model is then the best); `save_best(model, info)`
    writes the loadable best model (main process only); `metric` is the validation metric that
    decides the best.

    `frozen_models`: models that run beside the trained one outside the objective and are never
    trained (PPO's sampler: a reference copy, a reward model). With the objective's own
    (`Objective.frozen_models()`, DPO's reference) they are held in bf16 under bf16 autocast like
    the trained model's frozen weights (`train.bf16_frozen`, honelm.speed) and are fp32 again after.
    """

    objective: Objective
    stream: BatchStream | Any
    evaluate: Callable[[nn.Module], dict[str, float]] | None
    save_best: Callable[[nn.Module, dict[str, Any]], None]
    metric: str
    frozen_models: Sequence[nn.Module] = ()
    lr_scale: LrScale | None = None
    """A trained parameter's learning-rate multiplier by name (boosters: LoRA+'s `lora.lr_ratio`); None: 1 for all."""
    lr_hold: tuple[Callable[[str], bool], float] | None = None
    """(which trained parameters wait, by name; the share of the first steps they wait at learning rate 0): LoRA's
    `lora.head_first`; None: none waits."""
    best_writes_base: Callable[[], bool] = lambda: True
    """False: save_best writes an adapter only, so frozen bf16 weights need not be restored to fp32
    around it (`honelm.checkpoint.best_writes_base`)."""


# What every checkpoint's trainer_state.json holds, in this order; `best_loss` follows once a best
# was recorded (as it always has: old checkpoints resume unchanged).
_CHECKPOINTED = ("step", "position", "best_value", "best_step", "bad_evals", "precision", "precision_reason",
                 "train_time_s", "finished")


@dataclass
class TrainState:
    """Where a run stands; callbacks receive it (read it, do not change it)."""

    run_dir: Path
    total: int
    """Optimizer steps the run is planned for."""
    step: int = 0
    """Optimizer steps done."""
    position: int = 0
    """The data stream's position at the last checkpoint."""
    best_value: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    """Validations in a row without a new best (early stopping counts these)."""
    precision: str | None = None
    """The training precision once chosen: "bf16" (autocast) or "fp32"."""
    precision_reason: str = ""
    train_time_s: float = 0.0
    """Training time at the last checkpoint (a resumed run goes on counting from it)."""
    finished: bool = False
    best_loss: float | None = None
    """val_loss at the best validation: a tie of a coarse metric with a lower loss is progress."""
    resumed: bool = False
    """The run continues from a checkpoint (not checkpointed itself)."""
    last_eval: dict[str, float] = field(default_factory=dict)
    reason: str = "max_steps"
    """Why the run ends (max_steps, early_stop, interrupted, or a callback's reason)."""

    def checkpoint_fields(self) -> dict[str, Any]:
        """The trainer_state.json of a checkpoint."""
        fields = {k: getattr(self, k) for k in _CHECKPOINTED}
        if self.best_value is not None:
            fields["best_loss"] = self.best_loss
        return fields

    def restore(self, saved: dict[str, Any]) -> None:
        """Take the checkpointed fields from a checkpoint's trainer_state.json."""
        for key in (*_CHECKPOINTED, "best_loss"):
            if key in saved:
                setattr(self, key, saved[key])


class Callback:
    """Something that acts during a run without being part of it; every method is a no-op here.

    Subclass and override what you need; pass instances as `fit(callbacks=...)`. The state is the
    loop's own: read it, do not change it.
    """

    def on_start(self, state: TrainState) -> None:
        """The precision is chosen (`state.precision`), nothing is trained yet; for fresh and resumed
        runs alike (`state.resumed`). On resume, this runs before the saved RNG state is restored."""

    def after_step(self, state: TrainState) -> None:
        """After each optimizer step (and its `train` event, when one is due), before any validation."""

    def after_eval(self, state: TrainState, metrics: dict[str, float]) -> str | None:
        """After each validation (the best model already saved); a returned reason (e.g. "pruned")
        stops the run there, cleanly: with its best model, a final checkpoint and that reason."""
        return None

    def on_end(self, state: TrainState, result: FitResult) -> None:
        """The run ended (its `end` event is written); not called for a resumed run that had finished."""


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
    (FSDP's reduce-scatter, likewise an average) divides by world again, so the result is
    sum(losses) / U however the step is cut. Gradients are reduced once per step, at the last
    micro-batch (DDP's `no_sync`, FSDP's `set_requires_gradient_sync`).
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
        with _gradient_sync(model, runtime, last):
            loss = objective.step(model, batch, scale, runtime.autocast)
        step_loss += loss.value.detach().float()
        for k, v in loss.metrics.items():
            metrics[k] = metrics.get(k, 0) + v.detach().float()
    return step_loss, n_units, metrics


def _gradient_sync(model: nn.Module, runtime: rt.Runtime, sync: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients across processes in this backward only when `sync` (the step's last micro-batch)."""
    if not runtime.distributed:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP: a switch, set before every micro-batch
        sharding.gradient_sync(model, sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()  # type: ignore[operator]


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


def total_steps_for(cfg: TrainConfig, n_items: int, step_items: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_items / step_items))


@dataclass
class _Window:
    """Sums over the steps since the last `train` event (what that event averages)."""

    loss: torch.Tensor
    units: int = 0
    tokens: int = 0
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.loss.zero_()
        self.units = self.tokens = 0
        self.metrics = {}
        self.started = time.perf_counter()


class _Run:
    """One call of `fit()`: the model, what trains it, and its `TrainState`, in small steps."""

    # set by train(), once the precision is chosen and the callbacks have started
    params: list[nn.Parameter]
    counts: tuple[int, int]  # trainable, total parameters
    start_time: float  # perf_counter() at which train_time_s was 0
    window: _Window
    speed: TrainingSpeed

    def __init__(self, model: nn.Module, plan: TrainPlan, cfg: TrainConfig, runtime: rt.Runtime, run_dir: Path,
                 tracker: Tracker | None, callbacks: Sequence[Callback]) -> None:
        self.model, self.train_model, self.plan, self.cfg, self.runtime = model, model, plan, cfg, runtime
        self.run_dir, self.callbacks = run_dir, list(callbacks)
        total = total_steps_for(cfg, plan.stream.n, plan.stream.step_items)
        self.warm = warmup_steps(cfg, total)
        self.tracker = tracker or Tracker(run_dir, enabled=runtime.is_main, tensorboard=cfg.tensorboard)
        self.sharded = sharding.wanted(cfg.distributed, runtime)
        if self.sharded:  # before the optimizer: sharding replaces the parameters; it also places them on the device
            sharding.refuse_unsupported(plan.stream, cfg.compile)
            self.tracker.say(sharding.shard(model, runtime, cfg.precision))
        else:
            model.to(runtime.device)
        self.optimizer = make_optimizer(model, cfg, plan.lr_scale, plan.lr_hold[0] if plan.lr_hold else None)
        self.held = int(round(plan.lr_hold[1] * total)) if plan.lr_hold else 0  # steps the held groups wait
        self.ckpt_root = run_dir / "checkpoints"
        self.minimize = metric_is_min(plan.metric, cfg.metric_mode)
        self.state = TrainState(run_dir, total)
        # (step, loss sum, grad norm) not yet checked for finite values: on GPU the check syncs, so it waits
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.check_every = 1 if runtime.device.type == "cpu" else max(cfg.log_every, 1)
        self.capped: V.Scorer | None = None
        """The periodic validation on a fixed subset, when train.eval_max_batches caps it (honelm.validation)."""

    # -- before training

    def restore(self) -> dict[str, Any]:
        """Model, optimizer, state and data position from the newest checkpoint that verifies; returns its RNG state.

        Newer checkpoints that fail are named in the log and set aside (honelm.checkpoint.set_aside);
        metrics.jsonl loses the events of the steps the resumed run replays, so they are not there twice.
        """
        restored = restore_newest(self.ckpt_root, self.model, self.optimizer)
        self.runtime.barrier()  # every process has read its checkpoint before one is renamed
        for path, why in restored.refused:
            moved = set_aside(path) if self.runtime.is_main else path
            self.tracker.say(f"warning: checkpoint {path.name} refused: {why}; set aside as {moved.name}")
        if restored.refused:
            self.tracker.say(f"falling back to {restored.path.name}, the newest checkpoint that verifies")
        if not restored.verified:
            self.tracker.say(f"warning: {restored.path} has no manifest.json (written before checkpoints carried "
                             "one): its files cannot be verified; the checkpoints this run writes from now on can")
        self.state.restore(restored.state)
        self.state.resumed = True
        self.plan.stream.position = self.state.position
        dropped = self.tracker.drop_after(self.state.step)
        if not self.state.finished:
            replayed = f"; {dropped} events after it dropped from metrics.jsonl (replayed)" if dropped else ""
            self.tracker.event("info", self.state.step, message=f"resumed from {restored.path.name}{replayed}")
        return restored.rng

    def already_finished(self) -> FitResult:
        st = self.state
        self.tracker.say(f"run already finished at step {st.step}; nothing to resume")
        return FitResult(st.step, "already finished", st.best_step, self.plan.metric, st.best_value, st.train_time_s)

    def wrap_model(self) -> None:
        """Activation recomputation, DDP across processes (unless sharded: FSDP is already in place), torch.compile,
        as configured."""
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
            self.tracker.say("gradient checkpointing: on (activations recomputed in the backward pass)")
        if self.runtime.distributed and not self.sharded:
            device = self.runtime.device
            self.train_model = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda"
                                                       else None)
        if self.cfg.compile:
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]

    def choose_precision(self) -> None:
        """Threads, then precision (honelm.choices): measured on a fresh run with a margin and cached per machine,
        model and batch shape; a resumed run keeps what it recorded (RUN/choices.json, the checkpoint's precision)."""
        st, cfg = self.state, self.cfg
        recorded = ch.read_recorded(self.run_dir) if st.resumed else None
        probe: dict[str, Any] = {}  # the probe batch and its cache key, built only when something is decided
        if cfg.threads == "auto" and recorded is not None and isinstance(recorded.get("threads"), int):
            threads = ch.ThreadChoice(recorded["threads"], f"{recorded['threads']} (recorded by this run)", {})
        else:
            threads = ch.decide_threads(cfg.threads, self.runtime.device, self.runtime.world_size,
                                        lambda: self._probe(probe, "bf16" if cfg.precision == "bf16" else "fp32")(),
                                        self._probe_key(probe) if cfg.threads == "auto" else {}, cfg.probe_cache)
        torch.set_num_threads(threads.threads)
        self.tracker.event("info", 0, message=f"threads: {threads.reason}")
        for line in (threads.warning, ch.busy_warning(threads.threads, threads.fresh)):
            if line:
                self.tracker.say(line)
        if st.precision is None:
            self._probe_key(probe)
            st.precision, st.precision_reason, warning = ch.decide_precision(
                cfg.precision, self.runtime, self.model, probe["batch"], self.plan.objective.step, probe["key"],
                cfg.probe_cache)
            self.tracker.event("info", 0, message=f"precision: {st.precision_reason}")
            if warning:
                self.tracker.say(warning)
        self.runtime.precision = st.precision
        if self.runtime.is_main:
            ch.record(self.run_dir, {"threads": threads.threads, "threads_reason": threads.reason,
                                     "threads_measured_s": {str(n): t for n, t in threads.measured.items()},
                                     "precision": st.precision, "precision_reason": st.precision_reason,
                                     "load_average": ch.load_average(),
                                     "key": probe.get("key", (recorded or {}).get("key"))})

    def _probe_key(self, probe: dict[str, Any]) -> dict[str, Any]:
        """The probe batch (on the device) and the choice's cache key, kept in `probe` once built."""
        if "key" not in probe:
            self.model.train()  # the probes time what training does
            probe["batch"] = _to_device(self._probe_batch(), self.runtime.device)
            probe["key"] = ch.choice_key(self.model, probe["batch"], type(self.plan.objective).__name__,
                                         self.runtime.device)
        return probe["key"]

    def _probe(self, probe: dict[str, Any], mode: str) -> Callable[[], None]:
        self._probe_key(probe)
        return rt.probe_step(self.runtime, self.model, probe["batch"], self.plan.objective.step, mode)

    def _probe_batch(self) -> Batch:
        # a stream may supply its own probe batch (PPO's rollout stream: no items to collate before a rollout)
        stream = self.plan.stream
        own = getattr(stream, "probe_batch", None)
        if own is not None:
            return own()
        # Half a micro-batch: the fp32 probe keeps fp32 activations, which for a batch sized for bf16
        # training would set the run's peak memory above anything training itself reaches.
        rows = max(1, min(stream.bs, stream.n) // 2)
        return stream.collate([stream.item_at(p) for p in range(rows)])

    # -- training

    def train(self) -> FitResult:
        """Train from `state.step` to the end (or a stop); the final checkpoint and `end` event included."""
        st, cfg, stream = self.state, self.cfg, self.plan.stream
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.counts = count_parameters(self.model)
        self.start_time = time.perf_counter() - st.train_time_s
        self.window = _Window(torch.zeros((), device=self.runtime.device))
        # FSDP owns the sharded parameters' storage (and its bf16 policy all-gathers frozen weights in bf16 already)
        self.speed = TrainingSpeed(self.model, self.run_dir / SPILL_NAME.format(rank=self.runtime.rank),
                                   bf16=self.runtime.precision == "bf16",
                                   bf16_frozen=cfg.bf16_frozen and not self.sharded,
                                   extra=[*getattr(self.plan.objective, "frozen_models", list)(),
                                          *self.plan.frozen_models])
        self.model.train()
        self.tracker.say(f"training {st.total} steps ({self.warm} warmup, {cfg.schedule}), {stream.step_items} "
                         f"sequences per step ({stream.bs} x {stream.accum} accumulation x "
                         f"{self.runtime.world_size} processes)")
        self._cap_validation()
        self.tracker.start_progress(st.total)
        self.tracker.progress(st.step, "")
        with _Interrupt() as interrupt, self.speed:
            if self.speed.describe():
                self.tracker.say(self.speed.describe())
            while st.step < st.total:
                if self._one_step(interrupt):
                    break
            late_stop = self._wind_up(interrupt)
        return self._end(late_stop)

    def _one_step(self, interrupt: _Interrupt) -> bool:
        """One optimizer step and what follows it; True when the run stops here."""
        st, cfg = self.state, self.cfg
        lr, grad_norm = self._optimizer_step()
        if st.step % max(cfg.log_every, 1) == 0 or st.step == st.total:
            self._log_window(lr, grad_norm)
        for callback in self.callbacks:
            callback.after_step(st)
        if ((cfg.eval_every > 0 and st.step % cfg.eval_every == 0) or st.step == st.total) and self._validate():
            return True
        if cfg.save_every > 0 and st.step % cfg.save_every == 0 and st.step < st.total:
            self._checkpoint()
        if interrupt.requested:
            st.reason = "interrupted"
            return True
        return False

    def _optimizer_step(self) -> tuple[float, torch.Tensor]:
        """Accumulate, clip, check, step; returns the learning rate and the gradient norm."""
        st, cfg, window = self.state, self.cfg, self.window
        micro = self.plan.stream.next_step()
        window.tokens += sum(_tokens(b) for b in micro)
        step_loss, n_units, metrics = accumulate(self.train_model, self.plan.objective, micro, self.runtime)
        for k, v in metrics.items():
            window.metrics[k] = window.metrics.get(k, 0) + v
        # over sharded (DTensor) gradients the norm is the global one, returned as a replicated DTensor
        grad_norm = sharding.local(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0
                                                                  else float("inf")))
        self.pending.append((st.step + 1, step_loss, grad_norm.detach()))
        if len(self.pending) >= self.check_every:
            self._check_finite()  # on CPU before the update, so a bad step never touches the weights
        lr = lr_at(st.step, peak=cfg.lr, total=st.total, warmup=self.warm, schedule=cfg.schedule,
                   min_ratio=cfg.min_lr_ratio)
        set_lr(self.optimizer, lr, hold=st.step < self.held)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        window.loss += step_loss
        window.units += int(n_units)
        return lr, grad_norm

    def _check_finite(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([p[1] for p in self.pending])
        norms = torch.stack([p[2] for p in self.pending])
        bad = ~(torch.isfinite(losses) & torch.isfinite(norms))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            bad_step, what = self.pending[i][0], ("loss" if not torch.isfinite(losses[i]) else "gradient norm")
            last = newest_good_checkpoint(self.ckpt_root)
            hint = f"; the newest checkpoint that verifies is {last}" if last else ""
            raise TrainingError(f"non-finite {what} ({float(losses[i] if what == 'loss' else norms[i])}) at step "
                                f"{bad_step}: try a lower train.lr, train.precision=fp32 or check the data{hint}")
        self.pending.clear()

    def _log_window(self, lr: float, grad_norm: torch.Tensor) -> None:
        """The `train` event: means over the steps since the last one."""
        self._check_finite()
        window, world = self.window, self.runtime.world_size
        elapsed = time.perf_counter() - window.started
        local_units = max(window.units / world, 1)
        fields = {"epoch": round(self.plan.stream.epoch, 4), "loss": float(window.loss) / local_units, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens_per_s": window.tokens * world / max(elapsed, 1e-9)}
        fields.update({k: float(v) / local_units for k, v in window.metrics.items()})
        self.tracker.event("train", self.state.step, **fields)
        self.tracker.progress(self.state.step, f"loss {fields['loss']:.4f} · {fields['tokens_per_s']:,.0f} tok/s")
        window.reset()

    # -- validation and saving

    def _validate(self) -> bool:
        """Validate (when there is validation), keep the best, ask the callbacks; True when the run stops here."""
        st = self.state
        if self.plan.evaluate is None:
            return False
        st.last_eval = self._score(self.capped or self.plan.evaluate)
        self.tracker.event("eval", st.step, split="val", **st.last_eval, **({"subset": True} if self.capped else {}))
        self._keep_best()
        stop = ""
        for callback in self.callbacks:  # each sees every validation; the last reason given stands
            stop = str(callback.after_eval(st, dict(st.last_eval)) or stop)
        if stop:
            st.reason = stop
            self.tracker.event("info", st.step, message=f"stopped by {stop} after this validation")
            return True
        if self.cfg.patience > 0 and st.bad_evals >= self.cfg.patience:
            st.reason = "early_stop"
            self.tracker.event("early_stop", st.step, patience=self.cfg.patience, best_step=st.best_step)
            return True
        return False

    def _score(self, evaluate: V.Scorer) -> dict[str, float]:
        with self.speed.evaluation():
            self.model.eval()
            with torch.no_grad(), self.runtime.autocast():
                metrics = evaluate(self.model)
            self.model.train()
        return metrics

    def _cap_validation(self) -> None:
        """Periodic validations on a fixed subset when train.eval_max_batches caps them (a `Validation` plan only)."""
        evaluate, cfg = self.plan.evaluate, self.cfg
        cap = V.eval_cap(cfg, self.plan.stream.step_items)
        if evaluate is not None and not isinstance(evaluate, V.Validation) and cfg.eval_max_batches > 0:
            self.tracker.say(f"note: train.eval_max_batches={cfg.eval_max_batches} does not apply here: this "
                             "stage's validation cannot be cut to a subset, so every validation scores all of it")
        if not isinstance(evaluate, V.Validation) or cap <= 0 or cap >= evaluate.items:
            return
        if self.sharded:  # the kept best weights would be one rank's shards: a sharded run validates on all of it
            self.tracker.say("validation: not capped under train.distributed=fsdp (every validation scores all of it)")
            return
        self.capped, size = evaluate.subset(cap)
        why = (f"train.eval_max_batches={cfg.eval_max_batches}" if cfg.eval_max_batches > 0 else
               f"train.eval_max_batches=auto: 1/{V.AUTO_SHARE} of the {cfg.eval_every * self.plan.stream.step_items} "
               f"items trained between validations, at least {V.AUTO_MIN_BATCHES} batches")
        self.tracker.say(f"validation: periodic validations on a fixed subset of {size} of {evaluate.items} "
                         f"{evaluate.unit} ({why}; evenly spread, the same every time); the best is chosen on it, "
                         f"and at the end the best and the final model are evaluated on all {evaluate.items} "
                         "and the better one becomes best/ (train.eval_max_batches=0: no cap)")

    def _keep_best(self) -> None:
        st, metric = self.state, self.plan.metric
        value = st.last_eval.get(metric)
        if value is None:
            raise HonelmError(f"train.metric={metric!r} is not among the validation metrics {sorted(st.last_eval)}")
        # A coarse metric (accuracy on a small validation set) often ties; a tie with a lower
        # validation loss is progress, so it becomes the best and patience is not spent on it.
        loss, best = st.last_eval.get("val_loss"), st.best_value
        tie_better = (value == best and metric != "val_loss" and loss is not None and st.best_loss is not None
                      and loss < st.best_loss)
        if best is None or (value < best if self.minimize else value > best) or tie_better:
            st.best_value, st.best_step, st.bad_evals, st.best_loss = value, st.step, 0, loss
            if self.capped is not None:  # best/ is written from the whole set at the end (never capped when sharded)
                if self.runtime.is_main:
                    V.save_best_weights(self.run_dir, st.step, self.model)
            elif self.runtime.is_main or self.sharded:
                self._save_best({"step": st.step, "metric": metric, "value": value, **st.last_eval})
            self.tracker.event("best", st.step, metric=metric, value=value)
        else:
            st.bad_evals += 1

    def _save_best(self, info: dict[str, Any]) -> None:
        """save_best, with the exact fp32 weights back around it when it writes base weights.

        Sharded, every rank calls this: the full weights are gathered to rank 0, which saves them."""
        if self.sharded:
            with sharding.gathered(self.model, self.runtime) as holder:
                if holder:
                    self.plan.save_best(self.model, info)
            return
        with self.speed.exact_weights() if self.plan.best_writes_base() else contextlib.nullcontext():
            self.plan.save_best(self.model, info)

    def _checkpoint(self, finished: bool = False) -> None:
        st = self.state
        st.position, st.finished = self.plan.stream.position, finished
        st.train_time_s = time.perf_counter() - self.start_time
        rng = rt.rng_state()
        if self.sharded:  # every process writes its shard (rank 0's RNG state stands for all, as under DDP)
            path = save_sharded_checkpoint(self.ckpt_root, st.step, self.model, self.optimizer, st.checkpoint_fields(),
                                           rng, self.cfg.keep_checkpoints, self.runtime)
            self.tracker.event("checkpoint", st.step, path=str(path.relative_to(self.run_dir)))
        elif self.runtime.is_main:
            with self.speed.exact_weights():  # checkpoints hold the exact fp32 weights
                path = save_training_checkpoint(self.ckpt_root, st.step, self.model, self.optimizer,
                                                st.checkpoint_fields(), rng, self.cfg.keep_checkpoints)
            self.tracker.event("checkpoint", st.step, path=str(path.relative_to(self.run_dir)))
        self.runtime.barrier()

    # -- the end

    def _wind_up(self, interrupt: _Interrupt) -> bool:
        """The last checks and saves; returns whether a stop came too late to interrupt the run."""
        st = self.state
        self._check_finite()
        if self.plan.evaluate is None and (self.runtime.is_main or self.sharded):
            st.best_step = st.step
            self._save_best({"step": st.step, "metric": None, "value": None})
        if self.capped is not None and st.reason != "interrupted":
            self._full_validation()
        elif self.capped is not None:
            self.tracker.say("best/ is written at the end of the run, from the whole validation set (validation is "
                             "capped): `--resume` finishes it")
        self._checkpoint(finished=st.reason != "interrupted")
        return interrupt.requested and st.reason != "interrupted"

    def _full_validation(self) -> None:
        """Under a cap: the best model (chosen on the subset) and the final one on the whole validation set; the better
        becomes best/ with those numbers. The final weights are back in the model after."""
        st, metric = self.state, self.plan.metric
        self.runtime.barrier()  # the main process wrote the best weights
        final = {k: v.detach().clone() for k, v in V.trainable(self.model).items()}
        kept = V.load_best_weights(self.run_dir, st.best_step) if st.best_step != st.step else None
        if st.best_step != st.step and kept is None:
            self.tracker.say(f"note: {V.BEST_WEIGHTS} does not hold the weights of the best step {st.best_step}: the "
                             "final model is the only candidate for best/")
        full = self.plan.evaluate
        assert full is not None
        best_metrics = None
        if kept is not None:
            V.put_weights(self.model, kept)
            best_metrics = self._score(full)
            self.tracker.event("eval_full", st.step, split="val", model_step=st.best_step, **best_metrics)
            V.put_weights(self.model, final)
        final_metrics = self._score(full)  # last: a stage's kept records (val predictions) are the final model's
        self.tracker.event("eval_full", st.step, split="val", model_step=st.step, **final_metrics)
        winner, metrics = st.step, final_metrics
        if best_metrics is not None and self._better(best_metrics[metric], final_metrics[metric]):
            V.put_weights(self.model, kept)  # type: ignore[arg-type]
            winner, metrics = st.best_step, self._score(full)  # again, so the kept records are the best model's
        st.best_step, st.best_value, st.best_loss = winner, metrics[metric], metrics.get("val_loss")
        st.last_eval = final_metrics
        if self.runtime.is_main:
            self._save_best({"step": winner, "metric": metric, "value": st.best_value, **metrics,
                             "validation": "full"})
        self.tracker.event("best", winner, metric=metric, value=st.best_value, validation="full")
        V.put_weights(self.model, final)
        self.runtime.barrier()  # every process has read the kept weights
        if self.runtime.is_main:
            (self.run_dir / V.BEST_WEIGHTS).unlink(missing_ok=True)  # best/ holds the best model now

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.minimize else a > b

    def _end(self, late_stop: bool) -> FitResult:
        st = self.state
        if st.reason == "interrupted":
            self.tracker.say(f"interrupted at step {st.step}: resume with `--resume` (checkpoint saved)")
        if late_stop:  # the request came after the last step's check: the run is complete, the command stops here
            self.tracker.say(f"stop requested while the final checkpoint was written: the run finished at step "
                             f"{st.step} and is saved; nothing after it starts")
        # cost of the run, read by `honelm ablate`: peak memory since the CLI (or the search) started
        # this run (rt.reset_peak_memory; after a resume, only the resumed part)
        n_trainable, n_total = self.counts
        self.tracker.event("end", st.step, reason=st.reason, best_step=st.best_step, best_metric=self.plan.metric,
                           best_value=st.best_value, train_time_s=round(st.train_time_s, 2),
                           trainable_params=n_trainable, total_params=n_total, **rt.peak_memory_mb(self.runtime.device))
        return FitResult(st.step, st.reason, st.best_step, self.plan.metric, st.best_value, st.train_time_s,
                         st.last_eval, stop_requested=late_stop)


def fit(model: nn.Module, plan: TrainPlan, cfg: TrainConfig, runtime: rt.Runtime, run_dir: Path, *,
        tracker: Tracker | None = None, resume: bool = False, callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train `model` as `plan` says; see the module docstring for the contract.

    With `resume`, the newest checkpoint under run_dir/checkpoints is restored first (a run that
    had finished returns at once). `callbacks` act at the run's start, after each step, after each
    validation and at its end (`Callback`).
    """
    run = _Run(model, plan, cfg, runtime, run_dir, tracker, callbacks)  # on the device (sharded, with FSDP)
    rng = run.restore() if resume else None
    if run.state.finished:
        return run.already_finished()
    run.wrap_model()
    run.choose_precision()
    for callback in run.callbacks:
        callback.on_start(run.state)
    if rng is not None:
        rt.set_rng_state(rng)  # last: everything above must not consume the restored streams
    result = run.train()
    for callback in run.callbacks:
        callback.on_end(run.state, result)
    return result
