"""Preference losses without a reference model: ORPO and SimPO, on [chosen; rejected] batches.

Both compare LENGTH-NORMALISED log-probs: with summed completion log-probs log π(y|x) and token
counts |y| (`honelm.objectives.logprobs`), ℓ(y) = log π(y|x) / |y|, the mean token log-prob. For P
pairs, each (P,):

    ORPO (Hong et al. 2024)    odds(y) = p/(1-p) with p = exp ℓ(y), so log odds(y) = ℓ - log(1 - e^ℓ)
                               L = -ℓ(y_c) + λ·(-log σ(log odds(y_c) - log odds(y_r)))
                               the chosen reply's NLL (per pair, the mean over its tokens) plus the
                               odds-ratio term weighted by λ (`dpo.orpo_lambda`)
    SimPO (Meng et al. 2024)   L = -log σ(β·ℓ(y_c) - β·ℓ(y_r) - γ)
                               β (`dpo.beta`, default 2) and the target margin γ (`dpo.simpo_gamma`)

No reference model is loaded, copied or scored (memory is the point), so `frozen_models` is empty
and nothing is precomputed. ORPO's NLL here is each pair's mean over its chosen tokens, summed over
pairs like every preference loss (TRL's ORPOTrainer averages over all chosen tokens of a batch,
which weights long replies more). log(1 - e^ℓ) is computed as log(-expm1(ℓ)), exact near ℓ = 0,
with ℓ capped at -1e-6 so a reply of probability 1 keeps a finite odds.

Metrics (sums over pairs, like DPO's, under the same names so `honelm ablate` compares any loss):
the rewards are SimPO's own, r = β·ℓ(y), and for ORPO the log odds, r = log odds(y), whose
difference is the log odds ratio the loss sees (TRL logs β·ℓ for both); `rewards_chosen`,
`rewards_rejected`, `rewards_margin` (r_c - r_r), `rewards_accuracy` (r_c > r_r, strict),
`logps_chosen`, `logps_rejected` (summed policy log-probs); ORPO adds `nll` (its SFT term).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from honelm.objectives.base import Loss, Objective
from honelm.objectives.logprobs import sequence_logps

MAX_MEAN_LOGP = -1e-6
"""ℓ is capped here for ORPO's odds: at ℓ = 0 (probability 1) log(1 - e^ℓ) is -inf."""


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(ℓ), elementwise, from mean token log-probs ℓ."""
    ell = mean_logps.clamp(max=MAX_MEAN_LOGP)
    return ell - torch.log(-torch.expm1(ell))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair (P,): ORPO's loss, the chosen NLL and the log odds ratio, from mean token log-probs (P,) each."""
    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    nll = -chosen_mean
    return nll - lam * F.logsigmoid(ratio), nll, ratio


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Per pair (P,): SimPO's loss -log σ(β·(ℓ_c - ℓ_r) - γ) from mean token log-probs (P,) each."""
    return -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)


class ReferenceFree(Objective):
    """ORPO or SimPO on [chosen; rejected] batches with completion-only labels; no reference model."""

    default_metric = "val_loss"

    def __init__(self, loss_type: str, beta: float = 2.0, orpo_lambda: float = 0.1, simpo_gamma: float = 1.0):
        if loss_type not in ("orpo", "simpo"):
            raise ValueError(f"unknown reference-free loss {loss_type!r}; choose orpo or simpo")
        self.loss_type, self.beta, self.orpo_lambda, self.simpo_gamma = loss_type, beta, orpo_lambda, simpo_gamma

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Per pair: losses (P,) and rewards (P, 2) [r_c, r_r], both through the policy, and detached extras (P,)."""
        logps, tokens = sequence_logps(model, batch, right_padded=True)  # (2P,) each: pairs are right-padded
        mean = logps / tokens.clamp(min=1)
        lc, lr = mean.chunk(2)
        pc, pr = logps.detach().chunk(2)
        extra = {"logps_chosen": pc, "logps_rejected": pr}
        if self.loss_type == "orpo":
            losses, nll, _ = orpo_loss(lc, lr, self.orpo_lambda)
            rewards = torch.stack([log_odds(lc), log_odds(lr)], dim=1)
            extra["nll"] = nll.detach()
        else:
            losses = simpo_loss(lc, lr, self.beta, self.simpo_gamma)
            rewards = self.beta * torch.stack([lc, lr], dim=1)
        return losses, rewards, extra

    @staticmethod
    def values(rewards: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detached per-pair values (P,): both rewards, their margin and accuracy, and `extra`."""
        rc, rr = rewards.detach().float().unbind(1)
        return {"rewards_chosen": rc, "rewards_rejected": rr, "rewards_margin": rc - rr,
                "rewards_accuracy": (rc > rr).float(), **extra}

    def scores(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per pair (P,): the loss and its detached values (rewards, margin, accuracy, log-probs)."""
        losses, rewards, extra = self.compute(model, batch)
        return losses, self.values(rewards, extra)

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        """The summed loss with its metrics (sums over pairs) and the rewards [r_c, r_r] (P, 2) through the policy."""
        losses, rewards, extra = self.compute(model, batch)
        metrics = {k: v.sum() for k, v in self.values(rewards, extra).items()}
        return Loss(value=losses.sum(), units=losses.numel(), metrics=metrics), rewards

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0)) // 2
