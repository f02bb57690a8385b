"""Causal language modelling: next-token cross-entropy summed over target tokens.

For a batch of token ids x (B, T) and labels y (B, T) (y = x with -100 where nothing is to be
predicted), the model predicts y[:, 1:] from x[:, :-1]:

    loss = sum_{b,t : y[b,t+1] != -100} -log softmax(logits[b,t])[y[b,t+1]]

computed in fp32 even under bf16 autocast (a bf16 log-softmax over a large vocabulary loses
the small probabilities that the loss is made of).

When the model's output layer is a plain bias-free Linear (Llama, Qwen, Mistral, GPT-2 and the
like, LoRA on the trunk included), the training loss never builds the (B, T, V) logits: the model
runs with its head switched off, the target positions' final hidden states go through
`honelm.objectives.logprobs.HeadNLLSum` (a chunked, fused linear cross-entropy that forms the
gradient while each chunk's logits exist), and positions without a target (padding, prompts,
each row's last token) never reach the vocabulary projection. Same loss and gradients as the
plain path up to float rounding (tested); less memory and time (docs/benchmarks.md).
`outputs()` (the regularisers that compare output distributions) keeps the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from honelm.objectives.base import Loss, Objective
from honelm.objectives.logprobs import final_hidden, head_nll_sum

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
        found = final_hidden(model, self._inputs(batch))
        if found is None:  # a head that is not a plain Linear: full logits
            nll, count = shifted_token_nll(self._logits(model, batch), batch["labels"])
            return Loss(value=nll, units=count)
        hidden, head, dtype = found
        target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # (B, T): the same shift as shifted_token_nll
        mask = target != IGNORE
        return Loss(value=head_nll_sum(hidden[mask], head.weight, target[mask], dtype), units=mask.sum())

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        logits = self._logits(model, batch)
        nll, count = shifted_token_nll(logits, batch["labels"])
        target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # same shift as the loss
        return Loss(value=nll, units=count), logits[target != IGNORE].float()  # (units, V): target rows only

    @staticmethod
    def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")}
        # use_cache=False: training needs no KV cache, and with one (transformers creates it when the
        # config says use_cache) the mask builder ignores position_ids, so packed rows (position_ids
        # restarting per example, no attention_mask) would attend across examples.
        return {**inputs, "use_cache": False}

    @classmethod
    def _logits(cls, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(**cls._inputs(batch)).logits  # (B, T, V)

    def units(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
