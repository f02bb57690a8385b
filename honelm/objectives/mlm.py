"""Masked language modelling: cross-entropy summed over the masked (selected) positions.

For token ids x (B, T) after masking and labels y (B, T) (the original id at the positions
`honelm.data.masking.mask_tokens` selected, -100 elsewhere):

    loss = sum_{b,t : y[b,t] != -100} -log softmax(logits[b,t])[y[b,t]]
    units = #{(b,t) : y[b,t] != -100}

so the loop's division by the step's unit count gives the exact per-masked-token mean however
the step is cut into micro-batches. Only the selected rows of the logits are cast to fp32 (a
bf16 log-softmax over a large vocabulary loses the small probabilities the loss is made of;
casting all (B, T, V) would waste memory on the 85% of positions that carry no loss).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from honelm.objectives.base import Loss, Objective

IGNORE = -100
MODEL_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids")


def masked_token_nll(logits: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed NLL, masked count, correct predictions, fp32 logit rows (M, V)) over labels != -100.

    logits (B, T, V), labels (B, T).
    """
    selected = labels != IGNORE  # (B, T)
    picked = logits[selected].float()  # (M, V)
    target = labels[selected]  # (M,)
    nll = F.cross_entropy(picked, target, reduction="sum")
    correct = (picked.argmax(-1) == target).sum().detach().float()
    return nll, selected.sum(), correct, picked


class MaskedLM(Objective):
    """Predict the original tokens at masked positions; `accuracy` counts exact recoveries."""

    default_metric = "val_loss"

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k in MODEL_KEYS}  # labels stay out: the loss is ours
        logits = model(**inputs).logits  # (B, T, V)
        nll, count, correct, rows = masked_token_nll(logits, batch["labels"])
        return Loss(value=nll, units=count, metrics={"accuracy": correct}), rows

    def units(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE).sum())
