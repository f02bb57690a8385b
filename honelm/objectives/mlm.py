"""Masked language modelling: cross-entropy summed over the masked (selected) positions.

For token ids x (B, T) after masking and labels y (B, T) (the original id at the positions
`honelm.data.masking.mask_tokens` selected, -100 elsewhere):

    loss = sum_{b,t : y[b,t] != -100} -log softmax(logits[b,t])[y[b,t]]
    units = #{(b,t) : y[b,t] != -100}

so the loop's division by the step's unit count gives the exact per-masked-token mean however
the step is cut into micro-batches. Only the selected rows of the logits are cast to fp32 (a
bf16 log-softmax over a large vocabulary loses the small probabilities the loss is made of;
casting all (B, T, V) would waste memory on the 85% of positions that carry no loss).

For the masked-LM classes whose head is one position-wise module (`MLM_HEADS`: BERT's `cls`,
RoBERTa's `lm_head` and their relatives) the model runs with that head switched off, and the head
is applied to the selected positions' hidden states only: the vocabulary projection, which is
about half of a small encoder's FLOPs (MiniLM: d = 384, V = 30,522), runs on 15% of the positions
instead of all of them. Same loss and gradients as full logits up to float rounding (tested).
Other classes take the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from honelm.objectives.base import Loss, Objective
from honelm.objectives.logprobs import transformers_model, head_switched_off

IGNORE = -100
MODEL_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids")


# masked-LM class → the attribute holding its whole (position-wise) head: hidden (.., d) → logits (.., V)
MLM_HEADS = {"BertForMaskedLM": "cls", "RobertaForMaskedLM": "lm_head", "XLMRobertaForMaskedLM": "lm_head",
             "CamembertForMaskedLM": "lm_head", "RobertaPreLayerNormForMaskedLM": "lm_head"}


def masked_token_nll(logits: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed NLL, masked count, correct predictions, fp32 logit rows (M, V)) over labels != -100.

    logits (B, T, V), labels (B, T).
    """
    selected = labels != IGNORE  # (B, T)
    return _scored(logits[selected], labels[selected])


def _scored(rows: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    picked = rows.float()  # (M, V)
    nll = F.cross_entropy(picked, target, reduction="sum")
    correct = (picked.argmax(-1) == target).sum().detach().float()
    return nll, torch.tensor(target.numel(), device=target.device), correct, picked


def masked_head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(the transformers model, its MLM head's attribute) for the classes in MLM_HEADS, under DDP / peft
    wrappers; None for others and for compiled models (swapping a module would make them recompile)."""
    if hasattr(model, "_orig_mod"):
        return None
    base = transformers_model(model)
    name = MLM_HEADS.get(type(base).__name__)
    return (base, name) if name is not None and isinstance(getattr(base, name, None), nn.Module) else None


class MaskedLM(Objective):
    """Predict the original tokens at masked positions; `accuracy` counts exact recoveries."""

    default_metric = "val_loss"

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k in MODEL_KEYS}  # labels stay out: the loss is ours
        labels = batch["labels"]
        found = masked_head(model)
        if found is None:
            nll, count, correct, rows = masked_token_nll(model(**inputs).logits, labels)  # (B, T, V) logits
        else:
            base, name = found
            with head_switched_off(base, name) as head:
                hidden = model(**inputs).logits  # (B, T, d): the head is an identity here
            selected = labels != IGNORE
            nll, count, correct, rows = _scored(head(hidden[selected]), labels[selected])  # head on (M, d) only
        return Loss(value=nll, units=count, metrics={"accuracy": correct}), rows

    def units(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE).sum())
