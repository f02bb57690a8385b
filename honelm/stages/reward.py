"""`honelm reward`: a Bradley-Terry reward model on preference pairs (InstructGPT's RM; TRL's RewardTrainer).

The model is a sequence classifier with one output (`AutoModelForSequenceClassification`,
num_labels=1) whose score is read at the last non-pad token: batches are right-padded with the
tokenizer's pad id, and the model's `pad_token_id` is set to it. Each batch is [chosen; rejected]
in one forward; the loss and metrics are `honelm.objectives.reward`. Validation reports loss,
accuracy (strict), margin and the reward distribution; the best validation checkpoint is kept,
with each validation pair's score record (best/val_predictions.jsonl; `honelm test`:
test_predictions.jsonl), whose accuracy, margin and loss `honelm ablate` compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.preferences import EncodedPairs
from honelm.data.sections import RewardDataConfig
from honelm.objectives.reward import RewardModel, RewardObjectiveConfig, evaluate_pairs
from honelm.stages import preference as P
from honelm.stages.contract import ModelSpec, Plan, RunContext


def _reward_train_defaults() -> TrainConfig:
    # TRL RewardConfig: lr 1e-4, no weight decay; InstructGPT: one epoch, cosine decay to 10%
    return TrainConfig(lr=1e-4, weight_decay=0.0, adam_beta2=0.999, warmup_ratio=0.03, epochs=1.0, batch_size=8,
                       eval_every=50, eval_batch_size=16)


@dataclass
class RewardConfig(P.PairsConfig):
    """Train a reward model on preference pairs."""

    verb = "reward"

    run: RunConfig = section(RunConfig)
    data: RewardDataConfig = section(RewardDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_reward_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)
    reward: RewardObjectiveConfig = section(RewardObjectiveConfig)


class Reward(P.PreferenceStage):
    """A one-output classifier trained so chosen outscores rejected; validation and test: loss, accuracy, rewards."""

    name = "reward"
    config = RewardConfig
    record_metrics = ("accuracy", "margin", "loss", "reward_mean")

    def model_spec(self, ctx: RunContext) -> ModelSpec:
        return ModelSpec("classify", num_labels=1, id2label={0: "reward"})

    def before_boosters(self, ctx: RunContext, loaded: Any) -> None:
        tokenizer = ctx.tokenizer
        # the head reads the last token that is not the pad id: batches are padded with the tokenizer's
        loaded.model.config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            ctx.say("note: the tokenizer pads with its EOS token, which also ends every turn: the reward is read at "
                    "the last token before the final EOS")
        self.dropout_off(ctx, loaded.model, "reward")

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg = ctx.cfg
        train, val = self.encode_training(ctx, loaded.model)
        if train.margins is not None:
            ctx.say(f"margin: from field '{cfg.data.margin_field}' (loss -log σ(r_c - r_r - margin))")
        ctx.say(self.data_line(train, val))
        evaluate = (lambda m: self.score(ctx, m, val, "val")) if val is not None and len(val) else None
        objective = RewardModel(center_coef=cfg.reward.center_coef)
        return Plan(objective, self.stream(ctx, train), evaluate, metric=cfg.train.metric or objective.default_metric)

    def score(self, ctx: RunContext, model: torch.nn.Module, data: EncodedPairs, split: str) -> dict[str, float]:
        cfg = ctx.cfg
        return evaluate_pairs(model, data, cfg.train.eval_batch_size, ctx.device, split, cfg.reward.center_coef,
                              ctx.records(split))

    def load_best(self, ctx: RunContext) -> torch.nn.Module:
        model = super().load_best(ctx)  # the one-output classifier of `model_spec`, LoRA adapters merged
        model.config.pad_token_id = ctx.tokenizer.pad_token_id
        return model
