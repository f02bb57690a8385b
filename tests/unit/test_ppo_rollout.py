"""Rollouts on a tiny Llama: masking after EOS end to end, ratio 1 before an update, deterministic and
resumable minibatches, and PPO through the one loop raising a programmatic reward with bounded KL."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from honelm import runtime as rt
from honelm.config import TrainConfig
from honelm.errors import HonelmError
from honelm.loop import TrainPlan, fit
from honelm.objectives.ppo import PPO
from honelm.rl.policy import PolicyWithValue, Reference
from honelm.rl.prompts import EncodedPrompt
from honelm.rl.rewards import function_scorer
from honelm.rl.rollout import PPOOptions, RolloutStream, Sampler, build_rollout
from honelm.tracking import Tracker

EOS, PAD = 1, 0


class IdTokenizer:
    """Decoding is all a sampler needs of a tokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (EOS, PAD)))


def prompts(n: int, seed: int = 0) -> list[EncodedPrompt]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(2, 6, (1,), generator=g))
        out.append(EncodedPrompt(torch.randint(2, 64, (length,), generator=g).tolist(), f"p{i}", "test", i + 1))
    return out


def sampler_for(model: torch.nn.Module, opts: PPOOptions, reward: str = "token:7") -> Sampler:
    return Sampler(PolicyWithValue.shared(model), Reference(model, lora=False), function_scorer(reward, 64),
                   IdTokenizer(), opts, EOS, PAD, contextlib.nullcontext, chunk=8)


def test_nothing_after_eos_counts(tiny_llama):
    opts = PPOOptions(rollout_batch=16, response_length=12, temperature=2.0)
    sampler = sampler_for(tiny_llama(seed=3), opts)
    sampled = sampler.sample(prompts(16), seed=5)
    rollout = build_rollout(0, sampled, opts)
    ended_early = [b for b in range(16) if sampled.mask[b].sum() < sampled.mask.size(1)]
    assert ended_early, "the seed should give some responses that stop at EOS"
    after = sampled.mask == 0
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        assert (getattr(rollout, name)[after] == 0).all(), name
    assert (rollout.input_ids[:, rollout.query_width:][after] == PAD).all()
    assert (rollout.attention_mask[:, rollout.query_width:][after] == 0).all()
    # the last real token of a row that stopped is its EOS
    for b in ended_early:
        n = int(sampled.mask[b].sum())
        assert sampled.response[b, n - 1] == EOS

    # the loss cannot see anything after EOS: scribble there and it is unchanged
    objective = PPO(temperature=opts.temperature)
    batch = rollout.collate(ended_early[:4])
    loss = objective(sampler.model, batch)
    scribbled = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    resp_after = scribbled["response_mask"] == 0
    q = scribbled["query_width"]
    scribbled["input_ids"][:, q:][resp_after] = 9
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        scribbled[name][resp_after] = 123.0
    again = objective(sampler.model, scribbled)
    torch.testing.assert_close(again.value, loss.value)
    assert int(again.units) == int(batch["response_mask"].sum())


def test_ratio_is_one_before_the_first_update(tiny_llama):
    opts = PPOOptions(rollout_batch=8, response_length=6, temperature=0.7)
    sampler = sampler_for(tiny_llama(seed=1), opts)
    rollout = build_rollout(0, sampler.sample(prompts(8), seed=2), opts)
    loss = PPO(opts.temperature)(sampler.model, rollout.collate(list(range(8))))
    units = float(loss.units)
    assert float(loss.metrics["ratio"]) / units == pytest.approx(1.0, abs=1e-5)
    assert float(loss.metrics["clipfrac"]) == 0.0
    assert float(loss.metrics["approx_kl"]) / units < 1e-10
    # advantages are whitened over the real tokens: the policy loss starts at -mean(A) = 0
    assert float(loss.metrics["pg_loss"]) / units == pytest.approx(0.0, abs=1e-5)


def test_minibatches_are_deterministic_and_resume_from_the_saved_rollout(tiny_llama, tmp_path):
    opts = PPOOptions(rollout_batch=8, ppo_epochs=2, response_length=5, temperature=1.0)

    def stream(run_dir=None) -> RolloutStream:
        return RolloutStream(sampler_for(tiny_llama(seed=2), opts), prompts(12), batch_size=2, grad_accum=2, seed=4,
                             run_dir=run_dir)

    a, b = stream(tmp_path / "a"), stream()
    assert a.steps_per_rollout == 4 and a.minibatches == 2
    steps_a = [a.next_step() for _ in range(3)]
    steps_b = [b.next_step() for _ in range(3)]
    for sa, sb in zip(steps_a, steps_b):
        for ma, mb in zip(sa, sb):
            for k in ma:
                assert torch.equal(ma[k], mb[k]) if isinstance(ma[k], torch.Tensor) else ma[k] == mb[k]
    assert (tmp_path / "a" / "rollouts" / "rollout-000000.pt").is_file()
    # a fresh stream put at step 2 (mid-rollout, as `fit` does on --resume) trains on the saved rollout
    resumed = stream(tmp_path / "a")
    resumed.position = 2 * resumed.step_items
    for ma, mb in zip(resumed.next_step(), steps_a[2]):
        assert torch.equal(ma["advantages"], mb["advantages"]) and torch.equal(ma["input_ids"], mb["input_ids"])
    lost = stream(tmp_path / "none")
    lost.position = 1 * lost.step_items
    with pytest.raises(HonelmError, match="rollout 0"):
        lost.next_step()
    with pytest.raises(Exception, match="multiple of the minibatch"):
        RolloutStream(sampler_for(tiny_llama(), PPOOptions(rollout_batch=6)), prompts(4), 4, 1, 0)


def test_ppo_through_fit_raises_a_token_reward_with_bounded_kl(tiny_llama, tmp_path):
    """Reward: how often token 7 appears in the response (about 0.1 of 8 tokens at the start). PPO must
    raise it by more than one occurrence within 8 rollouts while the KL penalty keeps the policy near
    the reference (the KL grows with the reward; the bound has margin on this seed: about 5 nats)."""
    opts = PPOOptions(rollout_batch=32, ppo_epochs=2, response_length=8, temperature=1.0, kl_coef=0.2)
    sampler = sampler_for(tiny_llama(seed=0), opts)
    runtime = rt.Runtime(device=torch.device("cpu"))
    tracker = Tracker(tmp_path, tensorboard=False, progress=False)
    stream = RolloutStream(sampler, prompts(64), batch_size=16, grad_accum=1, seed=0, run_dir=tmp_path, tracker=tracker)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", max_steps=8 * stream.steps_per_rollout,
                      precision="fp32", eval_every=0, save_every=0, log_every=4, progress=False, tensorboard=False)
    plan = TrainPlan(PPO(opts.temperature), stream, None, lambda m, info: None, metric="val_score")
    result = fit(sampler.model, plan, cfg, runtime, tmp_path, tracker=tracker)
    tracker.close()
    assert result.steps == cfg.max_steps
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in rows if r["event"] == "rollout"]
    assert len(rollouts) == 8
    first = sum(r["score"] for r in rollouts[:2]) / 2
    last = sum(r["score"] for r in rollouts[-2:]) / 2
    assert last > first + 1.0, [round(r["score"], 2) for r in rollouts]
    kls = [r["kl"] for r in rollouts]
    assert kls[0] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    assert 0.5 < max(kls) < 8.0, [round(k, 2) for k in kls]
    train = [r for r in rows if r["event"] == "train"]
    assert {"pg_loss", "vf_loss", "clipfrac", "entropy", "approx_kl"} <= set(train[-1])
    assert 0.0 <= train[-1]["clipfrac"] <= 1.0


def test_lora_reference_is_the_base_model_and_does_not_drift(tiny_llama):
    from honelm.boosters.lora import LoraConfig, apply_lora
    from honelm.models import LoadedModel

    base = tiny_llama(seed=4)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    mask, pos = torch.ones_like(ids), torch.arange(5).unsqueeze(0)
    expected = base(input_ids=ids).logits.detach()
    policy = apply_lora(LoadedModel.built(base), LoraConfig(enabled=True, r=2), "lm", lambda _: None).model
    with torch.no_grad():  # an "update": every LoRA B away from 0
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    reference = Reference(policy, lora=True)
    torch.testing.assert_close(reference.logits(ids, mask, pos, contextlib.nullcontext), expected)
    assert not torch.allclose(policy(input_ids=ids).logits, expected)  # the policy itself has moved


def test_separate_value_model_reads_every_position(tiny_llama):
    from transformers import LlamaForSequenceClassification

    policy = tiny_llama(seed=5)
    scorer = LlamaForSequenceClassification(policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1}))
    model = PolicyWithValue.separate(policy, scorer)
    ids = torch.tensor([[0, 0, 5, 9, 13], [4, 8, 15, 16, 23]])
    mask = (ids != 0).long()
    logits, values = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
    assert logits.shape == (2, 5, 64) and values.shape == (2, 5)
    # the head is the classifier's own: at the last token it gives the classifier's score
    pooled = scorer(input_ids=ids[1:], attention_mask=mask[1:]).logits[0, 0]
    torch.testing.assert_close(values[1, -1], pooled, rtol=1e-4, atol=1e-5)


def test_rollouts_ignore_generation_settings_saved_with_the_checkpoint(tiny_llama):
    """A repetition penalty in the model's generation_config would change what is sampled, so the
    sampled tokens would not come from softmax(logits / T), which the loss assumes."""
    model = tiny_llama(seed=6)
    opts = PPOOptions(rollout_batch=4, response_length=6, temperature=1.0)
    plain = sampler_for(model, opts).sample(prompts(4), seed=9).response
    model.generation_config.repetition_penalty = 50.0
    again = sampler_for(model, opts).sample(prompts(4), seed=9).response
    assert torch.equal(plain, again) and model.generation_config.repetition_penalty == 50.0
