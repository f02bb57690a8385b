"""The per-token maths of PPO between sampling and the loss, as small pure functions.

This module owns: which response positions count (`response_mask`: everything up to and
including the first EOS), masked statistics and whitening, the two KL estimators, the per-token
reward (KL penalty on every token, the sequence score on the last real one) and generalised
advantage estimation. Shapes: B sequences, R response positions; every mask is 1 on a prefix of
each row (the real response tokens) and 0 after it, and every function leaves masked-out
positions at exactly 0, so nothing after EOS ever gets a reward, a KL, an advantage or a return.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def response_mask(response: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """(B, R) float mask: 1 up to and including the first EOS of each row, 0 after it.

    A row without EOS (cut at the length limit) is all ones. Tokens after the first EOS (padding,
    or anything a sampler emitted) get no reward, KL, value loss or policy loss.
    """
    if eos_id is None:
        return torch.ones_like(response, dtype=torch.float32)
    is_eos = (response == eos_id).long()  # (B, R)
    eos_before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before position t
    return (eos_before == 0).float()


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real position of each row of a prefix mask (B, R); rows need >= 1 real token."""
    lengths = mask.sum(1).long()
    if bool((lengths < 1).any()):
        raise ValueError("every response needs at least one real token")
    return lengths - 1


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x·m) / sum(m), over everything or along `dim`."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp_min(1) if dim is not None \
        else masked_sum(x, mask) / mask.sum().clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by n/(n-1) when `unbiased` and n > 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and float(n) > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries; 0 outside the mask.

    shift_mean=False adds the mean back: x' = (x − μ)/σ + μ. That is how rewards are whitened
    (only their scale changes, so a reward that is positive on average stays positive: removing
    the mean of the rewards would change what the policy is paid for); advantages are whitened
    with the mean removed.
    """
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) at the sampled token (y ~ π), same shape as the inputs.

        k1 = log π(y) − log π_ref(y)                    unbiased, can be negative
        k3 = (r − 1) − log r,  r = π_ref(y) / π(y)      unbiased, always >= 0, lower variance

    (Schulman, "Approximating KL divergence", 2020.) k3 is computed with expm1 so r ≈ 1 loses no digits.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B, R) per-token rewards: −kl_coef·KL_t on every real token, plus the score (B,) on the last real token.

    The score belongs on the last real token of the response (the EOS when there is one): the
    value of a state before it must account for it, and nothing after it exists.
    """
    rewards = -kl_coef * kl * mask  # (B, R)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_index(mask)] += score.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the real positions; returns (advantages, returns), each (B, R).

        δ_t = r_t + γ·V_{t+1} − V_t          (V_{t+1} = 0 after the last real token: the episode ends there)
        A_t = δ_t + γλ·A_{t+1}               (A = 0 after the last real token)
        R_t = A_t + V_t                      the value target

    Both outputs are 0 where mask is 0.
    """
    values = values * mask
    width = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv  # already 0 beyond the end of each row
    return advantages, (advantages + values) * mask
