"""Causal language modelling: next-token cross-entropy summed over target tokens.

For a batch of token ids x (B, T) and labels y (B, T) (y = x with -100 where nothing is to be
predicted), the model predicts y[:, 1:] from x[:, :-1]:

    loss = sum_{b,t : y[b,t+1] != -100} -log softmax(logits[b,t])[y[b,t+1]]

computed in fp32 even under bf16 autocast (a bf16 log-softmax over a large vocabulary loses
the small probabilities that the loss is made of).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from honelm.objectives.base import Loss, Objective

IGNORE = -100


def shifted_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and target count. logits (B, T, V), labels (B, T).

    The labels are shifted left (position t is scored against labels[t+1]; the last position gets
    -100) instead of slicing the logits: slicing would copy the whole (B, T-1, V) tensor.
    """
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    flat = logits.reshape(-1, logits.size(-1))  # (B*T, V), a view
    nll = F.cross_entropy(flat.float(), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return nll, (target != IGNORE).sum()


class CausalLM(Objective):
    """Next-token prediction on `input_ids`/`labels` (and optional `attention_mask`)."""

    default_metric = "val_loss"

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Loss:
        nll, count = shifted_token_nll(self._logits(model, batch), batch["labels"])
        return Loss(value=nll, units=count)

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        logits = self._logits(model, batch)
        nll, count = shifted_token_nll(logits, batch["labels"])
        target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # same shift as the loss
        return Loss(value=nll, units=count), logits[target != IGNORE].float()  # (units, V): target rows only

    @staticmethod
    def _logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")}
        # use_cache=False: training needs no KV cache, and with one (transformers creates it when the
        # config says use_cache) the mask builder ignores position_ids, so packed rows (position_ids
        # restarting per example, no attention_mask) would attend across examples.
        return model(**inputs, use_cache=False).logits  # (B, T, V)

    def units(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
