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

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from honelm import boosters
from honelm import runtime as rt
from honelm.boosters.lora import LoraConfig
from honelm.checkpoint import best_writes_base, resolve_model_dir, save_pretrained_atomic
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.chat import ensure_template
from honelm.errors import ConfigError, HonelmError
from honelm.loop import Callback, TrainPlan, fit
from honelm.objectives.ppo import PPO
from honelm.rl.policy import PolicyWithValue, Reference, disable_dropout
from honelm.rl.prompts import PromptDataConfig, encode_prompts, prompt_splits, use_chat
from honelm.rl.rewards import RewardConfig, make_scorer
from honelm.rl.rollout import PPOOptions, RolloutStream, Sampler, derived_seed, validate_policy
from honelm.stages import setup as S


def _ppo_train_defaults() -> TrainConfig:
    # InstructGPT: Adam betas (0.9, 0.95), constant lr; TRL: lr 3e-6 for billion-parameter models
    # (small models move with more). One optimizer step is one PPO minibatch.
    return TrainConfig(lr=1e-5, weight_decay=0.0, adam_beta2=0.95, warmup_steps=0, schedule="constant", batch_size=8,
                       epochs=1.0, eval_every=64, eval_batch_size=16, save_every=128, log_every=8)


@dataclass
class PPOConfig:
    """Optimise a policy against a reward with PPO and a per-token KL penalty to its starting point."""

    run: RunConfig = section(RunConfig)
    data: PromptDataConfig = section(PromptDataConfig)
    model: ModelConfig = section(ModelConfig)
    reward: RewardConfig = section(RewardConfig)
    ppo: PPOOptions = section(PPOOptions)
    train: TrainConfig = section(_ppo_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)


def value_scorer(cfg: PPOConfig) -> torch.nn.Module:
    """The sequence-classification model a separate value function starts from (trunk + one-output head)."""
    from honelm.models import load_model

    source = cfg.ppo.value_init or cfg.reward.model or cfg.model.init_from
    if not source:
        raise ConfigError("ppo.value_model=separate needs a checkpoint to start from: set ppo.value_init "
                          "(or reward.model, or model.init_from)")
    return load_model(resolve_model_dir(source), "classify", num_labels=1, trust_remote_code=cfg.model.trust_remote_code)


def write_samples(path: Path, sampler: Sampler, prompts: list[Any], seed: int, limit: int = 16) -> None:
    """A few validation prompts with the final policy's responses and their scores (samples.jsonl)."""
    chosen = prompts[:limit]
    s = sampler.sample(chosen, derived_seed(seed, 4))
    with open(path, "w", encoding="utf-8") as handle:
        for b, p in enumerate(chosen):
            n = int(s.mask[b].sum())
            text = sampler.tokenizer.decode(s.response[b, :n].tolist(), skip_special_tokens=True)
            handle.write(json.dumps({"prompt": p.prompt, "response": text, "score": float(s.scores[b]),
                                     "ended": bool(s.ended[b]), "source": p.source, "line": p.line},
                                    ensure_ascii=False) + "\n")


def run(cfg: PPOConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    runtime = rt.setup(cfg.train.threads)
    rt.seed_everything(cfg.run.seed)
    run_dir = S.run_directory("ppo", cfg, runtime, resume)
    tracker = S.tracker_for(run_dir, runtime, cfg)
    say = tracker.say
    splits = prompt_splits(cfg.data, say)
    S.write_json(run_dir / "split_manifest.json", splits.manifest, runtime)
    tokenizer = S.resolve_tokenizer(cfg.model, run_dir, lambda: [d.text for d in splits.train], "bpe", say, runtime,
                                    resume is not None)
    chat = use_chat(cfg.data, tokenizer)
    if chat:
        ensure_template(tokenizer, say)
    say(f"prompts: {'rendered with the chat template' if chat else 'plain text (no chat template; data.chat=on adds one)'}")
    if tokenizer.eos_token_id is None:
        raise HonelmError("the tokenizer has no EOS token: responses could never end (and nothing would be masked)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = S.resolve_model(cfg.model, "lm", tokenizer, cfg.run.seed, say,
                             carry=boosters.carries_adapter(cfg, "ppo"))
    if disable_dropout(policy):
        say("dropout: turned off in the policy (PPO's ratio must be exactly 1 before an update)")
    train, cut = encode_prompts(tokenizer, splits.train, chat, cfg.data.max_prompt_length)
    val, cut_val = encode_prompts(tokenizer, splits.val, chat, cfg.data.max_prompt_length) if splits.val else ([], 0)
    if cut or cut_val:
        say(f"note: {cut} train and {cut_val} validation prompts are longer than data.max_prompt_length="
            f"{cfg.data.max_prompt_length} and keep only their last tokens")
    longest = max(len(p.ids) for p in train + val)
    S.check_block_fits(policy, longest + cfg.ppo.response_length, "the longest prompt + ppo.response_length")

    policy = boosters.apply(policy, cfg, "lm", say)
    reference = Reference(policy, lora=cfg.lora.enabled).to(runtime.device)
    say("reference: " + ("the policy with its LoRA adapters disabled" if cfg.lora.enabled else "a frozen copy of the starting policy"))
    if cfg.ppo.value_model == "shared":
        model = PolicyWithValue.shared(policy)
        say("value: a scalar head on the policy's last hidden states (zero-initialised)")
    else:
        scorer_model = value_scorer(cfg)
        disable_dropout(scorer_model)
        model = PolicyWithValue.separate(policy, scorer_model)
        say(f"value: a separate {type(scorer_model).__name__} (trunk + score head at every position)")
    model.to(runtime.device)
    scorer = make_scorer(cfg.reward, tokenizer, runtime.device, runtime.autocast, cfg.train.eval_batch_size,
                         cfg.model.trust_remote_code)
    say(f"reward: {'function ' + cfg.reward.function if cfg.reward.function else 'model ' + cfg.reward.model}"
        + (f", minus {cfg.reward.missing_eos_penalty} without EOS" if cfg.reward.missing_eos_penalty else ""))
    sampler = Sampler(model, reference, scorer, tokenizer, cfg.ppo, tokenizer.eos_token_id, pad_id, runtime.autocast,
                      chunk=max(cfg.train.batch_size, 1))
    stream = RolloutStream(sampler, train, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                           runtime.world_size, runtime.rank, run_dir, tracker)
    say(f"ppo: {len(train)} train prompts, {len(val)} validation; rollouts of {cfg.ppo.rollout_batch} responses "
        f"(up to {cfg.ppo.response_length} tokens, T={cfg.ppo.temperature}) → {cfg.ppo.ppo_epochs} epochs x "
        f"{stream.minibatches} minibatches = {stream.steps_per_rollout} optimizer steps per rollout; "
        f"KL {cfg.ppo.kl_estimator} x {cfg.ppo.kl_coef}")
    evaluate = (lambda m: validate_policy(sampler, val, cfg.run.seed)) if val else None
    objective = PPO(cfg.ppo.temperature, cfg.ppo.clip, cfg.ppo.clip_value, cfg.ppo.vf_coef)
    plan = TrainPlan(objective, stream, evaluate,
                     lambda m, info: save_pretrained_atomic(m.policy, tokenizer, run_dir / "best", info),
                     cfg.train.metric or objective.default_metric, frozen_models=sampler.frozen_models(),
                     best_writes_base=functools.partial(best_writes_base, model, run_dir))
    result = fit(model, plan, cfg.train, runtime, run_dir, tracker=tracker, resume=resume is not None,
                 callbacks=callbacks)
    if result.reason != "interrupted" and val and runtime.is_main:
        write_samples(run_dir / "samples.jsonl", sampler, val, cfg.run.seed)
    tracker.close()
    return {"run_dir": str(run_dir), "steps": result.steps, "reason": result.reason, "best_step": result.best_step,
            "stop_requested": result.stop_requested, **result.last_eval}
