"""`honelm dpo`: direct preference optimisation of a causal LM against a frozen reference (METHODS.md §4.3).

The policy starts from `model.init_from` (an sft run, typically; a LoRA adapter directory is loaded
merged into its base first, by `honelm.models.load_model`). The reference is that same starting
model, frozen, obtained one of three ways:

  dpo.precompute_ref=true   its log-probs of every train and validation pair are computed in one
                            no-grad pass before training and stored per pair; no reference model
                            is kept in memory while training
  lora.enabled=true         the policy with its adapters disabled (peft `disable_adapter()`): the
                            model LoRA was applied to, i.e. the starting policy, with no copy
  otherwise                 a frozen copy of the starting policy

Dropout is turned off in both by default (`dpo.disable_dropout`), so policy = reference at step 0
(all implicit rewards 0). Losses, metrics and the maths: `honelm.objectives.dpo`. Validation
reports the loss and every metric on the validation pairs; the best checkpoint is kept.
`RUN/reference.json` records where the reference's weights are, so `honelm test` scores the test
pairs against the same reference.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from honelm import boosters
from honelm import runtime as rt
from honelm.boosters.lora import LoraConfig, mutates_base
from honelm.checkpoint import atomic_directory, best_writes_base, list_checkpoints, save_pretrained_atomic
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.preferences import EncodedPairs
from honelm.errors import ConfigError, HonelmError
from honelm.loop import BatchStream, Callback, TrainPlan, TrainState, fit
from honelm.objectives.dpo import DPO
from honelm.objectives.logprobs import sequence_logps
from honelm.stages import preference as P
from honelm.stages import setup as S

REFERENCE_FILE = "reference.json"


@dataclass
class DPOObjectiveConfig:
    """The DPO-family loss and its reference model."""

    beta: float = 0.1
    """β: how far the policy may move from the reference (larger = stays closer); for ipo it is τ."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid (DPO: -log σ(β·h)), ipo ((h/tokens - 1/(2β))², length-normalised as in TRL) or hinge (max(0, 1 - β·h))."""
    label_smoothing: float = 0.0
    """cDPO: the probability ε that a pair's preference is flipped; loss (1-ε)·L(c, r) + ε·L(r, c); sigmoid only, 0 <= ε < 0.5. Current TRL ignores label_smoothing for sigmoid (TRL 0.12 applied it like this)."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every train and validation pair in one no-grad pass before training and keep only those (no reference model in memory while training)."""
    disable_dropout: bool = True
    """Turn off every dropout of policy and reference (TRL's disable_dropout), so both score a sequence the same at step 0."""

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing (cDPO) applies to dpo.loss=sigmoid only, not {self.loss}")


def _dpo_train_defaults() -> TrainConfig:
    # TRL DPOConfig: lr 1e-6, linear decay, no weight decay; the DPO paper warms up linearly
    return TrainConfig(lr=1e-6, weight_decay=0.0, adam_beta2=0.999, warmup_ratio=0.1, schedule="linear",
                       min_lr_ratio=0.0, epochs=1.0, batch_size=8, eval_every=50, eval_batch_size=16)


@dataclass
class DPOConfig:
    """Direct preference optimisation of a causal LM."""

    run: RunConfig = section(RunConfig)
    data: P.PreferenceDataConfig = section(P.PreferenceDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_dpo_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    dpo: DPOObjectiveConfig = section(DPOObjectiveConfig)

    def validate(self) -> None:
        if not self.model.init_from and self.model.arch != "decoder":
            raise ConfigError("dpo trains a causal LM: model.arch must be decoder (or give model.init_from)")
        if self.lora.enabled and mutates_base(self.lora.init):
            raise ConfigError(f"dpo with lora.init={self.lora.init}: that init rewrites the base weights, so the "
                              "adapter-disabled model is not the starting policy (DPO's reference); "
                              "use the default init")


def evaluate_pairs(model: nn.Module, data: EncodedPairs, objective: DPO, batch_size: int, device: torch.device,
                   prefix: str) -> dict[str, float]:
    """Mean loss and every DPO metric over `data` (sums over pairs / pairs)."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    total, sums = 0.0, {}
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in data.collate(order[start:start + batch_size]).items()}
        loss = objective(model, batch)
        total += float(loss.value)
        for k, v in loss.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    n = max(len(data), 1)
    return {f"{prefix}_loss": total / n, **{f"{prefix}_{k}": v / n for k, v in sums.items()}}


def precompute_reference(model: nn.Module, splits: list[EncodedPairs], batch_size: int, device: torch.device,
                         autocast: Any) -> None:
    """Store the model's summed completion log-probs of every pair as `data.ref_logps` (N, 2) [chosen, rejected]."""
    was_training = model.training
    model.to(device).eval()
    with torch.no_grad():
        for data in splits:
            out = torch.empty(len(data), 2)
            order = sorted(range(len(data)), key=lambda i: data.lengths[i])
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = {k: v.to(device) for k, v in data.collate(idx).items()}
                with autocast():
                    logps = sequence_logps(model, batch, right_padded=True)[0].float().cpu()  # (2P,)
                out[idx, 0], out[idx, 1] = logps.chunk(2)
            data.ref_logps = out
    model.train(was_training)


class PrecomputedReference(Callback):
    """dpo.precompute_ref: the starting model's log-probs of every pair, in the precision the policy
    trains in: at step 0 policy and reference log-probs are then equal (all implicit rewards 0),
    which an fp32 reference against a bf16 policy would not give.

    As a callback it computes them once fit() has chosen the precision, before the first step of a
    fresh run; a resumed run calls `compute` itself, in its checkpoint's precision, before training.
    """

    def __init__(self, model: nn.Module, train: EncodedPairs, val: EncodedPairs | None, batch_size: int,
                 device: torch.device, say: Callable[[str], None]) -> None:
        self.model, self.train, self.val, self.batch_size = model, train, val, batch_size
        self.device, self.say = device, say

    def compute(self, precision: str) -> None:
        started = time.perf_counter()
        autocast = rt.Runtime(device=self.device, precision=precision).autocast
        splits = [d for d in (self.train, self.val) if d is not None and len(d)]
        precompute_reference(self.model, splits, self.batch_size, self.device, autocast)
        self.say(f"reference: log-probs of the starting model precomputed for {len(self.train)} train + "
                 f"{len(self.val) if self.val else 0} validation pairs in {time.perf_counter() - started:.1f}s "
                 f"({precision}, the training precision); no reference model is kept")

    def on_start(self, state: TrainState) -> None:
        if not state.resumed:
            self.compute(str(state.precision))  # chosen before on_start


def checkpoint_precision(run_dir: Path) -> str:
    """The precision ("bf16"/"fp32") a run's newest checkpoint trained in."""
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise HonelmError(f"{run_dir}: --resume asked for, but there is no checkpoint under {run_dir / 'checkpoints'}")
    state = json.loads((found[-1] / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("precision") not in ("bf16", "fp32"):
        raise HonelmError(f"{found[-1] / 'trainer_state.json'}: no training precision recorded")
    return state["precision"]


def reference_location(model: nn.Module, tokenizer: Any, run_dir: Path, lora: bool, runtime: rt.Runtime) -> dict:
    """Where `honelm test` finds the reference weights; writes RUN/reference/ when they exist on no disk."""
    if lora:  # the adapter's base (the init_from checkpoint or RUN/base/), named in best/adapter_config.json
        return {"kind": "adapter_base"}
    source = getattr(model, "honelm_source", None)
    if source:
        return {"kind": "checkpoint", "path": source}
    target = run_dir / "reference"
    if runtime.is_main and not (target / "config.json").is_file():
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return {"kind": "checkpoint", "path": str(target.resolve())}


def run(cfg: DPOConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    runtime = rt.setup(cfg.train.threads)
    rt.seed_everything(cfg.run.seed)
    run_dir = S.run_directory("dpo", cfg, runtime, resume)
    tracker = S.tracker_for(run_dir, runtime, cfg)
    splits, tokenizer = P.prepare(cfg, run_dir, runtime, tracker, resume is not None)
    model = S.resolve_model(cfg.model, "lm", tokenizer, cfg.run.seed, tracker.say,
                            carry=boosters.carries_adapter(cfg, "dpo"))
    from honelm.models import model_kind

    if model_kind(model) != "decoder":
        raise HonelmError(f"dpo trains a causal LM; {cfg.model.init_from} is an encoder")
    if cfg.dpo.disable_dropout:
        n = P.disable_dropout(model)
        if n:
            tracker.say(f"dropout: turned off in {n} places (dpo.disable_dropout=true)")
    S.check_block_fits(model, cfg.data.max_length, "data.max_length")
    train = P.encode_split(tokenizer, splits.train, cfg.data, "train", tracker.say)
    val = P.encode_split(tokenizer, splits.val, cfg.data, "validation", tracker.say) if splits.val else None
    if not len(train):
        raise HonelmError("no training pair is left after truncation: raise data.max_length")
    tracker.say(f"data: {len(train)} train pairs, {len(val) if val else 0} validation pairs")
    location = reference_location(model, tokenizer, run_dir, cfg.lora.enabled, runtime)
    if runtime.is_main:
        S.write_json(run_dir / REFERENCE_FILE, location)

    reference = None
    if cfg.dpo.precompute_ref:
        if resume:  # the starting model is still what `model` holds; the precision is the checkpoint's
            PrecomputedReference(model, train, val, cfg.train.eval_batch_size, runtime.device,
                                 tracker.say).compute(checkpoint_precision(run_dir))
        else:  # fit chooses the precision first (its probe step reads these zeros), then the callback fills them
            for data in (train, val):
                if data is not None and len(data):
                    data.ref_logps = torch.zeros(len(data), 2)
    elif cfg.lora.enabled:
        tracker.say("reference: the policy with its LoRA adapters disabled (the model LoRA was applied to)")
    else:
        reference = copy.deepcopy(model).to(runtime.device).eval().requires_grad_(False)
        tracker.say("reference: a frozen copy of the starting model (dpo.precompute_ref=true or LoRA avoid the copy)")
    model = boosters.apply(model, cfg, "lm", tracker.say)
    objective = DPO(cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing, reference)
    tracker.say(f"objective: {cfg.dpo.loss} loss, beta {cfg.dpo.beta}"
                + (f", label smoothing {cfg.dpo.label_smoothing} (cDPO)" if cfg.dpo.label_smoothing else ""))
    stream = BatchStream(len(train), train.collate, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                         runtime.world_size, runtime.rank, lengths=train.lengths)
    evaluate = ((lambda m: evaluate_pairs(m, val, objective, cfg.train.eval_batch_size, runtime.device, "val"))
                if val is not None and len(val) else None)
    if cfg.dpo.precompute_ref:  # on the model fit() trains; a no-op for a resumed run (computed above)
        callbacks = [PrecomputedReference(model, train, val, cfg.train.eval_batch_size, runtime.device, tracker.say),
                     *callbacks]
    plan = TrainPlan(objective, stream, evaluate,
                     lambda m, info: save_pretrained_atomic(m, tokenizer, run_dir / "best", info),
                     cfg.train.metric or objective.default_metric,
                     best_writes_base=functools.partial(best_writes_base, model, run_dir))
    result = fit(model, plan, cfg.train, runtime, run_dir, tracker=tracker, resume=resume is not None,
                 callbacks=callbacks)
    tracker.close()
    return {"run_dir": str(run_dir), "steps": result.steps, "reason": result.reason, "best_step": result.best_step,
            "stop_requested": result.stop_requested, **result.last_eval}


def load_reference(run_dir: Path) -> nn.Module:
    """The frozen reference a DPO run trained against, from RUN/reference.json."""
    from honelm.boosters.lora import adapter_info
    from honelm.models import load_model

    path = run_dir / REFERENCE_FILE
    if not path.is_file():
        raise HonelmError(f"{run_dir}: no {REFERENCE_FILE} (where the reference model is)")
    info = json.loads(path.read_text(encoding="utf-8"))
    where = (adapter_info(run_dir / "best")["base_model_name_or_path"] if info.get("kind") == "adapter_base"
             else info.get("path"))
    if not where or not Path(where).exists():
        raise HonelmError(f"{run_dir}: the reference model {where} does not exist (moved or deleted?)")
    return load_model(where, "lm")


def evaluate_test(run_dir: Path, cfg: DPOConfig, test_rows: list[Any], train_rows: list[Any]) -> dict[str, Any]:
    """Test loss and implicit-reward metrics of the best policy against its reference (honelm.protocol.test only)."""
    from honelm.models import load_model
    from honelm.tokenizer import load_tokenizer

    device = rt.setup().device
    best = run_dir / "best"
    if not ((best / "config.json").is_file() or (best / "adapter_config.json").is_file()):
        raise HonelmError(f"{run_dir}: no best/ model to test")
    tokenizer = load_tokenizer(best)
    policy = load_model(best, "lm").to(device).eval()
    reference = load_reference(run_dir).to(device).eval()
    data = P.encode_split(tokenizer, test_rows, cfg.data, "test", print)
    if not len(data):
        raise HonelmError(f"{run_dir}: no test pair is left after truncation at data.max_length={cfg.data.max_length}")
    objective = DPO(cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing, reference)
    with torch.no_grad():
        out: dict[str, Any] = evaluate_pairs(policy, data, objective, cfg.train.eval_batch_size, device, "test")
    out.update(n_pairs=len(data), n_dropped=len(data.dropped))
    return out
