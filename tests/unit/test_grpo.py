"""GRPO's maths by hand (group advantages incl. all-equal groups, the clipped ratio with k3, the three
length normalisations), its rollouts on a tiny Llama, and GRPO through the one loop raising a reward."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from torch import nn

from honelm import runtime as rt
from honelm.config import TrainConfig, check_all_bounds
from honelm.errors import ConfigError
from honelm.loop import TrainPlan, fit
from honelm.objectives.grpo import GRPO, k3, reduce_tokens
from honelm.rl.group import GroupRollout, GroupRolloutStream, GroupSampler, GRPOOptions, group_advantages
from honelm.rl.policy import Reference
from honelm.rl.rewards import function_scorer
from honelm.tracking import Tracker
from tests.unit.test_ppo_rollout import EOS, PAD, IdTokenizer, prompts


def test_group_advantages_by_hand_and_all_equal_groups_give_zero():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    a = group_advantages(rewards, 4, scale_std=True)
    assert a[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4),
                                                                                              0.5 / (std + 1e-4)])
    assert a[4:].tolist() == [0.0, 0.0, 0.0, 0.0] and not torch.isnan(a).any()  # no signal, no NaN
    dr = group_advantages(rewards, 4, scale_std=False)  # Dr. GRPO: mean-centred only
    assert dr.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert group_advantages(torch.tensor([3.0, 1.0]), 2, True).sum() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        group_advantages(rewards, 3, True)


def test_reduce_tokens_sequence_constant_token():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(reduce_tokens(x, m, "sequence", 3)) == pytest.approx(2.0 + 4.0)
    assert float(reduce_tokens(x, m, "constant", 4)) == pytest.approx(10.0 / 4)
    assert float(reduce_tokens(x, m, "token", 3)) == pytest.approx(10.0)


class FixedLogits(nn.Module):
    """A 'model' whose logits are all zero over a 2-token vocabulary: every token has probability 1/2."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return type("Out", (), {"logits": self.bias.expand(*input_ids.shape, 2)})()


def test_clipped_ratio_with_k3_by_hand():
    half = math.log(0.5)
    batch = {"input_ids": torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]]), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "position_ids": torch.arange(4).expand(2, 4), "query_width": 2,
             "response_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "advantages": torch.tensor([1.0, -1.0]),
             "old_logprobs": torch.full((2, 2), half - math.log(1.5)),  # ratio pi/pi_old = 1.5 everywhere
             "ref_logprobs": torch.full((2, 2), math.log(0.25))}  # r = pi_ref/pi = 0.5
    kl = (0.5 - 1) - math.log(0.5)
    assert float(k3(torch.tensor(half), torch.tensor(math.log(0.25)))) == pytest.approx(kl)
    loss = GRPO(temperature=1.0, clip=0.2, kl_coef=0.1, length_norm="sequence")(FixedLogits(), batch)
    # row 0 (A=+1): max(-1.5, -1.2) = -1.2 per token (clipped); row 1 (A=-1): max(1.5, 1.2) = 1.5 (not clipped)
    assert float(loss.value.detach()) == pytest.approx((-1.2 + 0.1 * kl) + (1.5 + 0.1 * kl), rel=1e-5)
    assert loss.units == 2
    assert float(loss.metrics["clipfrac"]) == pytest.approx(1.0)  # row 0 all clipped, row 1 none: sum of row means
    assert float(loss.metrics["kl"]) == pytest.approx(2 * kl, rel=1e-5)
    assert float(loss.metrics["entropy"]) == pytest.approx(2 * math.log(2), rel=1e-5)
    token = GRPO(1.0, 0.2, 0.0, "token")(FixedLogits(), batch)
    assert float(token.value.detach()) == pytest.approx(2 * -1.2 + 1.5, rel=1e-5) and token.units == 3
    constant = GRPO(1.0, 0.2, 0.0, "constant", max_length=4)(FixedLogits(), batch)
    assert float(constant.value.detach()) == pytest.approx((2 * -1.2 + 1.5) / 4, rel=1e-5)
    on_policy = {k: v for k, v in batch.items() if k != "old_logprobs"}  # ratio 1: the loss is -A per token
    assert float(GRPO(1.0)(FixedLogits(), on_policy).value.detach()) == pytest.approx(-1.0 + 1.0)


def sampler_for(model: nn.Module, opts: GRPOOptions, reward: str = "token:7", kl: bool = False) -> GroupSampler:
    return GroupSampler(model, Reference(model, lora=False) if kl else None, function_scorer(reward, 64), IdTokenizer(),
                        opts, EOS, PAD, contextlib.nullcontext, chunk=8)


def test_group_rollout_rows_masks_and_ratio_one(tiny_llama):
    opts = GRPOOptions(group_size=4, prompts_per_rollout=3, response_length=24, temperature=2.0)
    model = tiny_llama(seed=3)
    rollout = sampler_for(model, opts, kl=True).sample(0, prompts(3), seed=5)
    assert len(rollout) == 12
    q = rollout.query_width
    assert all(torch.equal(rollout.input_ids[g * 4, :q], rollout.input_ids[g * 4 + j, :q]) for g in range(3) for j in range(4))
    after = rollout.response_mask == 0
    assert after.any(), "the seed should give responses that stop at EOS"
    assert (rollout.old_logprobs[after] == 0).all() and (rollout.input_ids[:, q:][after] == PAD).all()
    assert rollout.advantages.reshape(3, 4).sum(1).abs().max() < 1e-5  # centred within each group
    assert {"reward", "reward_std", "zero_std_groups", "response_length", "ended"} <= set(rollout.stats)
    # before an update the ratio is exactly 1 and the policy equals the reference: KL 0
    # (micro-batches of 5 and 7 rows, cut to their own columns, differ from the rollout's batch of 12 only by rounding)
    for rows in (list(range(5)), list(range(5, 12))):
        loss = GRPO(2.0, kl_coef=1.0)(model, rollout.collate(rows))
        assert float(loss.metrics["ratio"]) == pytest.approx(len(rows), rel=1e-5)
        assert float(loss.metrics["kl"]) == pytest.approx(0.0, abs=1e-5)


def test_micro_batches_sum_to_the_minibatch(tiny_llama):
    """The loss is a SUM over units: 2 micro-batches of 3 rows give the 6-row minibatch's mean exactly."""
    opts = GRPOOptions(group_size=3, prompts_per_rollout=2, response_length=6, temperature=1.5)
    model = tiny_llama(seed=1)
    sampler = sampler_for(model, opts)
    rollout = sampler.sample(0, prompts(2, seed=2), seed=9)
    rollout.advantages = torch.linspace(-1, 1, 6)  # any advantages: what matters is how the sum is cut
    for norm in ("sequence", "constant", "token"):
        objective = GRPO(1.5, length_norm=norm, max_length=6)
        full = objective(model, rollout.collate(list(range(6))))
        parts = [objective(model, rollout.collate(rows)) for rows in ([0, 1, 2], [3, 4, 5])]
        mean_parts = sum(float(p.value.detach()) for p in parts) / sum(p.units for p in parts)
        assert mean_parts == pytest.approx(float(full.value.detach()) / full.units, rel=1e-5, abs=1e-6), norm


def test_options_refuse_a_group_of_one_and_stream_sizes():
    with pytest.raises(ConfigError, match="group_size"):
        check_all_bounds(GRPOOptions(group_size=1), "grpo")  # the bound declared on the field
    with pytest.raises(ConfigError, match="prompts_per_rollout x grpo.group_size = 6"):
        GroupRolloutStream(sampler_for(nn.Linear(1, 1), GRPOOptions(group_size=3, prompts_per_rollout=2)),
                           prompts(4), 4, 1, 0)


def test_grpo_through_fit_raises_a_token_reward(tiny_llama, tmp_path):
    """Reward: how often token 7 occurs in a response of up to 8 tokens (about 0.1 at the start); GRPO,
    one on-policy step per rollout and no value model, raises it by more than 1 within 8 steps."""
    opts = GRPOOptions(group_size=8, prompts_per_rollout=4, response_length=8, temperature=1.0)
    model = tiny_llama(seed=0)
    sampler = sampler_for(model, opts)
    tracker = Tracker(tmp_path, tensorboard=False, progress=False)
    stream = GroupRolloutStream(sampler, prompts(32), batch_size=32, grad_accum=1, seed=0, run_dir=tmp_path,
                                tracker=tracker)
    assert stream.steps_per_rollout == 1
    cfg = TrainConfig(lr=3e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", max_steps=8, precision="fp32",
                      eval_every=0, save_every=0, log_every=2, progress=False, tensorboard=False)
    plan = TrainPlan(GRPO(opts.temperature), stream, None, lambda m, info: None, metric="val_reward")
    fit(model, plan, cfg, rt.Runtime(device=torch.device("cpu")), tmp_path, tracker=tracker)
    tracker.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if r["event"] == "rollout"]
    assert len(rewards) == 8 and rewards[-1] > rewards[0] + 1.0, rewards
    train = [r for r in rows if r["event"] == "train"]
    assert {"pg_loss", "clipfrac", "entropy", "ratio"} <= set(train[-1])
    assert train[-1]["clipfrac"] == 0.0 and train[-1]["ratio"] == pytest.approx(1.0)  # on-policy: ratio exactly 1
    assert isinstance(GroupRollout.load(tmp_path / "rollouts" / "rollout-000007.pt"), GroupRollout)


def test_arithmetic_data_keeps_grpo_prompts_unseen():
    from honelm.demo import arithmetic_data

    corpus, sft, held = arithmetic_data(n_sft=300, n_prompts=100, seed=1)
    assert len(corpus) == len(sft) == 300 and len(held) == 100
    assert not {r["prompt"] for r in sft} & {r["prompt"] for r in held}
    a, b = (int(x) for x in held[0]["prompt"].removeprefix("which is larger, ").rstrip("?").split(" or "))
    assert held[0]["answer"] == str(max(a, b)) and corpus[0].endswith(" " + sft[0]["completion"])
