"""The ablation's statistics: paired bootstrap on hand-checked cases, weighted metrics, the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from honelm import metrics as M
from honelm.protocol import stats


def test_two_examples_one_seed_interval_is_the_enumerated_distribution():
    # gold [1, 1]; baseline right on neither, variant right on the second only: per-example
    # differences d = [0, 1]. A bootstrap sample of 2 draws {both first} (p 1/4, mean 0),
    # {one of each} (p 1/2, mean 0.5), {both second} (p 1/4, mean 1): the 2.5% and 97.5%
    # percentiles are therefore 0 and 1, and the observed difference is 0.5.
    ci = stats.paired_bootstrap("accuracy", [1, 1], [[0, 1]], [[0, 0]], n_resamples=4000, seed=1)
    assert ci.diff == 0.5
    assert ci.low == 0.0 and ci.high == 1.0
    assert (ci.n_examples, ci.n_seeds) == (2, 1)


def test_a_constant_difference_has_a_degenerate_interval():
    # every example differs by the same amount, so every resample gives the same difference
    gold = [0, 1, 0, 1, 1]
    variant, baseline = [gold], [[1 - g for g in gold]]  # right everywhere vs wrong everywhere
    ci = stats.paired_bootstrap("accuracy", gold, variant, baseline, n_resamples=500)
    assert (ci.diff, ci.low, ci.high) == (1.0, 1.0, 1.0)
    assert stats.verdict(ci.low, ci.high) == "helps"


def test_pairing_shrinks_the_interval_compared_with_unpaired_noise():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 400)
    baseline = np.where(rng.random(400) < 0.7, gold, 1 - gold)
    variant = baseline.copy()
    flip = np.flatnonzero(variant != gold)[:20]  # the variant fixes 20 of the baseline's errors, breaks none
    variant[flip] = gold[flip]
    ci = stats.paired_bootstrap("accuracy", gold, [variant], [baseline], n_resamples=2000)
    assert ci.diff == pytest.approx(20 / 400)
    assert ci.low > 0  # paired: only the 20 changed examples vary, so 0 is far outside
    assert ci.high - ci.low < 0.06


def test_seeds_are_resampled_in_pairs():
    gold = [1, 1, 1, 1]
    # seed 0: the variant gains 2 examples; seed 1: it loses 2 → mean difference 0, and the
    # seed draw makes the interval span both signs
    variant = [[1, 1, 1, 1], [0, 0, 1, 1]]
    baseline = [[0, 0, 1, 1], [1, 1, 1, 1]]
    ci = stats.paired_bootstrap("accuracy", gold, variant, baseline, n_resamples=2000)
    assert ci.diff == 0.0 and ci.n_seeds == 2
    assert ci.low < -0.25 and ci.high > 0.25  # the seed-to-seed swing is in the interval
    # seed 0 alone gains on examples 1-2 only: its interval still includes 0 with 4 examples
    alone = stats.paired_bootstrap("accuracy", gold, variant[:1], baseline[:1], n_resamples=2000)
    assert alone.diff == 0.5 and alone.low == 0.0
    assert stats.verdict(ci.low, ci.high) == "no evidence"


def test_mismatched_inputs_fail_loudly():
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_bootstrap("accuracy", [1, 0], [[1, 0]], [[1, 0], [0, 0]])
    with pytest.raises(ValueError, match="same test examples"):
        stats.paired_bootstrap("accuracy", [1, 0], [[1, 0, 1]], [[1, 0]])
    with pytest.raises(ValueError, match="unknown metric"):
        stats.metric_value("bleu", np.array([1]), np.array([1]))


@pytest.mark.parametrize("higher, low, high, expected", [
    (True, 0.01, 0.05, "helps"), (True, -0.05, -0.01, "hurts"), (True, -0.01, 0.02, "no evidence"),
    (True, 0.0, 0.03, "no evidence"),  # touching zero is not evidence
    (False, -0.3, -0.1, "helps"), (False, 0.1, 0.3, "hurts"),  # mse: lower is better
    (True, math.nan, 0.1, "no evidence"),
])
def test_verdict_rules(higher, low, high, expected):
    assert stats.verdict(low, high, higher) == expected


def test_weighted_metrics_equal_the_plain_metrics_and_respect_duplicates():
    rng = np.random.default_rng(3)
    gold, pred = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    g, p = torch.tensor(gold), torch.tensor(pred)
    assert stats.metric_value("accuracy", gold, pred) == pytest.approx(M.accuracy(p, g))
    assert stats.metric_value("macro_f1", gold, pred) == pytest.approx(M.macro_f1(p, g, [0, 1, 2]))
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert stats.metric_value("mse", y, x) == pytest.approx(M.mse(torch.tensor(x), torch.tensor(y)))
    assert stats.metric_value("pearson", y, x) == pytest.approx(M.pearson(torch.tensor(x), torch.tensor(y)))
    # weight 2 on an example = that example twice
    w = np.ones((1, 50))
    w[0, :10] = 2
    twice = np.concatenate([np.arange(50), np.arange(10)])
    assert stats.metric_from_weights("macro_f1", gold, pred, w)[0] == pytest.approx(
        stats.metric_value("macro_f1", gold[twice], pred[twice]))


def test_mean_std_uses_the_sample_deviation_and_one_seed_has_none():
    assert stats.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    mean, std = stats.mean_std([0.5])
    assert mean == 0.5 and math.isnan(std)
