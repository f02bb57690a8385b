"""GRPO's rollouts: G sampled responses per prompt, scored, with advantages relative to their group.

GRPO (Shao et al. 2024, DeepSeekMath) has no value function: the baseline of a response is the
mean reward of the G responses sampled for the same prompt,

    A_i = (r_i − mean(r_group)) / (std(r_group) + ε)      (advantage_std=true: GRPO)
    A_i =  r_i − mean(r_group)                            (advantage_std=false: Dr. GRPO, Liu et al. 2025)

and every token of response i gets A_i. A group whose rewards are all equal teaches nothing:
its advantages are exactly 0 (never NaN). std is Bessel-corrected; G >= 2.

A rollout (`GroupRollout`) is `prompts_per_rollout` prompts × G responses: sampled at temperature
T, scored by the reward (`honelm.rl.rewards`: checks and/or a reward model), with log π_old of
the sampled tokens when the policy will have moved before some of its minibatches are trained on
(several epochs or minibatches per rollout; with one optimizer step per rollout the loss uses the
current log-probabilities, detached: the ratio is exactly 1), and log π_ref when the KL term is
on. `GroupRolloutStream` is PPO's `RolloutStream` (`honelm.rl.rollout`) with these rollouts: the
same seeds, saved rollouts and exact resume. Each rollout logs a `rollout` event: the mean reward,
the accuracy against reference answers, response length, the fraction of groups whose rewards
were all equal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch
from torch import nn

from honelm.bounds import above, at_least
from honelm.errors import HonelmError
from honelm.objectives.ppo import response_logits, token_logprobs
from honelm.rl.advantages import response_mask
from honelm.rl.answers import generate_responses, to_samples
from honelm.rl.policy import Reference
from honelm.rl.prompts import EncodedPrompt
from honelm.rl.rewards import Scorer, score_and_correct, scorer_models
from honelm.rl.rollout import RolloutStream, left_pad

Batch = dict[str, Any]


@dataclass
class GRPOOptions:
    """GRPO: groups of sampled responses, group-relative advantages, the clipped ratio and the KL to the reference."""

    group_size: Annotated[int, at_least(2)] = 8
    """G: responses sampled per prompt (>= 2); their rewards are compared with each other."""
    prompts_per_rollout: Annotated[int, at_least(1)] = 4
    """Prompts per rollout (per process): a rollout holds prompts_per_rollout x group_size responses, a multiple of train.batch_size x train.grad_accum."""
    epochs: Annotated[int, at_least(1)] = 1
    """Passes over each rollout (GRPO's mu); with one optimizer step per rollout the ratio is exactly 1 and no old log-probabilities are computed."""
    response_length: Annotated[int, at_least(1)] = 32
    """Most tokens sampled per response; a response stops earlier at EOS."""
    temperature: Annotated[float, above(0)] = 1.0
    """Sampling temperature T (> 0); the loss recomputes log-probabilities of softmax(logits / T)."""
    clip: Annotated[float, above(0)] = 0.2
    """Policy ratio clip epsilon (PPO-clip on per-token ratios)."""
    kl_coef: Annotated[float, at_least(0)] = 0.0
    """beta of the k3 KL to the reference added to the loss per token (0 = off: no reference is kept)."""
    advantage_std: bool = True
    """Divide each group's mean-centred rewards by its std (GRPO); false = mean-centring only (Dr. GRPO's unbiased advantage)."""
    length_norm: Literal["sequence", "constant", "token"] = "sequence"
    """How token losses are averaged: sequence = over each response's own length, then over responses (GRPO); constant = summed and divided by response_length (Dr. GRPO: no length bias); token = over all tokens of the step (DAPO)."""


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool, eps: float = 1e-4) -> torch.Tensor:
    """(N,) advantages of (N,) rewards laid out as consecutive groups of `group_size` (see the module doc)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    groups = rewards.float().reshape(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale_std:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


@dataclass
class GroupRollout:
    """One GRPO rollout on CPU: [query | response] rows (N, Q+R), response mask (N, R), advantages (N,),
    and log π_old / log π_ref of the response tokens (N, R) when they were needed."""

    index: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    query_width: int
    response_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    _TENSORS = ("input_ids", "attention_mask", "position_ids", "response_mask", "advantages", "old_logprobs",
                "ref_logprobs")

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def collate(self, rows: list[int]) -> Batch:
        """A micro-batch of these rows cut to the columns any of them uses (as PPO's `Rollout.collate`)."""
        idx = torch.tensor(rows, dtype=torch.long)
        q = self.query_width
        lead = int((self.attention_mask[idx, :q].sum(0) == 0).sum())
        width = int(self.response_mask[idx].sum(1).max())
        batch: Batch = {k: getattr(self, k)[idx, lead:q + width] for k in ("input_ids", "attention_mask", "position_ids")}
        batch["response_mask"] = self.response_mask[idx, :width]
        batch["advantages"] = self.advantages[idx]
        for k in ("old_logprobs", "ref_logprobs"):
            if getattr(self, k) is not None:
                batch[k] = getattr(self, k)[idx, :width]
        batch["query_width"] = q - lead
        return batch

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        payload: dict[str, Any] = {k: getattr(self, k) for k in self._TENSORS}
        payload.update(index=self.index, query_width=self.query_width, stats=dict(self.stats))
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "GroupRollout":
        return cls(**torch.load(path, weights_only=True))


@dataclass
class GroupSampler:
    """What a GRPO rollout needs: the policy, its reference (None without a KL term), the scorer, settings."""

    model: nn.Module
    reference: Reference | None
    scorer: Scorer
    tokenizer: Any
    opts: GRPOOptions
    eos_id: int | None
    pad_id: int
    autocast: Callable[[], Any]
    chunk: int  # rows per forward pass
    old_logprobs: bool = True  # False: one optimizer step per rollout, the loss detaches its own

    def frozen_models(self) -> list[nn.Module]:
        return [*(self.reference.frozen_models() if self.reference is not None else []), *scorer_models(self.scorer)]

    @torch.no_grad()
    def logprobs(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, q: int
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """log π_old and log π_ref (tempered) of the response tokens, each (N, R) or None when not needed."""
        if not self.old_logprobs and self.reference is None:
            return None, None
        device = next(self.model.parameters()).device
        T = self.opts.temperature
        old, ref = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, ids.size(0), self.chunk):
                i, m, p = (t[start:start + self.chunk].to(device) for t in (ids, mask, pos))
                if self.old_logprobs:
                    with self.autocast():
                        logits = self.model(input_ids=i, attention_mask=m, position_ids=p, use_cache=False).logits
                    old.append(token_logprobs(response_logits(logits, q, T), i[:, q:]).cpu())
                if self.reference is not None:
                    logits = self.reference.logits(i, m, p, self.autocast)
                    ref.append(token_logprobs(response_logits(logits, q, T), i[:, q:]).cpu())
        finally:
            self.model.train(was_training)
        return (torch.cat(old) if old else None), (torch.cat(ref) if ref else None)

    def sample(self, index: int, prompts: list[EncodedPrompt], seed: int) -> GroupRollout:
        """G responses to each prompt (consecutive rows), scored, with group-relative advantages."""
        G = self.opts.group_size
        rows = [p for p in prompts for _ in range(G)]
        query, query_mask = left_pad([p.ids for p in rows], self.pad_id)
        response = generate_responses(self.model, query, query_mask, self.opts.response_length, self.eos_id,
                                      self.pad_id, self.autocast, self.opts.temperature, seed)
        mask = response_mask(response, self.eos_id)
        response = response.masked_fill(mask == 0, self.pad_id)
        ids = torch.cat([query, response], 1)
        attention = torch.cat([query_mask, mask.long()], 1)
        position = (attention.cumsum(1) - 1).clamp_min(0)
        q = query.size(1)
        old, ref = self.logprobs(ids, attention, position, q)
        samples = to_samples(rows, response, mask, self.tokenizer, self.eos_id)
        scores, correct = score_and_correct(self.scorer, samples)
        if scores.shape != (len(rows),):
            raise HonelmError(f"the reward returned shape {tuple(scores.shape)} for {len(rows)} responses")
        advantages = group_advantages(scores, G, self.opts.advantage_std)
        rollout = GroupRollout(index, ids, attention, position, q, mask, advantages,
                               None if old is None else old * mask, None if ref is None else ref * mask)
        rollout.stats = group_stats(scores, correct, mask, [s.ended for s in samples], G)
        return rollout


def group_stats(scores: torch.Tensor, correct: torch.Tensor | None, mask: torch.Tensor, ended: list[bool],
                group_size: int) -> dict[str, float]:
    """Per-response means of a rollout: reward, accuracy (with reference checks), length, ended; and the
    mean within-group reward std and the fraction of groups whose rewards were all equal (no signal)."""
    groups = scores.reshape(-1, group_size)
    stats = dict(reward=float(scores.mean()), reward_std=float(groups.std(1).mean()),
                 zero_std_groups=float((groups.max(1).values == groups.min(1).values).float().mean()),
                 response_length=float(mask.sum(1).mean()), ended=sum(ended) / len(ended))
    if correct is not None:
        stats["accuracy"] = float(correct.float().mean())
    return stats


class GroupRolloutStream(RolloutStream):
    """GRPO minibatches for `fit`: `RolloutStream` with group rollouts (same seeds, saving and resume)."""

    rollout_type = GroupRollout

    @staticmethod
    def shape(opts: Any) -> tuple[int, int, int, str]:
        rows = opts.prompts_per_rollout * opts.group_size
        return (opts.prompts_per_rollout, opts.epochs, rows,
                f"grpo.prompts_per_rollout x grpo.group_size = {rows}")

    def _build(self, index: int, chosen: list[EncodedPrompt], seed: int) -> GroupRollout:
        return self.sampler.sample(index, chosen, seed)

    def probe_batch(self) -> Batch:
        """A micro-batch of the largest shape training sees, made without sampling (the loop's precision probe)."""
        prompts = [self.prompts[i % len(self.prompts)] for i in range(self.bs)]
        query, qmask = left_pad([p.ids for p in prompts], self.sampler.pad_id)
        width = self.opts.response_length
        response = torch.full((len(prompts), width), prompts[0].ids[-1], dtype=torch.long)
        attention = torch.cat([qmask, torch.ones_like(response)], 1)
        fake = GroupRollout(-1, torch.cat([query, response], 1), attention, (attention.cumsum(1) - 1).clamp_min(0),
                            query.size(1), torch.ones(len(prompts), width), torch.zeros(len(prompts)))
        return fake.collate(list(range(len(prompts))))
