"""On-policy token-level distillation (GKD, Agarwal et al. 2024): some batches are the student's own answers.

With probability λ (`distill.on_policy`) a micro-batch's reference answers are replaced by answers
the student samples to the same prompts, and the teacher, held in memory, scores those very tokens
(`honelm.objectives.lm_teacher.on_policy_batch`); the token-level KD loss (`TokenKD`) is then
computed on them. GKD's point: the student learns from the teacher where the student's own
mistakes take it, not only on the references' prefixes.

Exactness: whether a micro-batch goes on-policy, and the sampling seed, are drawn from a hash of
the run seed and the batch's token ids, not from the global RNG, so a resumed run makes the same
choices and samples the same answers (sampling forks the RNG). The loop divides every step by the
target tokens it counted in the original batches (`units`), so an on-policy batch's loss is
rescaled to stand for that many tokens: value × units(original) / units(sampled). The logged
`on_policy` is the share of target tokens whose batch went on-policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from torch import nn

from honelm.generate import SamplingConfig
from honelm.objectives.base import Loss, Objective
from honelm.objectives.lm_teacher import on_policy_batch
from honelm.objectives.logprobs import IGNORE
from honelm.objectives.token_kd import TokenKD


def prompts_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's tokens before its first target (unpacked rows: one example each, its prompt)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        first = next((i for i, y in enumerate(labels) if y != IGNORE), len(labels))
        prompts.append(ids[:max(first, 1)])
    return prompts


class OnPolicyKD(Objective):
    """`inner` on the batch as drawn, or, with probability `fraction`, on the student's own answers to its prompts."""

    default_metric = "val_loss"

    def __init__(self, inner: TokenKD, teacher: nn.Module, tokenizer: Any, sampling: SamplingConfig, k: int,
                 vocab_size: int, fraction: float, seed: int, batch_size: int = 8):
        self.inner, self.teacher, self.tokenizer, self.sampling = inner, teacher, tokenizer, sampling
        self.k, self.vocab_size, self.fraction, self.seed, self.batch_size = k, vocab_size, fraction, seed, batch_size

    def draw(self, batch: dict[str, torch.Tensor]) -> int | None:
        """The sampling seed when this micro-batch goes on-policy, else None (a pure function of seed and tokens)."""
        digest = hashlib.sha256(str(self.seed).encode() + batch["input_ids"].cpu().numpy().tobytes()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        return int.from_bytes(digest[8:12], "big") if u < self.fraction else None

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Loss:
        return self.run(model, batch, lambda b: (self.inner(model, b), None))[0]

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        return self.run(model, batch, lambda b: self.inner.outputs(model, b))

    def run(self, model: nn.Module, batch: dict[str, Any], loss_of: Any) -> tuple[Loss, Any]:
        """`loss_of` (the inner loss, or loss and rows) on the batch, or on an on-policy batch rescaled to its units."""
        seed = self.draw(batch)
        units = self.inner.units(batch)
        if seed is None:
            loss, rows = loss_of(batch)
            loss.metrics["on_policy"] = torch.zeros((), device=loss.value.device)
            return loss, rows
        device = batch["input_ids"].device
        sampled = on_policy_batch(model, self.teacher, self.tokenizer, prompts_of(batch),
                                  dataclasses.replace(self.sampling, seed=seed), self.k, self.vocab_size, self.batch_size)
        loss, rows = loss_of({k: v.to(device) for k, v in sampled.items()})
        scale = units / max(int(loss.units), 1)
        metrics = {name: value * scale for name, value in loss.metrics.items()}
        metrics["on_policy"] = torch.tensor(float(units), device=loss.value.device)
        return Loss(value=loss.value * scale, units=units, metrics=metrics), rows

    def units(self, batch: dict[str, Any]) -> int:
        return self.inner.units(batch)

    def frozen_models(self) -> list[nn.Module]:
        return [self.teacher]
