"""Objectives against hand-worked numbers, and the learning-rate schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from honelm import metrics as M
from honelm.boosters.lora import LoraConfig, lr_scale
from honelm.objectives.classify import Classify
from honelm.objectives.lm import CausalLM, shifted_token_nll
from honelm.optim import lr_at, param_groups, set_lr


class FixedLogits(torch.nn.Module):
    """Returns given logits whatever the input, so the loss can be worked by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, **kwargs):
        return SimpleNamespace(logits=self.logits)


def test_cross_entropy_of_probability_0_9_is_0_105():
    # vocabulary of 2; the model gives the right next token probability 0.9 at every position
    p = torch.tensor([0.9, 0.1])
    logits = torch.log(p).expand(1, 3, 2).clone()  # (B=1, T=3, V=2)
    labels = torch.tensor([[0, 0, 0]])  # targets are positions 1..2 → token 0 with p=0.9
    nll, count = shifted_token_nll(logits, labels)
    assert int(count) == 2
    assert float(nll) / 2 == pytest.approx(-math.log(0.9), abs=1e-6)
    assert -math.log(0.9) == pytest.approx(0.105, abs=5e-4)


def test_lm_loss_ignores_masked_targets():
    logits = torch.zeros(1, 4, 4)  # uniform over 4 tokens → -ln(1/4) per target
    labels = torch.tensor([[1, 2, -100, 3]])
    loss = CausalLM()(FixedLogits(logits), {"input_ids": labels.clamp(min=0), "labels": labels})
    assert int(loss.units) == 2 and float(loss.value) == pytest.approx(2 * math.log(4), abs=1e-6)
    assert CausalLM().units({"labels": labels}) == 2


def test_classify_loss_and_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    loss = Classify()(FixedLogits(logits), {"input_ids": torch.zeros(3, 1, dtype=torch.long), "labels": labels})
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1)) + math.log(1 + math.exp(-3)))
    assert float(loss.value) == pytest.approx(expected, abs=1e-5)
    assert float(loss.metrics["accuracy"]) == 2.0 and loss.units == 3


def test_regression_loss_is_sum_of_squares():
    logits = torch.tensor([[1.0], [2.0]])
    labels = torch.tensor([0.5, 4.0])
    loss = Classify(regression=True)(FixedLogits(logits), {"input_ids": torch.zeros(2, 1, dtype=torch.long), "labels": labels})
    assert float(loss.value) == pytest.approx(0.25 + 4.0)


def test_metrics_by_hand():
    pred, gold = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    assert M.accuracy(pred, gold) == 0.75
    # class 0: tp1 fp1 fn0 → 2/3; class 1: tp1 fp0 fn1 → 2/3; class 2: 1 → macro (2/3+2/3+1)/3
    assert M.macro_f1(pred, gold, [0, 1, 2]) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert M.pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert M.mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])) == 5.0


def test_schedule_warmup_cosine_linear():
    kw = dict(peak=1.0, total=11, warmup=1, min_ratio=0.1)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.5)  # warmup: (0+1)/(1+1)
    assert lr_at(1, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.1)  # reaches the floor on the last step
    assert lr_at(10, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_at(6, schedule="linear", **kw) == pytest.approx(1.0 - 0.9 * 5 / 9)
    assert lr_at(5, schedule="constant", **kw) == 1.0


def test_no_decay_on_bias_norm_and_embeddings(tiny_llama):
    model = tiny_llama()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" not in names[id(p)] and "embed" not in names[id(p)] for p in decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    decay_e, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert any("embed" in names[id(p)] for p in decay_e["params"])


def test_lr_scale_splits_groups_and_set_lr_applies_it(tiny_llama):
    """LoRA+'s multiplier: the B matrices' groups run at ratio × the schedule's lr, the rest at it."""

    model = tiny_llama()
    assert lr_scale(LoraConfig(enabled=True)) is None  # ratio 1: plain LoRA, no extra groups
    scale = lr_scale(LoraConfig(enabled=True, lr_ratio=16.0))
    assert scale is not None and scale("base_model.model.x.q_proj.lora_B.default.weight") == 16.0
    assert scale("base_model.model.x.q_proj.lora_A.default.weight") == 1.0
    ratios = {n: 16.0 if "mlp" in n else 1.0 for n, _ in model.named_parameters()}
    groups = param_groups(model, 0.1, lr_scale=ratios.__getitem__)
    assert sorted((g["weight_decay"], g["lr_scale"]) for g in groups) == [(0.0, 1.0), (0.1, 1.0), (0.1, 16.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(("mlp" in names[id(p)]) == (g["lr_scale"] == 16.0) for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 0.5)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.5, 0.5, 8.0]


def _lm_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _loss_and_grads(model, batch, fused: bool, monkeypatch, autocast: bool, embeds: bool = False):
    import contextlib

    from honelm.objectives import lm

    with monkeypatch.context() as m:
        if not fused:
            m.setattr(lm, "final_hidden", lambda model, inputs: None)
        model.zero_grad()
        batch = dict(batch)
        if embeds:  # how the adversarial wrapper calls it: embeddings that carry a gradient
            emb = model.get_input_embeddings()(batch.pop("input_ids")).detach().requires_grad_()
            batch["inputs_embeds"] = emb
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = CausalLM()(model, batch)
        (loss.value * 0.37).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if embeds:
            grads["inputs_embeds"] = emb.grad.clone()
        return loss.value.detach(), int(loss.units), grads


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_loss_equals_the_full_logits_loss_with_gradients(tiny_llama, monkeypatch, autocast, tied):
    from honelm.objectives import logprobs as L

    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 64 * 5)  # 5 rows per chunk: several chunks and a ragged last one
    model = tiny_llama()
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    assert L.plain_head(model) is not None
    batch = _lm_batch()
    fast, units, g_fast = _loss_and_grads(model, batch, True, monkeypatch, autocast)
    slow, units_slow, g_slow = _loss_and_grads(model, batch, False, monkeypatch, autocast)
    assert units == units_slow == 5 + 8 + 5  # last positions, the prompt and the padding score nothing
    assert fast.dtype == torch.float32
    assert g_fast.keys() == g_slow.keys() and ("lm_head.weight" in g_fast) == (not tied)
    if autocast:  # bf16 matmuls in a different blocking: equal up to bf16 rounding (2^-8 relative)
        assert torch.allclose(fast, slow, rtol=2e-3)
        for name in g_fast:
            assert (g_fast[name] - g_slow[name]).norm() <= 1e-2 * g_slow[name].norm(), name
    else:
        assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)
        for name in g_fast:
            assert torch.allclose(g_fast[name], g_slow[name], rtol=1e-5, atol=1e-6), name
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is back in place


def test_fused_head_loss_through_inputs_embeds_under_lora_and_without_gradients(tiny_llama, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in model.named_parameters():  # non-zero B, so the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = _lm_batch()
    fast, _, g_fast = _loss_and_grads(model, batch, True, monkeypatch, False, embeds=True)
    slow, _, g_slow = _loss_and_grads(model, batch, False, monkeypatch, False, embeds=True)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)
    assert "inputs_embeds" in g_fast and all("lora_" in n for n in g_fast if n != "inputs_embeds")
    for name in g_slow:
        assert torch.allclose(g_fast[name], g_slow[name], rtol=1e-5, atol=1e-6), name
    with torch.no_grad():  # evaluation: the loss alone, no gradient work
        assert torch.allclose(CausalLM()(model, batch).value, slow, rtol=1e-5, atol=1e-6)
