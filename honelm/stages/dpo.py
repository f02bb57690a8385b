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
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from honelm import runtime as rt
from honelm.boosters import StageConfig
from honelm.boosters.base import ADAPTER_REFERENCE
from honelm.boosters.lora import LoraConfig
from honelm.checkpoint import checkpoint_precision
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.preferences import EncodedPairs
from honelm.errors import ConfigError, HonelmError
from honelm.loop import Callback, TrainState
from honelm.models import model_kind
from honelm.objectives.dpo import DPO, evaluate_pairs, precompute_reference
from honelm.stages import preference as P
from honelm.stages.contract import Plan, RunContext

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
class DPOConfig(StageConfig):
    """Direct preference optimisation of a causal LM."""

    verb = "dpo"
    capabilities = frozenset({ADAPTER_REFERENCE})

    run: RunConfig = section(RunConfig)
    data: P.PreferenceDataConfig = section(P.PreferenceDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_dpo_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    dpo: DPOObjectiveConfig = section(DPOObjectiveConfig)

    def validate(self) -> None:
        super().validate()
        if not self.model.init_from and self.model.arch != "decoder":
            raise ConfigError("dpo trains a causal LM: model.arch must be decoder (or give model.init_from)")


class PrecomputedReference(Callback):
    """The starting model's log-probs of every train and validation pair, in the training precision.

    A plan callback: on a fresh run, `on_start` computes them once the loop has chosen the
    precision (its probe step reads the zeros stored meanwhile), so at step 0 policy and reference
    log-probs are equal (all implicit rewards 0), which an fp32 reference against a bf16 policy
    would not give. A resumed run computes them in `DPOStage.before_boosters`, in the checkpoint's
    precision, while `loaded.model` is still the starting model.
    """

    def __init__(self, ctx: RunContext, loaded: Any, train: EncodedPairs, val: EncodedPairs | None):
        self.ctx, self.loaded, self.train, self.val = ctx, loaded, train, val
        self.pairs = [d for d in (train, val) if d is not None and len(d)]
        for data in self.pairs:  # what fit's probe step reads before `on_start`
            data.ref_logps = torch.zeros(len(data), 2)

    def on_start(self, state: TrainState) -> None:
        if not state.resumed:
            self.precompute(state.precision)

    def precompute(self, precision: str) -> None:
        ctx, started = self.ctx, time.perf_counter()
        autocast = rt.Runtime(device=ctx.device, precision=precision).autocast
        # on a fresh run the model the loop trains (the runner's boosted record: LoRA-wrapped, adapters at
        # zero); on resume, before the boosters, the starting model as loaded
        model = (ctx.loaded or self.loaded).model
        precompute_reference(model, self.pairs, ctx.cfg.train.eval_batch_size, ctx.device, autocast)
        ctx.say(f"reference: log-probs of the starting model precomputed for {len(self.train)} train + "
                f"{len(self.val) if self.val else 0} validation pairs in {time.perf_counter() - started:.1f}s "
                f"({precision}, the training precision); no reference model is kept")


class DPOStage(P.PreferenceStage):
    """A causal LM trained on pairs against its frozen starting point; validation and test: loss, implicit rewards."""

    name = "dpo"
    config = DPOConfig

    def before_boosters(self, ctx: RunContext, loaded: Any) -> None:
        cfg = ctx.cfg
        if model_kind(loaded.model) != "decoder":
            raise HonelmError(f"dpo trains a causal LM; {cfg.model.init_from} is an encoder")
        if cfg.dpo.disable_dropout:
            n = P.disable_dropout(loaded.model)
            if n:
                ctx.say(f"dropout: turned off in {n} places (dpo.disable_dropout=true)")
        train, val = self.encode_training(ctx, loaded.model)
        ctx.extra.update(train=train, val=val)
        ctx.say(self.data_line(train, val))
        location = P.reference_location(loaded, ctx.tokenizer, ctx.run_dir, cfg.lora.enabled, ctx.runtime)
        ctx.write_json(P.REFERENCE_FILE, location)
        self.choose_reference(ctx, loaded, train, val)

    def choose_reference(self, ctx: RunContext, loaded: Any, train: EncodedPairs, val: EncodedPairs | None) -> None:
        """Before LoRA applies: stored log-probs, the adapter-disabled policy, or a frozen copy (ctx.extra)."""
        cfg = ctx.cfg
        ctx.extra["reference"], ctx.extra["callbacks"] = None, []
        if cfg.dpo.precompute_ref:
            precomputed = PrecomputedReference(ctx, loaded, train, val)
            if ctx.resume:  # the starting model is still what `loaded.model` holds; the precision is the checkpoint's
                precomputed.precompute(checkpoint_precision(ctx.run_dir))
            ctx.extra["callbacks"] = [precomputed]
        elif cfg.lora.enabled:
            ctx.say("reference: the policy with its LoRA adapters disabled (the model LoRA was applied to)")
        else:
            ctx.extra["reference"] = copy.deepcopy(loaded.model).to(ctx.device).eval().requires_grad_(False)
            ctx.say("reference: a frozen copy of the starting model (dpo.precompute_ref=true or LoRA avoid the copy)")

    def objective(self, ctx: RunContext, reference: nn.Module | None) -> DPO:
        ctx.extra["objective"] = DPO(ctx.cfg.dpo.beta, ctx.cfg.dpo.loss, ctx.cfg.dpo.label_smoothing, reference)
        return ctx.extra["objective"]

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg, train, val = ctx.cfg, ctx.extra["train"], ctx.extra["val"]
        objective = self.objective(ctx, ctx.extra["reference"])
        ctx.say(f"objective: {cfg.dpo.loss} loss, beta {cfg.dpo.beta}"
                + (f", label smoothing {cfg.dpo.label_smoothing} (cDPO)" if cfg.dpo.label_smoothing else ""))
        evaluate = (lambda m: self.score(ctx, m, val, "val")) if val is not None and len(val) else None
        return Plan(objective, self.stream(ctx, train), evaluate, metric=cfg.train.metric or objective.default_metric,
                    callbacks=ctx.extra["callbacks"])

    def score(self, ctx: RunContext, model: nn.Module, data: EncodedPairs, split: str) -> dict[str, float]:
        """Against the reference of `ctx.extra["objective"]` (the run's, or the one `test` loaded)."""
        return evaluate_pairs(model, data, ctx.extra["objective"], ctx.cfg.train.eval_batch_size, ctx.device, split)

    def test(self, ctx: RunContext, rows: list[Any]) -> dict[str, Any]:
        """Test loss and implicit-reward metrics of best/ (the policy) against the run's reference."""
        policy = self.load_best(ctx).to(ctx.device).eval()
        reference = P.load_reference(ctx.run_dir).to(ctx.device).eval()
        data = self.encode_test(ctx, rows)
        self.objective(ctx, reference)
        with torch.no_grad():
            out: dict[str, Any] = self.score(ctx, policy, data, "test")
        return {**out, "n_pairs": len(data), "n_dropped": len(data.dropped)}
