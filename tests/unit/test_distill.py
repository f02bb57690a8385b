"""Knowledge distillation pieces: the KD loss against numbers worked by hand, the transfer set and its leak guard,
the teacher's label columns."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from honelm.data.adapt_corpus import sha
from honelm.data.readers import Example
from honelm.data.transfer import AugmentConfig, augment_text, augmented, build_transfer_set, with_placeholder_labels
from honelm.errors import ConfigError, HonelmError
from honelm.objectives.distill import Distill, kd_terms, logit_mse, soft_kl
from honelm.teacher import column_order


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are the batch's `fixed` rows (so the loss can be checked by hand)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None, **_):
        return type("Out", (), {"logits": self.logits})()


def test_kd_loss_matches_a_hand_computation():
    # student logits (1, 0), teacher (0, 1), T = 2, alpha = 0.25, gold class 0:
    # p = softmax((0, .5)), q = softmax((.5, 0)); KL(p||q) = (p1 - p0) * 0.5 = tanh(.25) / 2; times T^2 = 4
    kd = 2 * math.tanh(0.25)                       # 0.48980...
    ce = math.log(1 + math.exp(-1))                # -log softmax((1, 0))[0] = 0.31326...
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert soft_kl(student, teacher, 2.0).item() == pytest.approx(kd, rel=1e-6)
    labels, has = torch.tensor([0]), torch.tensor([True])
    total, gold, soft = kd_terms(student, teacher, labels, has, 0.25, 2.0, "kl", regression=False)
    assert total.item() == pytest.approx(0.25 * ce + 0.75 * kd, rel=1e-6)
    assert gold.item() == pytest.approx(ce, rel=1e-6) and soft.item() == pytest.approx(kd, rel=1e-6)
    # no gold label: the KD term alone, still weighted (1 - alpha)
    total, gold, _ = kd_terms(student, teacher, labels, torch.tensor([False]), 0.25, 2.0, "kl", regression=False)
    assert gold.item() == 0.0 and total.item() == pytest.approx(0.75 * kd, rel=1e-6)
    # mse: squared distance of the logits, (1-0)^2 + (0-1)^2
    assert logit_mse(student, teacher).item() == 2.0
    total, _, _ = kd_terms(student, teacher, labels, has, 0.0, 2.0, "mse", regression=False)
    assert total.item() == 2.0


def test_temperature_one_is_plain_kl_and_t_squared_scales_it():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    reference = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
    assert torch.allclose(soft_kl(s, t, 1.0), reference, atol=1e-6)
    T = 3.0
    scaled = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="none", log_target=True).sum(-1)
    assert torch.allclose(soft_kl(s, t, T), T * T * scaled, atol=1e-6)
    assert torch.all(soft_kl(t, t, T).abs() < 1e-6)  # a student equal to the teacher pays nothing


def test_regression_kd_is_the_squared_error_to_the_teacher():
    s, t, y = torch.tensor([[2.0], [0.5]]), torch.tensor([[1.0], [0.0]]), torch.tensor([4.0, 1.0])
    total, gold, kd = kd_terms(s, t, y, torch.tensor([True, False]), 0.5, 1.0, "kl", regression=True)
    assert kd.tolist() == [1.0, 0.25] and gold.tolist() == [4.0, 0.0]
    assert total.tolist() == [2.5, 0.125]


def test_objective_sums_over_the_batch_and_counts_agreement():
    model = FixedLogits(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0]), "has_label": torch.tensor([True, True, False]),
             "teacher": torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])}
    loss = Distill(alpha=0.5, temperature=2.0)(model, batch)
    expected, _, _ = kd_terms(model.logits, batch["teacher"], batch["labels"], batch["has_label"], 0.5, 2.0, "kl", False)
    assert loss.value.item() == pytest.approx(expected.sum().item()) and loss.units == 3
    assert loss.metrics["agreement"].item() == 2.0
    loss.value.backward()
    assert model.logits.grad is not None and model.logits.grad.abs().sum() > 0


def _ex(text: str, label: str | None = "a", pair: str | None = None) -> Example:
    return Example(text, pair, label, "f.jsonl", 1)


def test_augmentation_repeats_for_a_seed_and_does_what_it_says():
    cfg = AugmentConfig(copies=4, p_mask=0.5, p_swap=0.0, p_ngram=0.0)
    train = [_ex("one two three four five six"), _ex("seven eight nine")]
    a, b = augmented(train, cfg, seed=3, mask="[MASK]"), augmented(train, cfg, seed=3, mask="[MASK]")
    assert [r.text for r in a] == [r.text for r in b] and len(a) == 8
    assert all(r.label is None for r in a)
    assert any("[MASK]" in r.text for r in a)
    for r in a:  # masking keeps every other word in place
        original = train[0].text if len(r.text.split()) == 6 else train[1].text
        assert all(w == "[MASK]" or w == o for w, o in zip(r.text.split(), original.split()))
    ngram = augment_text("a b c d e f g h", random.Random(0), AugmentConfig(p_mask=0, p_swap=0, p_ngram=1.0,
                                                                              max_ngram=3), [], "[MASK]", ngram=True)
    assert 1 <= len(ngram.split()) <= 3 and ngram in "a b c d e f g h"
    swapped = augment_text("x y z", random.Random(0), AugmentConfig(p_mask=0, p_swap=1.0, p_ngram=0),
                           ["q"], "[MASK]", ngram=True)
    assert swapped == "q q q"


def test_augment_config_refuses_bad_probabilities():
    with pytest.raises(ConfigError, match="p_mask"):
        AugmentConfig(p_mask=1.5).validate()
    with pytest.raises(ConfigError, match="at most 1"):
        AugmentConfig(p_mask=0.6, p_swap=0.6).validate()


class FakeSplits:
    def __init__(self, train, val, test_hashes):
        self.train, self.val = train, val
        self.manifest = {"example_hashes": {"val": [], "test": test_hashes}}


def test_transfer_set_leak_guard_and_repeats_are_counted():
    train = [_ex("good film"), _ex("bad film", "b")]
    val = [_ex("held out text")]
    splits = FakeSplits(train, val, [sha("secret test text")])
    unlabelled = [_ex("held out text", None), _ex("secret test text", None), _ex("good film", None),
                  _ex("new text", None), _ex("new text", None)]
    lines: list[str] = []
    out = build_transfer_set(splits, unlabelled, AugmentConfig(), 0, "[MASK]", lines.append)
    assert [r.text for r in out.rows] == ["good film", "bad film", "new text"]
    assert out.n_labelled == 2
    assert out.record["unlabelled"] == {"candidates": 5, "kept": 1, "excluded_as_task_val_test": 2,
                                        "repeats_dropped": 2}
    assert any("leak guard" in line for line in lines)
    filled, has = with_placeholder_labels(out.rows, "a")
    assert has.tolist() == [True, True, False] and filled[2].label == "a" and filled[1].label == "b"


def test_teacher_columns_match_labels_by_name():
    say: list[str] = []
    assert column_order({0: "pos", 1: "neg"}, {0: "neg", 1: "pos"}, say.append) == [1, 0]
    assert column_order({0: "LABEL_0", 1: "LABEL_1"}, {0: "neg", 1: "pos"}, say.append) == [0, 1]
    assert "by position" in say[0]
    with pytest.raises(HonelmError, match="do not match"):
        column_order({0: "pos", 1: "other"}, {0: "neg", 1: "pos"}, say.append)
    with pytest.raises(HonelmError, match="do not match"):
        column_order({0: "a", 1: "b", 2: "c"}, {0: "a", 1: "b"}, say.append)


def test_teacher_logits_in_parts_equal_one_pass():
    from transformers import BertConfig, BertForSequenceClassification

    from honelm.data.batches import EncodedExamples
    from honelm.objectives.classify import predict
    from honelm.teacher import _predict_in_parts

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 50, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(25)]
    enc = EncodedExamples(ids, None, torch.zeros(25, dtype=torch.long), 0, 0)
    lines: list[str] = []
    with torch.no_grad():
        whole = predict(model, enc, 4, torch.device("cpu"))
        parts = _predict_in_parts(model, enc, 4, torch.device("cpu"), lines.append, part=7)
    assert torch.allclose(whole, parts, atol=1e-6) and len(lines) == 4 and "25 of 25" in lines[-1]
