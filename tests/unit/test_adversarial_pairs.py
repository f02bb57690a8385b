"""Adversarial training on the pairwise losses of `reward` and `dpo`: strength 0 is plain training exactly, fgm and
pgd raise the loss, chosen and rejected rows each move in their own ball with padding fixed, DPO's reference is
never perturbed (also when it is the LoRA policy with its adapters off), the consistency regularisers compare the
pair's preference rows, and the methods that do not fit a pairwise loss are refused naming the field and stage."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from honelm import boosters
from honelm.boosters import adversarial as A
from honelm.boosters.adversarial import Adversarial, AdversarialConfig, example_norms
from honelm.boosters.lora import LoraConfig, apply_lora
from honelm.data.preferences import EncodedPairs
from honelm.errors import ConfigError
from honelm.models import LoadedModel, build_model
from honelm.objectives.dpo import DPO
from honelm.objectives.logprobs import sequence_logps
from honelm.objectives.reward import RewardModel
from honelm.stages.dpo import DPOConfig
from honelm.stages.reward import RewardConfig

PAD, EOS = 0, 1
SPECIAL = [PAD, EOS]
ZERO = [("fgm", {"epsilon": 0.0}), ("pgd", {"steps": 0}), ("freelb", {"epsilon": 0.0}), ("smart", {"epsilon": 0.0}),
        ("r3f", {"epsilon": 0.0}), ("vat", {"steps": 0})]


def pairs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two pairs of different lengths (right padding in some rows); labels on the replies only (prompt 3 tokens)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(2, 64, (n,), generator=g).tolist() + [EOS] for n in (6, 4, 5, 7)]
    labels = [[-100] * 3 + s[3:] for s in seqs]
    enc = EncodedPairs(seqs[:2], labels[:2], seqs[2:], labels[2:], None, pad_id=PAD, rows=[])
    return enc.collate([0, 1])


def reward_model(seed: int = 0) -> torch.nn.Module:
    return build_model("decoder", "test", vocab_size=64, task="classify", num_labels=1, seed=seed, pad_token_id=PAD,
                       eos_token_id=EOS)  # a Llama: no dropout


def setups(tiny_llama) -> dict[str, tuple]:
    """(model factory, objective factory): a reward model; DPO against a frozen copy; DPO with a LoRA policy whose
    reference is itself with the adapters off (the embedding module the perturbation hooks is the reference's too)."""
    def lora_policy():
        return apply_lora(LoadedModel.built(tiny_llama()), LoraConfig(enabled=True, r=4, alpha=8), "lm",
                          lambda _: None).model

    return {"reward": (reward_model, lambda model: RewardModel()),
            "dpo": (tiny_llama, lambda model: DPO(beta=0.5, reference=copy.deepcopy(model).eval())),
            "dpo-lora": (lora_policy, lambda model: DPO(beta=0.5))}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["reward", "dpo", "dpo-lora"])
@pytest.mark.parametrize("method,kw", ZERO)
def test_strength_zero_is_plain_training_exactly(kind, method, kw, tiny_llama):
    make, objective_of = setups(tiny_llama)[kind]
    batch = pairs()
    plain_model, adv_model = make(), make()
    plain = objective_of(plain_model).step(plain_model.train(), batch, 0.5, nullcontext)
    wrapped = Adversarial(objective_of(adv_model), AdversarialConfig(method=method, **kw), SPECIAL)
    loss = wrapped.step(adv_model.train(), batch, 0.5, nullcontext)
    assert torch.equal(loss.value.detach(), plain.value.detach()) and "adv_loss" not in loss.metrics
    g_plain, g_adv = grads(plain_model), grads(adv_model)
    assert g_plain.keys() == g_adv.keys() and g_plain
    assert all(torch.equal(g_plain[k], g_adv[k]) for k in g_plain)


@pytest.mark.parametrize("kind", ["reward", "dpo", "dpo-lora"])
@pytest.mark.parametrize("method,kw", [("fgm", {"epsilon": 1.0}), ("pgd", {"epsilon": 1.0, "step_size": 0.5})])
def test_fgm_and_pgd_raise_the_pairwise_loss(kind, method, kw, tiny_llama):
    """The loss under the perturbation is above the clean loss. For DPO at step 0 the policy is the reference, so the
    clean loss is log 2 per pair; had the reference been perturbed with the policy, h would stay 0 and so would the
    rise (the LoRA case: the reference is the same model, adapters off)."""
    make, objective_of = setups(tiny_llama)[kind]
    model = make().train()
    batch = pairs(seed=1)
    loss = Adversarial(objective_of(model), AdversarialConfig(method=method, **kw), SPECIAL).step(
        model, batch, 1.0, nullcontext)
    clean, perturbed = float(loss.value), float(loss.metrics["adv_loss"])
    assert perturbed > clean + 1e-3
    if kind.startswith("dpo"):
        assert clean == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # two pairs at log 2 each


def test_dpo_reference_log_probs_are_computed_clean_before_the_perturbed_passes(tiny_llama):
    base = tiny_llama()
    frozen = copy.deepcopy(base).eval()
    policy = apply_lora(LoadedModel.built(base), LoraConfig(enabled=True, r=4), "lm", lambda _: None).model
    batch = pairs()
    wrapped = Adversarial(DPO(beta=0.5), AdversarialConfig(method="fgm"), SPECIAL)
    with torch.no_grad():
        expected = sequence_logps(frozen, batch, right_padded=True)[0]
    fixed = wrapped.unperturbed(policy, batch)
    assert torch.allclose(fixed["ref_logps"], expected, atol=1e-6) and "ref_logps" not in batch
    stored = {**batch, "ref_logps": torch.zeros(4)}  # precomputed log-probs are used as they are
    assert wrapped.unperturbed(policy, stored) is stored


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_each_row_of_a_pair_gets_its_own_ball_and_padding_never_moves(method, monkeypatch):
    model = reward_model().train()
    batch = pairs()
    wrapped = Adversarial(RewardModel(), AdversarialConfig(method=method, epsilon=0.3), SPECIAL)
    deltas: list[torch.Tensor] = []
    real = A.perturbed

    def recording(target, delta):  # every perturbation a pass applies
        deltas.append(delta.detach().clone())
        return real(target, delta)

    monkeypatch.setattr(A, "perturbed", recording)
    wrapped.step(model, batch, 1.0, nullcontext)
    delta = deltas[-1]  # the pass that trains θ
    fixed = (batch["attention_mask"] == 0) | torch.isin(batch["input_ids"], torch.tensor(SPECIAL))
    assert float(delta[fixed].abs().max()) == 0.0  # padding (and EOS) never moves
    norms = example_norms(delta, "l2")
    assert norms.shape == (4,) and bool((norms > 0).all()) and bool((norms <= 0.3 + 1e-5).all())
    if method == "fgm":  # fgm steps to the edge of every row's ball: chosen and rejected alike
        assert norms.tolist() == pytest.approx([0.3] * 4, rel=1e-4)


@pytest.mark.parametrize("kind", ["reward", "dpo"])
@pytest.mark.parametrize("method,kw", [("smart", {"epsilon": 2.0}), ("r3f", {"epsilon": 0.5}),
                                       ("vat", {"epsilon": 2.0})])
def test_consistency_regularisers_compare_the_preference_rows(kind, method, kw, tiny_llama):
    """The rows compared are [r_c, r_r] (reward) or the implicit rewards [r̂_c, r̂_r] (dpo): a 2-way softmax, the pair's
    preference probability, which a large perturbation moves (a single row per pair would always give 0)."""
    make, objective_of = setups(tiny_llama)[kind]
    model = make().train()
    objective = objective_of(model)
    _, rows = objective.outputs(model, pairs())
    assert rows.shape == (2, 2)
    loss = Adversarial(objective, AdversarialConfig(method=method, **kw), SPECIAL).step(model, pairs(), 1.0,
                                                                                          nullcontext)
    assert float(loss.metrics["adv_loss"]) > 0


@pytest.mark.parametrize("config", [RewardConfig, DPOConfig])
@pytest.mark.parametrize("method", ["neftune", "plae"])
def test_methods_that_do_not_fit_a_pairwise_loss_are_refused(config, method):
    cfg = config()
    cfg.adversarial = AdversarialConfig(method=method)
    with pytest.raises(ConfigError, match=rf"adversarial.method={method} (does not apply to|works with classify only)"
                                          rf".*{config.verb}"):
        boosters.check(cfg)
    for fitting in ("fgm", "pgd", "freelb", "smart", "r3f", "vat"):
        cfg.adversarial = AdversarialConfig(method=fitting)
        boosters.check(cfg)
