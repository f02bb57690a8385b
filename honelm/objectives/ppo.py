"""PPO's losses: the clipped policy loss, the clipped value loss, and the objective that sums them.

Pure functions first (tested on hand-worked numbers), then `PPO`, the `Objective` the loop calls
on one micro-batch of a rollout (see `honelm.rl.rollout`). Everything is per response token and
masked: the loss is a SUM over the real response tokens (up to and including the first EOS), and
`units` counts them, so the loop's step mean is the masked mean over the whole minibatch, exactly,
however it is cut into micro-batches.

    ratio_t = exp(log π_θ(y_t) − log π_old(y_t))
    L_pg    = max(−A_t·ratio_t, −A_t·clip(ratio_t, 1−ε, 1+ε))
    L_vf    = ½·max((V_t − R_t)², (clip(V_t, V_old,t − ε_v, V_old,t + ε_v) − R_t)²)
    loss    = Σ_t m_t·(L_pg + vf_coef·L_vf)

Log-probabilities are those of the tempered distribution softmax(logits / T), T the sampling
temperature, in the rollout and here alike (`response_logprobs`): with another T the ratio is
not 1 before the first update and the update is biased.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from honelm.objectives.base import Loss, Objective


def response_logits(logits: torch.Tensor, query_width: int, temperature: float) -> torch.Tensor:
    """(B, R, V) fp32 tempered logits that predict the response tokens.

    logits (B, Q+R, V) come from a forward over [query | response]; position t predicts token
    t+1, so the response (positions Q..Q+R−1) is predicted by positions Q−1..Q+R−2.
    """
    return logits[:, query_width - 1:-1].float() / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: logits (B, R, V), tokens (B, R) → (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, R, V) → (B, R)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate (to minimise) and where the clipped branch was taken, both (B, R).

    L = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logp − old_logp). The max makes the objective a
    pessimistic bound: moving ρ beyond 1±ε in the direction the advantage favours earns nothing.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss ½·max((V−R)², (V_clip−R)²) and where the clipped term was larger, both (B, R).

    V_clip = V_old + clip(V − V_old, −ε_v, ε_v): the value may not move more than ε_v from its
    rollout value per update without the loss noticing.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    plain = (values - returns) ** 2
    limited = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, limited), (limited > plain).float()


class PPO(Objective):
    """The PPO loss on one micro-batch of rollouts, for a model returning (logits, values).

    The batch (built by `honelm.rl.rollout.Rollout.collate`) holds `input_ids`, `attention_mask`,
    `position_ids` (B, Q+R) of [left-padded query | response], `query_width` Q, and per response
    position (B, R): `response_mask`, `old_logprobs`, `old_values`, `advantages`, `returns`.
    """

    default_metric = "val_score"

    def __init__(self, temperature: float, clip: float = 0.2, clip_value: float = 0.2, vf_coef: float = 0.1):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.clip, self.clip_value, self.vf_coef = temperature, clip, clip_value, vf_coef

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Loss:
        q = int(batch["query_width"])
        logits, values = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"])  # (B, Q+R, V), (B, Q+R)
        response = batch["input_ids"][:, q:]  # (B, R)
        mask = batch["response_mask"]
        tempered = response_logits(logits, q, self.temperature)  # (B, R, V)
        logp = token_logprobs(tempered, response)  # (B, R)
        v = values[:, q - 1:-1].float()  # V(s_t): the state before response token t
        pg, pg_clipped = clipped_policy_loss(logp, batch["old_logprobs"], batch["advantages"], self.clip)
        vf, vf_clipped = clipped_value_loss(v, batch["old_values"], batch["returns"], self.clip_value)
        total = ((pg + self.vf_coef * vf) * mask).sum()
        with torch.no_grad():
            drift = logp - batch["old_logprobs"]
            metrics = {  # sums over the same units (response tokens) as the loss
                "pg_loss": (pg * mask).sum(), "vf_loss": (vf * mask).sum(),
                "clipfrac": (pg_clipped * mask).sum(), "vf_clipfrac": (vf_clipped * mask).sum(),
                "entropy": (entropy_of(tempered) * mask).sum(),
                "approx_kl": (0.5 * drift ** 2 * mask).sum(),  # drift from the rollout policy, not the reference
                "ratio": (drift.exp() * mask).sum(),
            }
        return Loss(value=total, units=mask.sum(), metrics=metrics)

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["response_mask"].sum())
