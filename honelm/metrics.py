"""Evaluation metrics computed from predictions: accuracy, macro-F1, MSE, Pearson; for classifier
probabilities, the confusion matrix and calibration (reliability bins, ECE); for generated text,
exact match and token F1 (SQuAD-style answer normalisation), chrF and BLEU.

Hand-written because each is a few lines and a scikit-learn dependency would cost more than it
saves; tests check them against hand-worked numbers. chrF and BLEU come from sacrebleu, whose
tokenisation and smoothing are the reference ones (a home-made BLEU is not comparable to papers).
"""

from __future__ import annotations

import bisect
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import sacrebleu
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


def classification_scores(logits: torch.Tensor, labels: torch.Tensor, regression: bool, n_labels: int,
                          prefix: str) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of logits (N, C) against label ids; loss (the MSE), MSE and Pearson for regression."""
    if regression:
        pred = logits.squeeze(-1)
        return {f"{prefix}_loss": mse(pred, labels), f"{prefix}_mse": mse(pred, labels),
                f"{prefix}_pearson": pearson(pred, labels)}
    pred = logits.argmax(-1)
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    return {f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy(pred, labels),
            f"{prefix}_macro_f1": macro_f1(pred, labels, list(range(n_labels)))}


# ----------------------------------------------------------------------------------------------
# classifier probabilities: confusion and calibration
#
# These take plain Python sequences rather than tensors: their caller is the report, which reads
# them from a predictions file.

CALIBRATION_BINS = 10


def confusion_matrix(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> list[list[int]]:
    """counts[g][p] = number of examples with gold label g predicted as p (rows gold, columns predicted)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    counts = [[0] * n_labels for _ in range(n_labels)]
    for g, p in zip(gold, pred):
        if not (0 <= g < n_labels and 0 <= p < n_labels):
            raise ValueError(f"label id out of range 0..{n_labels - 1}: gold={g}, pred={p}")
        counts[g][p] += 1
    return counts


@dataclass(frozen=True)
class CalibrationBin:
    """One confidence bin (lower, upper]: how many examples fell in it, their accuracy and mean confidence."""

    lower: float
    upper: float
    count: int
    accuracy: float | None  # None for an empty bin
    confidence: float | None


def calibration_bins(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = CALIBRATION_BINS
                     ) -> list[CalibrationBin]:
    """Equal-width bins (0, 1/n], (1/n, 2/n], …, ((n-1)/n, 1] of the confidence (the max probability).

    Bins are closed on the right so that confidence 1.0 falls in the last bin; a confidence of
    exactly 0 (impossible for a softmax) is put in the first. The upper edges are computed as
    (b+1)/n, so a confidence of exactly 0.3 lands in (0.2, 0.3], not in (0.3, 0.4] as
    ceil(0.3 * 10) = 4 would put it.
    """
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences but {len(correct)} correctness flags")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    uppers = [(b + 1) / n_bins for b in range(n_bins)]
    members: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for c, ok in zip(confidence, correct):
        if not 0.0 <= c <= 1.0 + 1e-6:  # rounded probabilities may overshoot 1 by a hair
            raise ValueError(f"confidence {c} is outside [0, 1]")
        members[min(bisect.bisect_left(uppers, c), n_bins - 1)].append((c, bool(ok)))
    out = []
    for b, rows in enumerate(members):
        n = len(rows)
        out.append(CalibrationBin(b / n_bins, uppers[b], n, sum(ok for _, ok in rows) / n if n else None,
                                  sum(c for c, _ in rows) / n if n else None))
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool],
                               n_bins: int = CALIBRATION_BINS) -> float:
    """ECE = Σ_b (n_b / N) · |acc_b − conf_b| over `calibration_bins` (Guo et al. 2017); NaN with no examples."""
    total = len(confidence)
    if total == 0:
        return float("nan")
    return sum(b.count / total * abs(b.accuracy - b.confidence)  # type: ignore[operator]
               for b in calibration_bins(confidence, correct, n_bins) if b.count)


# ----------------------------------------------------------------------------------------------
# generated text against a reference answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the multiset overlap of normalised words (SQuAD): 2PR / (P + R).

    Two empty answers agree (1.0); one empty answer against a non-empty one scores 0.0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams, exp smoothing), 0-100."""
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def reference_scores(predictions: Sequence[str], references: Sequence[str], prefix: str) -> dict[str, float]:
    """Mean exact match and token F1, corpus chrF and BLEU of generations against one reference each."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {}
    n = len(predictions)
    return {f"{prefix}_exact_match": sum(map(exact_match, predictions, references)) / n,
            f"{prefix}_token_f1": sum(map(token_f1, predictions, references)) / n,
            f"{prefix}_chrf": chrf(predictions, references),
            f"{prefix}_bleu": bleu(predictions, references)}


def one_class_warning(logits: torch.Tensor, labels: torch.Tensor, id2label: dict[int, str] | None) -> str | None:
    """The warning for a validation on which every example is predicted as one class while the gold labels hold
    several, else None. Early in a run that can be a model that has not started to learn; for good, it is a collapse
    to a constant answer (its accuracy is that class's share), which a learning rate too high for the model causes,
    LoRA's above all (MiniLM on ChemProt: the [CLS] state became the same for every input; docs/lora.md). A run can
    sit there for its whole budget while its loss looks plausible."""
    if logits.ndim != 2 or logits.size(1) < 2 or logits.size(0) < 2 or labels.unique().numel() < 2:  # (N, 1): MSE
        return None
    predicted = logits.argmax(-1)
    if predicted.unique().numel() != 1:
        return None
    k = int(predicted[0])
    share = float((labels == k).float().mean())
    name = id2label.get(k, str(k)) if id2label else str(k)
    return (f"warning: two validations in a row predicted one class, {name!r}, for all {len(predicted)} examples "
            f"(accuracy {share:.3f}, that class's share). Either the model has not started to learn yet (a low "
            "learning rate, a long warm-up) or it has collapsed to a constant answer, which a learning rate too high "
            "for the model causes, LoRA's above all. If it stays so: lower train.lr or lengthen train.warmup_ratio "
            "(docs/lora.md, \"One class for every input\")")


class OneClassWatch:
    """`one_class_warning` over a run's successive validations: `say` it when the second in a row predicts one
    class only (the first may be a model that has not started to learn), then nothing until a validation tells
    classes apart again."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say, self.streak = say, 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, id2label: dict[int, str] | None) -> None:
        warning = one_class_warning(logits, labels, id2label)
        self.streak = self.streak + 1 if warning else 0
        if warning and self.streak == 2:
            self.say(warning)
