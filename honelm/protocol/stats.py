"""Statistics for `honelm ablate` and `honelm compare`: a paired bootstrap of a metric difference, and the verdict rule.

The paired bootstrap (Efron & Tibshirani 1993; for NLP, Koehn 2004 and Berg-Kirkpatrick et al.
2012) resamples the *evaluated examples* (validation examples in `ablate`, whose verdicts select;
test examples in `compare`, which reads recorded looks) with replacement, the same indices for the variant and the
baseline, and recomputes the metric difference on each resample; the 2.5th and 97.5th percentiles
of those differences form the 95% interval. With several seeds, each resample also draws the
seeds with replacement (seed k of the variant paired with seed k of the baseline: same seed, same
initial weights and data order), so the interval carries training noise as well as test-sample
noise; with one seed it is the classic per-example paired bootstrap.

Every metric here is a function of per-example counts, so a resample is a vector of
multinomial weights `w` (how often each example was drawn) and all resamples are evaluated at
once as matrix products: accuracy = w·correct / n, per-class tp/fp/fn = w·indicator, and so on.
`PER_UNIT` is the metric of a stage's score records (honelm.predictions): "gold" holds each
example's units (its target tokens, 1 for a pair) and "pred" its sum of the compared metric over
them, and the metric is w·sums / w·units, the stage's own mean over units (its validation loss:
the token-weighted mean of the examples' per-token losses).

Verdict: the interval entirely on the better side of zero → "helps"; entirely on the worse side
→ "hurts"; touching or containing zero → "no evidence" (not "no effect": too few examples or
seeds can hide a real one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

METRICS = ("accuracy", "macro_f1", "mse", "pearson")
"""Metrics of classification and regression predictions (gold labels and predictions)."""
PER_UNIT = "per_unit"
"""Σ sums / Σ units of score records (gold = units, pred = sums of one metric)."""
LOWER_IS_BETTER = {"mse", "loss"}
"""Metric names (a prediction metric, or a score record's) for which a smaller value is better."""


def resample_weights(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) counts: row b says how many times each example is in bootstrap sample b."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)


def metric_from_weights(metric: str, gold: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`metric` of `pred` against `gold` under each row of example weights; shape (n_resamples,).

    With a row of ones this is the plain metric (see `metric_value`).
    """
    total = weights.sum(axis=1)
    if metric == PER_UNIT:
        units = weights @ gold.astype(np.float64)
        return np.divide(weights @ pred.astype(np.float64), units, out=np.full_like(units, np.nan), where=units > 0)
    if metric == "accuracy":
        return weights @ (pred == gold).astype(np.float64) / total
    if metric == "mse":
        return weights @ ((pred.astype(np.float64) - gold.astype(np.float64)) ** 2) / total
    if metric == "macro_f1":
        # classes present in gold or predictions of the whole test set; a class absent from one
        # resample (tp+fp+fn = 0 there) is left out of that resample's mean, as macro_f1 does
        classes = np.union1d(np.unique(gold), np.unique(pred))
        f1 = np.zeros((weights.shape[0], len(classes)))
        present = np.zeros_like(f1, dtype=bool)
        for j, c in enumerate(classes):
            tp = weights @ ((pred == c) & (gold == c)).astype(np.float64)
            fp = weights @ ((pred == c) & (gold != c)).astype(np.float64)
            fn = weights @ ((pred != c) & (gold == c)).astype(np.float64)
            denom = 2 * tp + fp + fn
            present[:, j] = denom > 0
            f1[:, j] = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        return (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    if metric == "pearson":
        x, y = pred.astype(np.float64), gold.astype(np.float64)
        mx, my = weights @ x / total, weights @ y / total
        cov = weights @ (x * y) / total - mx * my
        vx, vy = weights @ (x * x) / total - mx**2, weights @ (y * y) / total - my**2
        denom = np.sqrt(np.clip(vx, 0, None) * np.clip(vy, 0, None))
        return np.divide(cov, denom, out=np.full_like(cov, np.nan), where=denom > 0)
    raise ValueError(f"unknown metric {metric!r} for the bootstrap ({', '.join((*METRICS, PER_UNIT))})")


def metric_value(metric: str, gold: np.ndarray, pred: np.ndarray) -> float:
    return float(metric_from_weights(metric, gold, pred, np.ones((1, len(gold))))[0])


@dataclass(frozen=True)
class Interval:
    """The observed difference (variant − baseline, mean over seeds) and its bootstrap interval."""

    diff: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    n_examples: int
    n_seeds: int


def paired_bootstrap(metric: str, gold: Sequence, variant: Sequence[Sequence], baseline: Sequence[Sequence],
                     n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Interval of mean_k metric(variant_k) − mean_k metric(baseline_k) over resampled examples
    (and, with several seeds, resampled seed pairs). `variant[k]` and `baseline[k]` are the
    predictions of seed k on the same examples as `gold`.
    """
    if len(variant) != len(baseline) or not variant:
        raise ValueError(f"paired bootstrap needs the same seeds on both sides (got {len(variant)} and {len(baseline)})")
    g = np.asarray(gold)
    va, ba = [np.asarray(p) for p in variant], [np.asarray(p) for p in baseline]
    if any(p.shape != g.shape for p in va + ba):
        raise ValueError("every prediction list must cover the same examples as gold (the same test examples, or the same "
                         "validation examples)")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    rng = np.random.default_rng(seed)
    n, k = len(g), len(va)
    diff = float(np.mean([metric_value(metric, g, a) for a in va]) - np.mean([metric_value(metric, g, b) for b in ba]))
    w = resample_weights(n, n_resamples, rng)
    per_seed = np.stack([metric_from_weights(metric, g, a, w) - metric_from_weights(metric, g, b, w)
                         for a, b in zip(va, ba)], axis=1)  # (n_resamples, k)
    if k > 1:
        picks = rng.integers(0, k, size=(n_resamples, k))
        draws = np.take_along_axis(per_seed, picks, axis=1).mean(axis=1)
    else:
        draws = per_seed[:, 0]
    draws = draws[np.isfinite(draws)]
    alpha = 1 - confidence
    low, high = (np.quantile(draws, [alpha / 2, 1 - alpha / 2]) if len(draws) else (math.nan, math.nan))
    return Interval(diff, float(low), float(high), confidence, n_resamples, n, k)


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """"helps" / "hurts" when the interval excludes zero on the better / worse side, else "no evidence"."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no evidence"
    if low > 0:
        return "helps" if higher_is_better else "hurts"
    if high < 0:
        return "hurts" if higher_is_better else "helps"
    return "no evidence"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value: one seed shows no spread)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(arr):
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
