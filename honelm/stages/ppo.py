"""`honelm ppo`: PPO with a per-token KL penalty to the starting policy (InstructGPT; TRL's PPOTrainer).

The policy starts from `model.init_from` (an `sft` run, usually) and gets a value function (a
head on its hidden states, or a separate model); a frozen reference (a copy of the start, or
under LoRA the same model with its adapters disabled) anchors the KL penalty; responses are
scored by a reward model or a programmatic reward (`honelm.rl.rewards`). The rollout stream
(`honelm.rl.rollout`) feeds PPO minibatches to the one training loop, whose steps are PPO
minibatches; the loss is `honelm.objectives.ppo`. Each rollout is logged as a `rollout` event
(mean score, KL to the reference, response length, ...); validation samples held-out prompts
with a fixed seed and reports `val_score` (the default selection metric) and `val_kl`. `best/`
holds the policy only: a plain causal LM (or LoRA adapter) directory with its tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from honelm.boosters import StageConfig
from honelm.boosters.base import ADAPTER_REFERENCE
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.chat import ensure_template
from honelm.errors import HonelmError
from honelm.models import check_block_fits
from honelm.objectives.ppo import PPO
from honelm.rl.policy import Reference, disable_dropout, with_value
from honelm.rl.answers import answer_metrics
from honelm.rl.prompts import EncodedPrompt, PromptDataConfig, encode_prompts, prompt_splits, use_chat
from honelm.rl.rewards import RewardConfig, check_rows, make_scorer
from honelm.rl.rollout import PPOOptions, RolloutStream, Sampler, validate_policy, write_samples
from honelm.stages.contract import Plan, ReportSection, RunContext, Stage


def _ppo_train_defaults() -> TrainConfig:
    # InstructGPT: Adam betas (0.9, 0.95), constant lr; TRL: lr 3e-6 for billion-parameter models
    # (small models move with more). One optimizer step is one PPO minibatch.
    return TrainConfig(lr=1e-5, weight_decay=0.0, adam_beta2=0.95, warmup_steps=0, schedule="constant", batch_size=8,
                       epochs=1.0, eval_every=64, eval_batch_size=16, save_every=128, log_every=8)


@dataclass
class PPOConfig(StageConfig):
    """Optimise a policy against a reward with PPO and a per-token KL penalty to its starting point."""

    verb = "ppo"
    capabilities = frozenset({ADAPTER_REFERENCE})

    run: RunConfig = section(RunConfig)
    data: PromptDataConfig = section(PromptDataConfig)
    model: ModelConfig = section(ModelConfig)
    reward: RewardConfig = section(RewardConfig)
    ppo: PPOOptions = section(PPOOptions)
    train: TrainConfig = section(_ppo_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)


class PPOStage(Stage):
    """PPO on rollouts of the policy; validation samples held-out prompts (val_score, val_kl); `honelm test`
    scores greedy answers to the test prompts with the reward (`honelm.rl.answers`)."""

    name = "ppo"
    config = PPOConfig
    report_sections = (ReportSection("curves", ("rollouts.png", "ppo.png"), "honelm.rl.report:rollouts_section"),)

    def splits(self, cfg: PPOConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return prompt_splits(cfg.data, say)

    def prepare(self, ctx: RunContext) -> None:
        tokenizer = ctx.tokenizer
        ctx.extra["chat"] = chat = use_chat(ctx.cfg.data, tokenizer)
        if chat:
            ensure_template(tokenizer, ctx.say)
        ctx.say("prompts: " + ("rendered with the chat template" if chat
                               else "plain text (no chat template; data.chat=on adds one)"))
        if tokenizer.eos_token_id is None:
            raise HonelmError("the tokenizer has no EOS token: responses could never end (and nothing would be masked)")

    def before_boosters(self, ctx: RunContext, loaded: Any) -> None:
        """Dropout off in the policy; the prompts encoded; the longest prompt + response checked to fit."""
        cfg, chat = ctx.cfg, ctx.extra["chat"]
        if disable_dropout(loaded.model):
            ctx.say("dropout: turned off in the policy (PPO's ratio must be exactly 1 before an update)")
        train, cut = encode_prompts(ctx.tokenizer, ctx.splits.train, chat, cfg.data.max_prompt_length)
        val, cut_val = (encode_prompts(ctx.tokenizer, ctx.splits.val, chat, cfg.data.max_prompt_length)
                        if ctx.splits.val else ([], 0))
        if cut or cut_val:
            ctx.say(f"note: {cut} train and {cut_val} validation prompts are longer than data.max_prompt_length="
                    f"{cfg.data.max_prompt_length} and keep only their last tokens")
        longest = max(len(p.ids) for p in train + val)
        check_block_fits(loaded.model, longest + self.response_length(cfg),
                         f"the longest prompt + {self.name}.response_length")
        ctx.extra.update(train=train, val=val)

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg, say, runtime, tokenizer = ctx.cfg, ctx.say, ctx.runtime, ctx.tokenizer
        train, val = ctx.extra["train"], ctx.extra["val"]
        reference = Reference(loaded.model, lora=cfg.lora.enabled).to(runtime.device)
        say("reference: " + ("the policy with its LoRA adapters disabled" if cfg.lora.enabled
                             else "a frozen copy of the starting policy"))
        value_init = cfg.ppo.value_init or cfg.reward.model or cfg.model.init_from
        model = with_value(loaded.model, cfg.ppo.value_model, value_init, cfg.model.trust_remote_code, say)
        model.to(runtime.device)
        scorer = make_scorer(cfg.reward, tokenizer, runtime.device, runtime.autocast, cfg.train.eval_batch_size,
                             cfg.model.trust_remote_code)
        check_rows(scorer, train + val)
        say(f"reward: {cfg.reward.describe()}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampler = Sampler(model, reference, scorer, tokenizer, cfg.ppo, tokenizer.eos_token_id, pad_id,
                          runtime.autocast, chunk=max(cfg.train.batch_size, 1))
        stream = RolloutStream(sampler, train, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                               runtime.world_size, runtime.rank, ctx.run_dir, ctx.tracker)
        say(f"ppo: {len(train)} train prompts, {len(val)} validation; rollouts of {cfg.ppo.rollout_batch} responses "
            f"(up to {cfg.ppo.response_length} tokens, T={cfg.ppo.temperature}) → {cfg.ppo.ppo_epochs} epochs x "
            f"{stream.minibatches} minibatches = {stream.steps_per_rollout} optimizer steps per rollout; "
            f"KL {cfg.ppo.kl_estimator} x {cfg.ppo.kl_coef}")
        ctx.extra["sampler"] = sampler
        evaluate = (lambda m: validate_policy(sampler, val, cfg.run.seed)) if val else None
        objective = PPO(cfg.ppo.temperature, cfg.ppo.clip, cfg.ppo.clip_value, cfg.ppo.vf_coef)
        return Plan(objective, stream, evaluate, metric=cfg.train.metric or objective.default_metric,
                    save_best=lambda m, info: ctx.save_best(m.policy, info), model=model,
                    frozen_models=sampler.frozen_models())

    def response_length(self, cfg: Any) -> int:
        """The most tokens an answer may have (sampled, greedy, tested)."""
        return int(cfg.ppo.response_length)

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> list[EncodedPrompt]:
        """Prompt rows tokenised as in training (chat template when the run used one), cut to their last tokens."""
        return encode_prompts(ctx.tokenizer, rows, use_chat(ctx.cfg.data, ctx.tokenizer), ctx.cfg.data.max_prompt_length)[0]

    def score(self, ctx: RunContext, model: Any, data: list[EncodedPrompt], split: str) -> dict[str, float]:
        """Greedy answers scored by the run's reward (`honelm.rl.answers.answer_metrics`), records kept."""
        cfg = ctx.cfg
        scorer = ctx.extra.get("scorer") or make_scorer(  # `honelm test`: the reward the run trained with
            cfg.reward, ctx.tokenizer, ctx.device, ctx.runtime.autocast, cfg.train.eval_batch_size, cfg.model.trust_remote_code)
        metrics, records = answer_metrics(model, ctx.tokenizer, data, scorer, self.response_length(cfg),
                                          ctx.runtime.autocast, cfg.train.eval_batch_size, split)
        ctx.records(split).extend(records)
        return metrics

    def finish(self, ctx: RunContext, plan: Plan, result: Any) -> dict[str, Any]:
        """samples.jsonl: the final policy's responses to a few validation prompts (not after an interrupt)."""
        if result.reason != "interrupted" and ctx.extra["val"] and ctx.runtime.is_main:
            write_samples(ctx.run_dir / "samples.jsonl", ctx.extra["sampler"], ctx.extra["val"], ctx.cfg.run.seed)
        return {}
