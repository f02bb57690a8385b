"""`honelm grpo`: group-relative policy optimisation with rewards that check answers (Shao et al. 2024).

The policy starts from `model.init_from` (an `sft` run, usually). For each prompt it samples
`grpo.group_size` responses; the reward (`honelm.rl.rewards`: checks against each prompt row's
reference answer, penalties, a Python function, a reward model, or a weighted mix) scores them;
each response's advantage is its reward relative to its group (`honelm.rl.group`); the loss is
the clipped policy ratio with an optional k3 KL to the reference (`honelm.objectives.grpo`). No
value model. Rollouts feed the one training loop through PPO's rollout stream (saved rollouts,
exact resume). Validation answers held-out prompts greedily and scores them with the same reward:
`val_accuracy` (when a check compares with references; the default selection metric) or
`val_reward`. `honelm test` does the same on the test prompts. `best/` is the policy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from honelm.boosters import StageConfig
from honelm.boosters.base import ADAPTER_REFERENCE
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.objectives.grpo import GRPO
from honelm.rl.group import GroupRolloutStream, GroupSampler, GRPOOptions
from honelm.rl.policy import Reference
from honelm.rl.prompts import PromptDataConfig
from honelm.rl.rewards import RewardConfig, check_rows, make_scorer
from honelm.stages.contract import Plan, ReportSection, RunContext
from honelm.stages.ppo import PPOStage


def _grpo_train_defaults() -> TrainConfig:
    # One optimizer step per rollout by default (4 prompts x 8 responses = 8 x 4 accumulated): on-policy,
    # as DeepSeekMath's GRPO with one inner iteration; constant lr, no weight decay (TRL's defaults).
    return TrainConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant", batch_size=8, grad_accum=4,
                       epochs=1.0, eval_every=20, eval_batch_size=32, save_every=50, log_every=5)


@dataclass
class GRPOConfig(StageConfig):
    """Optimise a policy with group-relative advantages on rewards that check its answers."""

    verb = "grpo"
    capabilities = frozenset({ADAPTER_REFERENCE})

    run: RunConfig = section(RunConfig)
    data: PromptDataConfig = section(lambda: PromptDataConfig(split="8:1:1"))  # type: ignore[arg-type]
    model: ModelConfig = section(ModelConfig)
    reward: RewardConfig = section(RewardConfig)
    grpo: GRPOOptions = section(GRPOOptions)
    train: TrainConfig = section(_grpo_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)


class GRPOStage(PPOStage):
    """GRPO on groups of sampled responses; validation and test score greedy answers (val_accuracy, val_reward)."""

    name = "grpo"
    config = GRPOConfig
    report_sections = (ReportSection("curves", ("rollouts.png", "grpo.png"), "honelm.rl.report:groups_section"),)

    def record_metrics_of(self, cfg: GRPOConfig) -> tuple[str, ...]:
        return ("reward", "accuracy") if cfg.reward.checks_answers() else ("reward",)

    def response_length(self, cfg: Any) -> int:
        return int(cfg.grpo.response_length)

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg, say, runtime, tokenizer, opts = ctx.cfg, ctx.say, ctx.runtime, ctx.tokenizer, ctx.cfg.grpo
        train, val = ctx.extra["train"], ctx.extra["val"]
        reference = None
        if opts.kl_coef > 0:
            reference = Reference(loaded.model, lora=cfg.lora.enabled).to(runtime.device)
            say("reference: " + ("the policy with its LoRA adapters disabled" if cfg.lora.enabled
                                 else "a frozen copy of the starting policy"))
        model = loaded.model.to(runtime.device)
        scorer = make_scorer(cfg.reward, tokenizer, runtime.device, runtime.autocast, cfg.train.eval_batch_size,
                             cfg.model.trust_remote_code)
        check_rows(scorer, train + val)
        ctx.extra["scorer"] = scorer
        say(f"reward: {cfg.reward.describe()}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampler = GroupSampler(model, reference, scorer, tokenizer, opts, tokenizer.eos_token_id, pad_id,
                               runtime.autocast, chunk=max(cfg.train.batch_size, 1))
        stream = GroupRolloutStream(sampler, train, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                                    runtime.world_size, runtime.rank, ctx.run_dir, ctx.tracker)
        sampler.old_logprobs = stream.steps_per_rollout > 1  # one step per rollout: the ratio is exactly 1
        say(f"grpo: {len(train)} train / {len(val)} validation prompts; rollouts of {opts.prompts_per_rollout} prompts x "
            f"{opts.group_size} responses → {stream.steps_per_rollout} optimizer steps each")
        evaluate = (lambda m: self.score(ctx, m, val, "val")) if val else None
        objective = GRPO(opts.temperature, opts.clip, opts.kl_coef, opts.length_norm, opts.response_length)
        metric = cfg.train.metric or ("val_accuracy" if cfg.reward.checks_answers() else objective.default_metric)
        return Plan(objective, stream, evaluate, metric=metric, frozen_models=sampler.frozen_models())

    def finish(self, ctx: RunContext, plan: Plan, result: Any) -> dict[str, Any]:
        return {}  # best/val_predictions.jsonl holds the best policy's greedy validation answers
