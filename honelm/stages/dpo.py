"""`honelm dpo`: preference optimisation of a causal LM: DPO's variants, KTO, ORPO, SimPO (METHODS.md §4.3).

The policy starts from `model.init_from` (a LoRA adapter directory is merged into its base first).
`dpo.loss` chooses the objective (`honelm.objectives.preference`; docs/preference.md); the
reference-anchored ones score against the starting model, frozen (`honelm.stages.reference`), orpo
and simpo against none; kto reads unpaired examples (`honelm.data.unpaired`). Dropout is off by
default (`dpo.disable_dropout`). The best checkpoint keeps each validation unit's score record
(best/val_predictions.jsonl; `honelm test`: test_predictions.jsonl), which `honelm ablate` compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.base import ADAPTER_REFERENCE
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.sections import PreferenceDataConfig
from honelm.errors import ConfigError, HonelmError
from honelm.models import model_kind
from honelm.objectives import preference as losses
from honelm.objectives.dpo import DPOObjectiveConfig, evaluate_pairs
from honelm.stages import preference as P
from honelm.stages.contract import Plan, RunContext
from honelm.stages.reference import load_reference, prepare_reference


def _dpo_train_defaults() -> TrainConfig:
    # TRL DPOConfig: lr 1e-6, linear decay, no weight decay; the DPO paper warms up linearly
    return TrainConfig(lr=1e-6, weight_decay=0.0, adam_beta2=0.999, warmup_ratio=0.1, schedule="linear",
                       min_lr_ratio=0.0, epochs=1.0, batch_size=8, eval_every=50, eval_batch_size=16)


@dataclass
class DPOConfig(P.PairsConfig):
    """Preference optimisation of a causal LM (DPO, cDPO, IPO, hinge, KTO, ORPO, SimPO)."""

    verb = "dpo"
    capabilities = P.PairsConfig.capabilities | {ADAPTER_REFERENCE}

    run: RunConfig = section(RunConfig)
    data: PreferenceDataConfig = section(PreferenceDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_dpo_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)
    dpo: DPOObjectiveConfig = section(DPOObjectiveConfig)

    def validate(self) -> None:
        super().validate()
        if not self.model.init_from and self.model.arch != "decoder":
            raise ConfigError("dpo trains a causal LM: model.arch must be decoder (or give model.init_from)")
        if self.dpo.unpaired and self.adversarial.method != "none":
            raise ConfigError("adversarial.method: KTO's unpaired examples are not pairs; use it with a pairwise dpo.loss")


class DPOStage(P.PreferenceStage):
    """A causal LM trained on preferences (against its frozen start, unless orpo/simpo); scored: loss, implicit rewards."""

    name = "dpo"
    config = DPOConfig
    record_metrics = losses.PAIR_RECORDS

    def unpaired(self, cfg: DPOConfig) -> bool:
        return cfg.dpo.unpaired

    def record_metrics_of(self, cfg: DPOConfig) -> tuple[str, ...]:
        return losses.record_metrics(cfg.dpo)

    def before_boosters(self, ctx: RunContext, loaded: Any) -> None:
        cfg = ctx.cfg
        if model_kind(loaded.model) != "decoder":
            raise HonelmError(f"dpo trains a causal LM; {cfg.model.init_from} is an encoder")
        self.dropout_off(ctx, loaded.model, "dpo")
        train, val = self.encode_training(ctx, loaded.model)
        ctx.extra.update(train=train, val=val)
        ctx.say(self.data_line(train, val))
        ctx.extra["reference"], ctx.extra["callbacks"] = prepare_reference(ctx, loaded, train, val)

    def objective(self, ctx: RunContext, reference: nn.Module | None) -> Any:
        ctx.extra["objective"] = losses.build(ctx.cfg.dpo, reference)
        return ctx.extra["objective"]

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg, train, val = ctx.cfg, ctx.extra["train"], ctx.extra["val"]
        objective = self.objective(ctx, ctx.extra["reference"])
        for line in losses.describe(cfg.dpo, train):
            ctx.say(line)
        evaluate = (lambda m: self.score(ctx, m, val, "val")) if val is not None and len(val) else None
        return Plan(objective, self.stream(ctx, train), evaluate, metric=cfg.train.metric or objective.default_metric,
                    callbacks=ctx.extra["callbacks"])

    def score(self, ctx: RunContext, model: nn.Module, data: Any, split: str) -> dict[str, float]:
        """Against the reference of `ctx.extra["objective"]` (the run's, or the one `test` loaded), if it has one."""
        return evaluate_pairs(model, data, ctx.extra["objective"], ctx.cfg.train.eval_batch_size, ctx.device, split,
                              ctx.records(split))

    def test_setup(self, ctx: RunContext) -> None:
        """Test data is scored against the run's reference (RUN/reference.json); orpo/simpo have none."""
        self.objective(ctx, None if ctx.cfg.dpo.reference_free else load_reference(ctx.run_dir).to(ctx.device).eval())
