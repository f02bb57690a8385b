"""Objectives against hand-worked numbers, and the learning-rate schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from honelm import metrics as M
from honelm.objectives.classify import Classify
from honelm.objectives.lm import CausalLM, shifted_token_nll
from honelm.optim import lr_at, param_groups


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
