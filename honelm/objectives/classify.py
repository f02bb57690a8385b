"""Sequence classification and regression heads: summed cross-entropy or squared error.

Classification: loss = sum_i -log softmax(logits_i)[y_i]; metrics count correct predictions.
Regression (one output): loss = sum_i (f(x_i) - y_i)^2, the sum of squared errors, so the
logged mean is the MSE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from honelm.data.batches import EncodedExamples
from honelm.objectives.base import Loss, Objective

MODEL_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids")


class Classify(Objective):
    """Cross-entropy over labels (int64) or squared error for regression (float)."""

    def __init__(self, regression: bool = False):
        self.regression = regression
        self.default_metric = "val_mse" if regression else "val_accuracy"
        self.continuous = regression  # outputs are real values, not logits

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}).logits.float()  # (B, C)

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        logits = self.logits(model, batch)
        labels = batch["labels"]
        if self.regression:
            pred = logits.squeeze(-1)
            loss = F.mse_loss(pred, labels.float(), reduction="sum")
            return Loss(value=loss, units=labels.numel()), logits
        loss = F.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum().detach().float()
        return Loss(value=loss, units=labels.numel(), metrics={"accuracy": correct}), logits

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].numel())


def predict(model: nn.Module, data: EncodedExamples, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits (N, C) in the order of `data`, computed in length-sorted batches."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    out: list[torch.Tensor] = [torch.empty(0)] * len(data)
    objective = Classify()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in data.collate(idx).items()}
        logits = objective.logits(model, batch).cpu()
        for row, i in enumerate(idx):
            out[i] = logits[row]
    return torch.stack(out) if out else torch.empty(0, 1)
