"""GRPO's loss: the clipped policy ratio on group-relative advantages, an optional k3 KL, no value model.

Per response token t of response i (Shao et al. 2024, DeepSeekMath, eq. 3):

    ρ_t  = exp(log π_θ(y_t) − log π_old(y_t))
    L_t  = max(−A_i·ρ_t, −A_i·clip(ρ_t, 1−ε, 1+ε)) + β·k3_t
    k3_t = (r_t − 1) − log r_t,   r_t = π_ref(y_t) / π_θ(y_t)        (Schulman 2020; ≥ 0, unbiased)

and the loss of a step averages them one of three ways (`length_norm`), as a SUM over units so
that the loop's mean is exact however the minibatch is cut into micro-batches:

    sequence  Σ_i (1/|y_i|)·Σ_t L_t,  units = responses         GRPO: each response weighs the same
    constant  Σ_i (1/L_max)·Σ_t L_t,  units = responses         Dr. GRPO (Liu et al. 2025): no length bias
    token     Σ_i Σ_t L_t,            units = response tokens   DAPO: each token weighs the same

Without `old_logprobs` in the batch (one optimizer step per rollout) π_old is π_θ detached: ρ = 1
and its gradient is that of the plain policy gradient. Log-probabilities are of softmax(logits / T),
T the sampling temperature. Metrics (same units as the loss): the clipped fraction, the entropy
of the tempered distribution, the k3 KL to the reference (when given) and the ratio.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from honelm.objectives.base import Loss, Objective
from honelm.objectives.ppo import clipped_policy_loss, entropy_of, response_logits, token_logprobs

LengthNorm = Literal["sequence", "constant", "token"]


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref) at tokens sampled from π: (r − 1) − log r, r = π_ref/π (expm1: exact near 1)."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor, norm: LengthNorm, max_length: int) -> torch.Tensor:
    """Σ over the loss's units of (B, R) per-token values (see the module doc): a scalar."""
    summed = (per_token * mask).sum(1)  # (B,)
    if norm == "token":
        return summed.sum()
    if norm == "sequence":
        return (summed / mask.sum(1).clamp_min(1)).sum()
    if norm == "constant":
        return summed.sum() / max_length
    raise ValueError(f"unknown length_norm {norm!r}; use sequence, constant or token")


class GRPO(Objective):
    """The GRPO loss on one micro-batch of a group rollout (`honelm.rl.group.GroupRollout.collate`) for a causal LM.

    The batch holds `input_ids`, `attention_mask`, `position_ids` (B, Q+R), `query_width` Q,
    `response_mask` (B, R), `advantages` (B,), and optionally `old_logprobs` and `ref_logprobs` (B, R).
    """

    default_metric = "val_reward"

    def __init__(self, temperature: float, clip: float = 0.2, kl_coef: float = 0.0, length_norm: LengthNorm = "sequence",
                 max_length: int = 1):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.clip, self.kl_coef, self.norm, self.max_length = (temperature, clip, kl_coef, length_norm,
                                                                                 max_length)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Loss:
        q = int(batch["query_width"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        mask = batch["response_mask"]
        tempered = response_logits(logits, q, self.temperature)  # (B, R, V)
        logp = token_logprobs(tempered, batch["input_ids"][:, q:])  # (B, R)
        old = batch["old_logprobs"] if "old_logprobs" in batch else logp.detach()
        advantages = batch["advantages"].to(logp.dtype).unsqueeze(1).expand_as(logp)
        pg, clipped = clipped_policy_loss(logp, old, advantages, self.clip)
        per_token = pg
        kl = None
        if self.kl_coef > 0 and "ref_logprobs" in batch:
            kl = k3(logp, batch["ref_logprobs"])
            per_token = pg + self.kl_coef * kl
        value = reduce_tokens(per_token, mask, self.norm, self.max_length)
        with torch.no_grad():
            norm: LengthNorm = "token" if self.norm == "token" else "sequence"  # metrics: per-token means
            metrics = {"pg_loss": reduce_tokens(pg, mask, norm, 1), "clipfrac": reduce_tokens(clipped, mask, norm, 1),
                       "entropy": reduce_tokens(entropy_of(tempered), mask, norm, 1),
                       "ratio": reduce_tokens((logp - old).exp(), mask, norm, 1)}
            if kl is not None:
                metrics["kl"] = reduce_tokens(kl, mask, norm, 1)
        return Loss(value=value, units=self.units(batch), metrics=metrics)

    def units(self, batch: dict[str, Any]) -> int:
        mask = batch["response_mask"]
        return int(mask.sum()) if self.norm == "token" else int(mask.size(0))
