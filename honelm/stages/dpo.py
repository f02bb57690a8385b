"""`honelm dpo`: direct preference optimisation of a causal LM against a frozen reference (METHODS.md §4.3).

The policy starts from `model.init_from` (an sft run, typically; a LoRA adapter directory is loaded
merged into its base first, by `honelm.models.load_model`). The reference is that same starting
model, frozen: stored log-probs (`dpo.precompute_ref`), the policy with its LoRA adapters disabled,
or a frozen copy (`honelm.stages.reference`, which also records it in `RUN/reference.json` so
`honelm test` scores the test pairs against the same reference).

Dropout is turned off in both by default (`dpo.disable_dropout`), so policy = reference at step 0
(all implicit rewards 0). Losses, metrics and the maths: `honelm.objectives.dpo`. Validation
reports the loss and every metric on the validation pairs; the best checkpoint is kept, with each
validation pair's score record (best/val_predictions.jsonl; `honelm test`: test_predictions.jsonl),
whose implicit-reward accuracy, margin and loss `honelm ablate` compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.base import ADAPTER_REFERENCE
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.preferences import EncodedPairs
from honelm.data.sections import PreferenceDataConfig
from honelm.errors import ConfigError, HonelmError
from honelm.models import model_kind
from honelm.objectives.dpo import DPO, DPOObjectiveConfig, evaluate_pairs
from honelm.stages import preference as P
from honelm.stages.contract import Plan, RunContext
from honelm.stages.reference import REFERENCE_FILE, choose_reference, load_reference, reference_location


def _dpo_train_defaults() -> TrainConfig:
    # TRL DPOConfig: lr 1e-6, linear decay, no weight decay; the DPO paper warms up linearly
    return TrainConfig(lr=1e-6, weight_decay=0.0, adam_beta2=0.999, warmup_ratio=0.1, schedule="linear",
                       min_lr_ratio=0.0, epochs=1.0, batch_size=8, eval_every=50, eval_batch_size=16)


@dataclass
class DPOConfig(P.PairsConfig):
    """Direct preference optimisation of a causal LM."""

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


class DPOStage(P.PreferenceStage):
    """A causal LM trained on pairs against its frozen starting point; validation and test: loss, implicit rewards."""

    name = "dpo"
    config = DPOConfig
    record_metrics = ("rewards_accuracy", "rewards_margin", "loss", "rewards_chosen", "rewards_rejected")

    def before_boosters(self, ctx: RunContext, loaded: Any) -> None:
        cfg = ctx.cfg
        if model_kind(loaded.model) != "decoder":
            raise HonelmError(f"dpo trains a causal LM; {cfg.model.init_from} is an encoder")
        self.dropout_off(ctx, loaded.model, "dpo")
        train, val = self.encode_training(ctx, loaded.model)
        ctx.extra.update(train=train, val=val)
        ctx.say(self.data_line(train, val))
        ctx.write_json(REFERENCE_FILE, reference_location(loaded, ctx.tokenizer, ctx.run_dir, cfg.lora.enabled,
                                                          ctx.runtime))
        ctx.extra["reference"], ctx.extra["callbacks"] = choose_reference(ctx, loaded, train, val,
                                                                          cfg.dpo.precompute_ref)

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
        return evaluate_pairs(model, data, ctx.extra["objective"], ctx.cfg.train.eval_batch_size, ctx.device, split,
                              ctx.records(split))

    def test_setup(self, ctx: RunContext) -> None:
        """Test pairs are scored against the run's reference (RUN/reference.json)."""
        self.objective(ctx, load_reference(ctx.run_dir).to(ctx.device).eval())
