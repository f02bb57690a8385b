"""Evaluation metrics computed from predictions: accuracy, macro-F1, MSE, Pearson.

Hand-written because each is a few lines and a scikit-learn dependency would cost more than it
saves; tests check them against hand-worked numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def accuracy(pred: torch.Tensor, gold: torch.Tensor) -> float:
    return float((pred == gold).float().mean()) if gold.numel() else float("nan")


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, labels: Sequence[int]) -> float:
    """Unweighted mean over `labels` of per-class F1; a class never predicted nor present scores 0
    only if it is present in gold or predictions (absent-everywhere classes are left out)."""
    scores = []
    for c in labels:
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


def micro_f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    """For single-label multi-class data micro-F1 equals accuracy; named for papers that report it."""
    return accuracy(pred, gold)


def mse(pred: torch.Tensor, gold: torch.Tensor) -> float:
    return float(((pred.float() - gold.float()) ** 2).mean())


def pearson(pred: torch.Tensor, gold: torch.Tensor) -> float:
    x, y = pred.double(), gold.double()
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else float("nan")
