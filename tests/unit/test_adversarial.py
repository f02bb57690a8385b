"""Adversarial training on embeddings: projections, exactness of the no-op settings, LoRA safety,
FreeLB's gradient mean and fixed dropout masks, FGM against finite differences, the consistency
regularisers, NEFTune's scale, exact gradient accumulation, and plae's stored perturbations."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing

import pytest
import torch

from honelm.boosters.adversarial import (REGISTRY, Adversarial, AdversarialConfig, Method, describe, direction,
                                         example_norms, kl, perturbed, project, random_start, register, sym_kl)
from honelm.boosters.lora import LoraConfig, apply_lora
from honelm.boosters.plae import stored_lookup
from honelm.errors import ConfigError
from honelm.models import LoadedModel, build_model
from honelm.objectives.classify import Classify
from honelm.objectives.lm import CausalLM

VOCAB = 120
SPECIAL = [0, 1, 2]  # pad, cls, sep in the batches below
NULL = __import__("contextlib").nullcontext


def classifier(seed: int = 0, dropout: float = 0.1):
    return build_model("encoder", "test", VOCAB, task="classify", num_labels=3, seed=seed,
                       hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def batch(seed: int = 0, rows: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # padding in row 0
    ids = ids.masked_fill(mask == 0, 0)
    ids[0, -5] = 2  # [SEP] before the padding
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (rows,), generator=g),
            "index": torch.arange(rows)}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def adv(method: str, **kw) -> Adversarial:
    return Adversarial(Classify(), AdversarialConfig(method=method, **kw), SPECIAL)


# ---------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_bounds_every_example(norm):
    delta = torch.randn(6, 7, 5) * torch.tensor([0.01, 0.1, 1, 10, 100, 0.5]).view(-1, 1, 1)
    out = project(delta, 0.7, norm)
    n = example_norms(out, norm)
    assert bool((n <= 0.7 + 1e-6).all())
    inside = example_norms(delta, norm) <= 0.7  # points already inside the ball do not move
    assert torch.equal(out[inside], delta[inside])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_keeps_delta_in_the_ball_and_off_padding_and_specials(norm):
    torch.manual_seed(0)
    model = classifier(dropout=0.0)
    a = adv("pgd", epsilon=0.05, steps=4, step_size=0.04, init_mag=0.03, norm=norm)
    b = batch()
    delta = a.generate(model, b, NULL)
    assert bool((example_norms(delta, norm) <= 0.05 + 1e-6).all())
    fixed = (b["attention_mask"] == 0) | torch.isin(b["input_ids"], torch.tensor(SPECIAL))
    assert float(delta[fixed].abs().max()) == 0.0  # padding never moves; specials not unless asked
    assert float(delta[~fixed].abs().max()) > 0


def test_pgd_trains_on_the_adversarial_loss_alone():
    """θ's gradient is that of L(e + δ_K) with δ_K from the same K ascent steps; `loss` is the clean loss."""
    b = batch()
    model = classifier(dropout=0.0).train()
    a = adv("pgd", epsilon=0.3, steps=3, step_size=0.2)
    loss = a.step(model, b, 0.5, NULL)
    got = grads(model)
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    delta = a.generate(ref, b, NULL)
    ref.zero_grad(set_to_none=True)  # generate must not leave θ-gradients behind
    with perturbed(ref, delta):
        (Classify()(ref, b).value * 0.5).backward()
    want = grads(ref)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6, rtol=1e-4) for k in got)
    with torch.no_grad():
        assert float(loss.value) == pytest.approx(float(Classify()(model, b).value), rel=1e-5)


def test_directions_have_unit_size():
    g = torch.randn(3, 4, 5)
    assert torch.allclose(example_norms(direction(g, "l2"), "l2"), torch.ones(3))
    assert torch.equal(direction(g, "linf"), g.sign())
    assert torch.allclose(example_norms(direction(g, "linf", "max"), "linf"), torch.ones(3))


def test_freelb_random_start_scale():
    mask = torch.ones(2000, 8)
    mask[:, 6:] = 0
    d = random_start(torch.Size((2000, 8, 16)), mask, 0.6, "l2", torch.device("cpu"))
    assert float(d[:, 6:].abs().max()) == 0.0
    # E‖δ0‖_F ≈ mag/√3 (uniform entries of variance 1/3, scaled by mag/√(T·d))
    assert float(example_norms(d, "l2").mean()) == pytest.approx(0.6 / math.sqrt(3), rel=0.03)
    d = random_start(torch.Size((4, 8, 16)), mask[:4], 0.6, "linf", torch.device("cpu"))
    assert float(d.abs().max()) <= 0.6


# ---------------------------------------------------------------------------------------------- no-ops


@pytest.mark.parametrize("method,kw", [("fgm", {"epsilon": 0.0}), ("fgm", {"steps": 0}), ("pgd", {"steps": 0}),
                                       ("pgd", {"epsilon": 0.0}), ("freelb", {"steps": 0}), ("freelb", {"epsilon": 0.0}),
                                       ("smart", {"epsilon": 0.0}), ("r3f", {"epsilon": 0.0}), ("vat", {"steps": 0}),
                                       ("neftune", {"epsilon": 0.0})])
def test_zero_steps_or_zero_epsilon_is_plain_training_exactly(method, kw):
    b = batch()
    plain_model, adv_model = classifier(), classifier()
    torch.manual_seed(5)
    Classify().step(plain_model.train(), b, 0.25, NULL)
    torch.manual_seed(5)
    loss = adv(method, **kw).step(adv_model.train(), b, 0.25, NULL)
    g_plain, g_adv = grads(plain_model), grads(adv_model)
    assert g_plain.keys() == g_adv.keys()
    assert all(torch.equal(g_plain[k], g_adv[k]) for k in g_plain)
    assert "adv_loss" not in loss.metrics
    after_adv = torch.get_rng_state()
    torch.manual_seed(5)
    Classify().step(classifier().train(), b, 0.25, NULL)
    assert torch.equal(after_adv, torch.get_rng_state())  # no extra random draws either


# ---------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb", "smart", "r3f", "vat", "neftune"])
def test_with_lora_the_embedding_matrix_stays_and_only_adapters_and_head_move(method):
    model = apply_lora(LoadedModel.built(classifier()), LoraConfig(enabled=True, r=4), "classify", lambda _: None).model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    a = adv(method, **({"epsilon": 0.5} if method not in ("r3f", "neftune") else {}))
    model.train()
    for s in range(2):
        loss = a.step(model, batch(seed=s), 0.25, NULL)
        assert float(loss.metrics["delta_norm"]) > 0
        opt.step()
        opt.zero_grad()
    emb = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is emb)
    assert torch.equal(emb, before[name])  # bit for bit
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert all("lora_" in n or "classifier" in n or ".pooler.modules_to_save." in n for n in moved)  # lora.train_pooler


# ---------------------------------------------------------------------------------------------- FreeLB


def test_freelb_gradient_is_the_mean_of_the_per_pass_gradients():
    torch.manual_seed(0)
    model = classifier(dropout=0.0).train()
    b, k, alpha, init = batch(), 3, 0.05, 0.1
    a = adv("freelb", steps=k, step_size=alpha, init_mag=init, epsilon=0.08)
    torch.manual_seed(11)
    a.step(model, b, 0.5, NULL)
    got = grads(model)

    # by hand: the same δ sequence, each pass's θ-gradient computed on its own, then averaged
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    mask = a.mask(b)
    m3 = mask.unsqueeze(-1)
    delta = project(random_start(torch.Size((*b["input_ids"].shape, 32)), mask, init, "l2", mask.device), 0.08, "l2")
    params = [p for p in ref.parameters() if p.requires_grad]
    per_pass = []
    for t in range(k):
        d = delta.clone().requires_grad_(True)
        with perturbed(ref, d):
            loss = Classify()(ref, b).value * 0.5
        gs = torch.autograd.grad(loss, params + [d])
        per_pass.append(gs[:-1])
        delta = project(delta + alpha * direction(gs[-1] * m3, "l2", "max"), 0.08, "l2") * m3
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    for i, n in enumerate(names):
        mean = sum(pp[i] for pp in per_pass) / k
        assert torch.allclose(got[n], mean, atol=1e-6, rtol=1e-4), n


def test_freelb_uses_the_same_dropout_masks_in_every_pass():
    model = classifier(dropout=0.3).train()
    masks: list[torch.Tensor] = []

    def record(module, inputs, out):
        masks.append((out == 0) & (inputs[0] != 0))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    torch.manual_seed(0)
    adv("freelb", steps=3).step(model, batch(), 1.0, NULL)
    for h in hooks:
        h.remove()
    per_pass = len(masks) // 3
    assert per_pass > 0 and len(masks) == 3 * per_pass
    for t in (1, 2):
        assert all(torch.equal(masks[i], masks[t * per_pass + i]) for i in range(per_pass))
    assert any(bool(m.any()) for m in masks)  # dropout really dropped something


# ---------------------------------------------------------------------------------------------- FGM


def test_fgm_direction_agrees_with_finite_differences():
    """The δ fgm trains on is ε times the unit direction along which the loss climbs fastest.

    Checked in float64 by central differences: along δ_i/ε the directional derivative of the loss
    equals ‖∇_{e_i} L‖, and no random unit direction on the same example climbs faster.
    """
    torch.manual_seed(0)
    model = classifier(dropout=0.0).double().eval()
    b = batch()
    a = adv("fgm", epsilon=0.7)
    seen = []
    original = a._loss
    a._loss = lambda m, bt, delta, ac: (seen.append(delta.detach().double()), original(m, bt, delta, ac))[1]  # type: ignore[method-assign]
    a.step(model, b, 1.0, NULL)
    delta = seen[1]  # [0] is the clean pass (δ = 0)
    shape, m3 = delta.shape, a.mask(b).unsqueeze(-1).double()

    def loss_at(d: torch.Tensor) -> torch.Tensor:
        with perturbed(model, d):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum")

    zero = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    loss_at(zero).backward()
    g = zero.grad * m3
    h = 1e-5
    with torch.no_grad():
        for i in range(shape[0]):
            assert float(delta[i].norm()) == pytest.approx(0.7, rel=1e-5)
            u = torch.zeros(shape, dtype=torch.float64)
            u[i] = delta[i] / 0.7
            fd = float(loss_at(h * u) - loss_at(-h * u)) / (2 * h)
            assert fd == pytest.approx(float(g[i].norm()), rel=1e-4)  # d/dh L(e + h·u_i) = ‖g_i‖
            for seed in range(3):
                v = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * m3
                w = torch.zeros(shape, dtype=torch.float64)
                w[i] = v[i] / v[i].norm()
                assert float(loss_at(h * w) - loss_at(-h * w)) / (2 * h) < fd


def test_fgm_gradient_accumulation_stays_exact():
    """micro-batches 2+2 with scale 1/4 give the gradient of one batch of 4 (per-example norms)."""
    b = batch(rows=4)
    whole, parts = classifier(dropout=0.0).train(), classifier(dropout=0.0).train()
    a = adv("fgm", epsilon=0.5)
    a.step(whole, b, 0.25, NULL)
    for rows in (slice(0, 2), slice(2, 4)):
        part = {k: v[rows] for k, v in b.items()}
        width = int(part["attention_mask"].sum(1).max())
        part = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in part.items()}
        a.step(parts, part, 0.25, NULL)
    gw, gp = grads(whole), grads(parts)
    assert all(torch.allclose(gw[k], gp[k], atol=1e-6, rtol=1e-4) for k in gw)


def test_fgm_under_bf16_autocast_keeps_delta_fp32_and_bounded():
    model = classifier().train()
    seen = {}

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    emb = model.get_input_embeddings()
    h = emb.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))  # returns None: output unchanged
    loss = adv("fgm", epsilon=0.3).step(model, batch(), 0.25, autocast)
    h.remove()
    assert seen["dtype"] == torch.float32
    assert math.isfinite(float(loss.metrics["adv_loss"]))
    assert float(loss.metrics["delta_norm"]) / 4 == pytest.approx(0.3, rel=1e-4)  # every example at radius ε


# ---------------------------------------------------------------------------------------------- regularisers


def test_symmetric_kl_and_kl_are_nonnegative_and_zero_on_equal_inputs():
    torch.manual_seed(0)
    for _ in range(20):
        a, b = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3
        assert float(sym_kl(a, b)) >= 0 and float(kl(a, b)) >= 0
        assert float(sym_kl(a, b)) == pytest.approx(float(kl(a, b) + kl(b, a)), rel=1e-5)
    assert float(sym_kl(a, a)) == 0.0 and float(kl(a, a)) == 0.0
    assert float(sym_kl(a, a + 1.0)) == pytest.approx(0.0, abs=1e-5)  # softmax is shift-invariant
    assert float(sym_kl(a[:, :1], b[:, :1], continuous=True)) == pytest.approx(float(((a[:, 0] - b[:, 0]) ** 2).sum()))


@pytest.mark.parametrize("method,small,large", [("smart", {"epsilon": 1e-7, "init_mag": 1e-8}, {"epsilon": 2.0}),
                                                ("r3f", {"epsilon": 1e-9}, {"epsilon": 0.5}),
                                                ("vat", {"epsilon": 1e-7, "init_mag": 1e-8}, {"epsilon": 2.0})])
def test_regularisers_are_nonnegative_and_vanish_with_the_noise(method, small, large):
    model = classifier(dropout=0.0).train()  # no dropout: only δ separates the two passes
    with torch.no_grad():  # a random tiny model is nearly flat: sharpen its head so δ shows
        model.classifier.weight.mul_(100)
    torch.manual_seed(0)
    tiny = float(adv(method, **small).step(model, batch(), 1.0, NULL).metrics["adv_loss"])
    big = float(adv(method, **large).step(model, batch(), 1.0, NULL).metrics["adv_loss"])
    assert 0 <= tiny < 1e-6
    assert big > 1e-5 and big > 100 * tiny


def test_r3f_on_language_modelling_compares_target_tokens_only():
    model = build_model("decoder", "test", VOCAB, task="lm", seed=0, pad_token_id=0, eos_token_id=1)
    ids = torch.randint(5, VOCAB, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt: no targets there
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss, rows = CausalLM().outputs(model, b)
    assert rows.shape == (int(loss.units), VOCAB) and int(loss.units) == 5 + 8  # targets: ids[0, 4:], ids[1, 1:]
    r = Adversarial(CausalLM(), AdversarialConfig(method="r3f", epsilon=1e-2), [0, 1]).step(model.train(), b, 1.0, NULL)
    assert float(r.metrics["adv_loss"]) >= 0 and r.units == loss.units


# ---------------------------------------------------------------------------------------------- NEFTune


def test_neftune_noise_covers_real_tokens_only_at_alpha_over_sqrt_length_dim():
    model = classifier().train()
    b = batch()
    a = adv("neftune", epsilon=5.0, perturb_special=True)
    seen = []
    original = a._loss
    a._loss = lambda m, bt, delta, ac: (seen.append(delta.clone()), original(m, bt, delta, ac))[1]  # type: ignore[method-assign]
    torch.manual_seed(0)
    a.step(model, b, 1.0, NULL)
    (noise,) = seen
    lengths = b["attention_mask"].sum(1).float()
    bound = 5.0 / torch.sqrt(lengths * 32)  # α/√(T_i·d) with T_i the real length
    assert float(noise[b["attention_mask"] == 0].abs().max()) == 0.0  # padding never moves
    for i in range(4):
        real = noise[i][b["attention_mask"][i].bool()]
        assert float(real.abs().max()) <= float(bound[i]) + 1e-6
        assert float(real.abs().max()) > 0.5 * float(bound[i])


# ---------------------------------------------------------------------------------------------- config, plae


def test_config_defaults_and_errors():
    r = AdversarialConfig(method="freelb").resolved()
    assert (r.steps, r.step_size, r.init_mag, r.epsilon) == (2, 0.1, 0.2, math.inf)
    assert AdversarialConfig(method="fgm").resolved().active
    assert not AdversarialConfig(method="pgd", steps=0).resolved().active
    with pytest.raises(ConfigError, match="does not apply to method r3f"):
        AdversarialConfig(method="r3f", steps=3).resolved()
    with pytest.raises(ConfigError, match="fgm takes one step"):
        AdversarialConfig(method="fgm", steps=3).resolved()
    with pytest.raises(ConfigError, match="must be >= 0"):
        AdversarialConfig(method="pgd", epsilon=-1.0).resolved()


def test_plae_lookup_places_stored_rows_on_real_positions():
    b = batch()
    real = b["attention_mask"].bool()
    deltas = {f"{i}/{c}": torch.full((int(real[i].sum()), 32), float(10 * i + c + 1), dtype=torch.float16)
              for i in range(4) for c in range(2)}
    torch.manual_seed(0)
    full = stored_lookup(deltas, 2)(b, torch.empty(4, 10, 32))
    assert float(full[~real].abs().max()) == 0.0
    for i in range(4):
        values = set(full[i][real[i]].unique().tolist())
        assert values <= {10 * i + 1.0, 10 * i + 2.0} and len(values) == 1  # one copy per example


def test_plae_student_step_adds_the_stored_perturbation():
    b = batch()
    real = b["attention_mask"].bool()
    deltas = {f"{i}/0": torch.randn(int(real[i].sum()), 32).half() * 0.1 for i in range(4)}
    a = Adversarial(Classify(), AdversarialConfig(method="plae"), SPECIAL, stored=stored_lookup(deltas, 1))
    model = classifier(dropout=0.0).train()
    loss = a.step(model, b, 0.25, NULL)
    with torch.no_grad():
        clean = float(Classify()(model, b).value)
    assert float(loss.value) == pytest.approx(clean, rel=1e-5)
    assert float(loss.metrics["adv_loss"]) != pytest.approx(clean, rel=1e-6)


# ---------------------------------------------------------------------------------------------- the registry


def test_the_config_lists_exactly_the_registered_methods():
    """`adversarial.method`'s Literal (config validation, did-you-mean, --help) names every registered method."""
    method_type = typing.get_type_hints(AdversarialConfig)["method"]
    assert typing.get_args(method_type) == ("none", *REGISTRY)


def test_a_new_method_is_one_class_and_one_registration():
    @register("toy", cost="1 pass")
    @dataclasses.dataclass(frozen=True)
    class Toy(Method):
        epsilon: float = 0.5

        def step(self, adv, model, batch, scale, autocast):
            mask = adv.mask(batch)
            delta = self.epsilon * mask.unsqueeze(-1).expand(adv._shape(model, batch))
            loss = adv._loss(model, batch, delta, autocast)
            (loss.value.float() * scale).backward()
            return adv._result(loss, loss.value, delta, mask, "linf")

    try:
        a = Adversarial(Classify(), AdversarialConfig(method="toy"), SPECIAL)
        assert a.cfg.epsilon == 0.5 and describe(a.cfg).startswith("adversarial: toy (epsilon=0.5; special")
        loss = a.step(classifier(dropout=0.0).train(), batch(), 1.0, NULL)
        assert float(loss.metrics["delta_norm"]) == pytest.approx(0.5 * float(loss.units))
        with pytest.raises(ConfigError, match="adversarial.steps does not apply to method toy"):
            AdversarialConfig(method="toy", steps=2).resolved()
    finally:
        del REGISTRY["toy"]
