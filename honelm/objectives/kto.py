"""KTO (Ethayarajh et al. 2024): unpaired completions, each desirable or undesirable, against a frozen reference.

A batch is B examples and their B KL rows (`honelm.data.unpaired.EncodedExamples.collate`): example
i is (x_i, y_i); its KL row (x_i, y'_i) pairs the same prompt with another example's completion.
With summed completion log-probs (`honelm.objectives.logprobs`) of the policy π and the reference
π_ref:

    r_i  = log π(y_i|x_i) - log π_ref(y_i|x_i)                                   (B,)
    z0   = max(0, mean_i [log π(y'_i|x_i) - log π_ref(y'_i|x_i)])   detached       the reference point
    L_i  = λ_D·(1 - σ(β·(r_i - z0)))    when y_i is desirable
           λ_U·(1 - σ(β·(z0 - r_i)))    when it is undesirable

z0 estimates KL(π ‖ π_ref) from the mismatched pairs of the micro-batch (the paper's estimate; no
gradient flows through it, so the policy's KL rows run under no_grad). Because z0 belongs to the
micro-batch, KTO's loss depends on how examples are batched: `batch_size=2, grad_accum=2` is not
`batch_size=4` exactly (TRL's KTOTrainer likewise; it also averages z0 over processes, honelm keeps
each process's). λ_D = `dpo.kto_desirable_weight`, λ_U = `dpo.kto_undesirable_weight`, β = `dpo.beta`.

Metrics (sums over examples; the loop logs sum / examples), per example, so `honelm ablate` can
compare them: the implicit reward r̂ = β·r as `rewards`; `rewards_margin`, β·(r - z0) signed by
the label (+ desirable, - undesirable), the quantity whose sigmoid the loss raises, so
L = λ·(1 - σ(margin)); `rewards_accuracy`, whether that margin is > 0 (the example lies on its
side of the reference point; strict: 0 at step 0); `kl`, the KL row's log-ratio, whose mean is z0
before its clamp; `logps` (policy log-probs). Like the validation loss, margin and accuracy use
each evaluation batch's z0. The reference comes from `Anchored` (stored, a frozen copy, or LoRA off).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from honelm.objectives.base import Loss
from honelm.objectives.dpo import Anchored
from honelm.objectives.logprobs import sequence_logps

ROW_KEYS = ("input_ids", "attention_mask", "labels")


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, kl_policy: torch.Tensor, kl_reference: torch.Tensor,
             desirable: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (B,) KTO losses and the reference point z0 (a detached scalar), from summed log-probs (B,) each:
    the examples' under policy and reference, their KL rows' likewise; `desirable` (B,) bool."""
    z0 = (kl_policy - kl_reference).detach().mean().clamp(min=0)
    r = policy - reference
    up = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    down = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, up, down), z0


def kto_values(policy: torch.Tensor, reference: torch.Tensor, z0: torch.Tensor, kl_policy: torch.Tensor,
               kl_reference: torch.Tensor, desirable: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Detached per-example values (B,): implicit reward β·r, the margin β·(r - z0) signed by the label and whether it
    is > 0, the KL row's log-ratio, the policy log-prob."""
    r = policy.detach().float() - reference.detach().float()
    margin = beta * (r - z0.float()) * (desirable.float() * 2 - 1)
    return {"rewards": beta * r, "rewards_accuracy": (margin > 0).float(), "rewards_margin": margin,
            "kl": (kl_policy - kl_reference).detach().float(), "logps": policy.detach().float()}


class KTO(Anchored):
    """KTO on [examples; KL rows] batches with completion-only labels and a `desirable` (B,) mask."""

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference: nn.Module | None = None):
        super().__init__(reference)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def terms(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """(B,) each: policy and reference log-probs of the examples, then of their KL rows."""
        ref = self.reference_logps(model, batch)  # (2B,), first: no graph held while it runs
        b = self.units(batch)
        with torch.no_grad():  # z0 is detached: the policy's KL rows need no graph
            kl = sequence_logps(model, {k: batch[k][b:] for k in ROW_KEYS}, right_padded=True)[0]
        logps = sequence_logps(model, {k: batch[k][:b] for k in ROW_KEYS}, right_padded=True)[0]
        return logps, ref[:b], kl, ref[b:]

    def scores(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per example (B,): the loss and the detached `kto_values`."""
        losses, values, _ = self.compute(model, batch)
        return losses, values

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Per example (B,): losses, detached values, and the implicit rewards β·r through the policy."""
        p, r, kp, kr = self.terms(model, batch)
        desirable = batch["desirable"].bool()
        losses, z0 = kto_loss(p, r, kp, kr, desirable, self.beta, self.desirable_weight, self.undesirable_weight)
        return losses, kto_values(p, r, z0, kp, kr, desirable, self.beta), self.beta * (p - r)

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        """The summed loss with its metrics (sums over examples) and the implicit rewards β·r (B, 1) through the policy."""
        losses, values, rewards = self.compute(model, batch)
        metrics = {k: v.sum() for k, v in values.items()}
        return Loss(value=losses.sum(), units=losses.numel(), metrics=metrics), rewards[:, None]
