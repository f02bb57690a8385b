"""Language-model scores over whole row sets, for validation and test: masked LM or causal LM.

`loss_sums` runs the training objective over every row and keeps the sums (the objectives return
SUMS over units, so the mean over a set is exact however it is batched): masked-LM rows are masked
by a generator seeded with a fixed seed (`MLMRows.fixed_batches`), so every evaluation of the
same rows sees the same masks. `lm_scores` turns the sums of one or more sources into loss (nats
per target token), perplexity, and MLM accuracy or CLM bits-per-byte, overall and per source.
`example_scores` is the causal-LM loss and perplexity of padded examples (sft's conversations,
`honelm.data.sft.SFTExamples`), batched in length order.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from honelm.data.masking import MLMRows
from honelm.data.packing import PackedBlocks, bits_per_byte
from honelm.data.sft import SFTExamples
from honelm.objectives.base import Objective
from honelm.objectives.lm import CausalLM
from honelm.objectives.mlm import MaskedLM


def loss_sums(model: torch.nn.Module, rows: MLMRows | PackedBlocks, batch_size: int, seed: int,
              device: torch.device) -> tuple[float, int, float]:
    """(summed NLL, units, correct) over every row: MLM with the fixed mask of `seed`, or CLM."""
    if isinstance(rows, MLMRows):
        objective: Objective = MaskedLM()
        batches: Iterable[dict] = rows.fixed_batches(batch_size, seed)
    else:
        objective = CausalLM()
        batches = (rows.collate(list(range(s, min(s + batch_size, len(rows)))))
                   for s in range(0, len(rows), batch_size))
    nll, units, correct = 0.0, 0, 0.0
    for batch in batches:
        loss = objective(model, {k: v.to(device) for k, v in batch.items()})
        nll += float(loss.value)
        units += int(loss.units)
        correct += float(loss.metrics.get("accuracy", 0.0))
    return nll, units, correct


def lm_scores(sums: dict[str, tuple[float, int, float]], rows: dict[str, Any], prefix: str) -> dict[str, float]:
    """loss (nats per target token), perplexity, and MLM accuracy or CLM bits-per-byte, overall and per source."""
    def one(nll: float, units: int, correct: float, blocks: list[Any], name: str) -> dict[str, float]:
        mean = nll / max(units, 1)
        out = {f"{name}_loss": mean, f"{name}_ppl": math.exp(min(mean, 50.0))}
        if isinstance(blocks[0], MLMRows):
            out[f"{name}_accuracy"] = correct / max(units, 1)
        else:
            out[f"{name}_bpb"] = bits_per_byte(nll, sum(b.n_bytes for b in blocks))
        return out

    total = [sum(s[i] for s in sums.values()) for i in range(3)]
    metrics = one(total[0], int(total[1]), total[2], list(rows.values()), prefix)
    if len(sums) > 1:
        for name, (nll, units, correct) in sums.items():
            metrics.update(one(nll, units, correct, [rows[name]], f"{prefix}_{name}"))
    return metrics


def example_scores(model: torch.nn.Module, examples: SFTExamples, batch_size: int, device: torch.device,
                   prefix: str) -> dict[str, float]:
    """Loss (nats per trained token) and perplexity over every example, in length-sorted padded batches."""
    objective = CausalLM()
    lengths = examples.lengths
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    nll, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in examples.collate(order[start:start + batch_size]).items()}
        loss = objective(model, batch)
        nll += float(loss.value)
        count += int(loss.units)
    mean = nll / max(count, 1)
    return {f"{prefix}_loss": mean, f"{prefix}_ppl": math.exp(min(mean, 50.0))}
