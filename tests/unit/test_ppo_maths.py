"""PPO's maths on hand-worked numbers: EOS masks, KL estimators, whitening, per-token rewards, GAE, clipped losses."""

from __future__ import annotations

import math

import pytest
import torch

from honelm.objectives.ppo import clipped_policy_loss, clipped_value_loss
from honelm.rl.advantages import (gae, kl_estimate, last_index, masked_mean, masked_var, masked_whiten, response_mask,
                                  token_rewards)


def test_response_mask_keeps_everything_up_to_the_first_eos():
    eos = 1
    response = torch.tensor([[5, 1, 7, 1],    # EOS at 1: the second EOS and the 7 are after it
                             [1, 3, 3, 3],    # EOS first: a one-token response
                             [4, 4, 4, 4]])   # no EOS: cut at the length limit, all real
    mask = response_mask(response, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert last_index(mask).tolist() == [1, 0, 3]
    assert response_mask(response, None).tolist() == [[1] * 4] * 3


def test_kl_estimators_on_hand_worked_values():
    logp = torch.log(torch.tensor([0.5, 0.2, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.4, 0.3]))
    # k1 = log(pi/pi_ref): log 2, log 0.5, 0
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([math.log(2), -math.log(2), 0.0]))
    # k3 = (r - 1) - log r with r = pi_ref/pi: r = 0.5 → -0.5 + log 2; r = 2 → 1 - log 2; r = 1 → 0
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"),
                               torch.tensor([-0.5 + math.log(2), 1 - math.log(2), 0.0]))
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")  # type: ignore[arg-type]


def test_k3_is_never_negative_and_both_estimators_are_unbiased():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(7, 50, generator=g) * 3, -1)
    ref = torch.log_softmax(torch.randn(7, 50, generator=g) * 3, -1)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    # E_{y~pi}[k(y)] is exactly KL(pi || pi_ref) for both: sum_y pi(y) k(y)
    true_kl = (logp.exp() * (logp - ref)).sum(-1)
    for est in ("k1", "k3"):
        expected = (logp.exp() * kl_estimate(logp, ref, est)).sum(-1)
        torch.testing.assert_close(expected, true_kl, rtol=1e-4, atol=1e-5)


def test_masked_whitening_on_hand_worked_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # masked entries 1, 2, 3, 4: mean 2.5, unbiased variance (2.25+0.25+0.25+2.25)/3 = 5/3
    assert float(masked_mean(x, mask)) == pytest.approx(2.5)
    assert float(masked_var(x, mask)) == pytest.approx(5 / 3)
    std = math.sqrt(5 / 3)
    white = masked_whiten(x, mask)
    torch.testing.assert_close(white, torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]]))
    # rewards keep their mean: only the scale changes
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, torch.tensor([[2.5 - 1.5 / std, 2.5 - 0.5 / std, 2.5 + 0.5 / std],
                                                   [2.5 + 1.5 / std, 0.0, 0.0]]))
    assert float(masked_mean(kept, mask)) == pytest.approx(2.5)


def test_score_goes_on_the_last_real_token_and_nothing_after_eos():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1 + 2.0, 0.0, 0.0],
                                                      [-0.25, -0.3, -0.35, -0.4 - 1.0]]))


def test_gae_by_hand():
    # one row, real length 2 (the third position is after EOS and must not leak in)
    rewards = torch.tensor([[0.5, 1.0, 9.0]])
    values = torch.tensor([[0.2, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # δ1 = 1.0 + 0.9·0 − 0.4 = 0.6;  A1 = 0.6
    # δ0 = 0.5 + 0.9·0.4 − 0.2 = 0.66;  A0 = 0.66 + 0.9·0.5·0.6 = 0.93
    torch.testing.assert_close(adv, torch.tensor([[0.93, 0.6, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.13, 1.0, 0.0]]))


def naive_gae(rewards: list[float], values: list[float], length: int, gamma: float, lam: float) -> list[float]:
    """A_t = Σ_l (γλ)^l δ_{t+l} over the real positions, written as the sum, not the recursion."""
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < length else 0.0) - values[t] for t in range(length)]
    out = [sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) for t in range(length)]
    return out + [0.0] * (len(rewards) - length)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.5, 0.0), (1.0, 1.0), (0.0, 0.7)])
def test_gae_matches_the_naive_sum(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 10 + lam * 100))
    rewards = torch.randn(5, 7, generator=g, dtype=torch.float64)
    values = torch.randn(5, 7, generator=g, dtype=torch.float64)
    lengths = [7, 1, 4, 6, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = naive_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        torch.testing.assert_close(adv[b], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(ret[b, :n], adv[b, :n] + values[b, :n])
        assert (ret[b, n:] == 0).all()


def test_clipped_policy_loss_by_hand():
    eps = 0.2
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.0])
    old = torch.zeros(5)
    logp = torch.log(ratio).requires_grad_(True)
    loss, clipped = clipped_policy_loss(logp, old, adv, eps)
    # max(-A·ρ, -A·clip(ρ, 0.8, 1.2)):
    # A=1, ρ=1.5: max(-1.5, -1.2) = -1.2 (clipped)   A=1, ρ=0.5: max(-0.5, -0.8) = -0.5
    # A=-1, ρ=1.5: max(1.5, 1.2) = 1.5               A=-1, ρ=0.5: max(0.5, 0.8) = 0.8 (clipped)
    # A=2, ρ=1: -2
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, -0.5, 1.5, 0.8, -2.0]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    loss.sum().backward()
    # clipped terms pass no gradient; others: d(-A·ρ)/dlogp = -A·ρ
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5, 1.5, 0.0, -2.0]))


def test_clipped_value_loss_by_hand():
    eps = 0.2
    values = torch.tensor([1.0, 0.6, 1.0])
    old = torch.tensor([0.5, 0.5, 0.5])
    returns = torch.tensor([2.0, 2.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, eps)
    # V_clip = 0.5 + clip(V - 0.5, ±0.2): 0.7, 0.6, 0.7
    # ½·max((1-2)², (0.7-2)²) = ½·1.69;  ½·max(1.96, 1.96) = 0.98;  ½·max(1, 0.49) = 0.5
    torch.testing.assert_close(loss, torch.tensor([0.845, 0.98, 0.5]))
    assert clipped.tolist() == [1.0, 0.0, 0.0]
