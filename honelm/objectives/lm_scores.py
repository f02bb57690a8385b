"""Language-model scores over whole row sets, for validation and test: masked LM or causal LM.

`loss_sums` runs the training objective over every row and keeps the sums (the objectives return
SUMS over units, so the mean over a set is exact however it is batched): masked-LM rows are masked
by a generator seeded with a fixed seed (`MLMRows.fixed_batches`), so every evaluation of the
same rows sees the same masks. `lm_scores` turns the sums of one or more sources into loss (nats
per target token), perplexity, and MLM accuracy or CLM bits-per-byte, overall and per source.
`example_scores` is the causal-LM loss and perplexity of padded examples (sft's conversations,
`honelm.data.sft.SFTExamples`), batched in length order.

Both score each row on its own (`row_scores`, from the same forward pass) and, given a `records`
list, append one score record per row in row order (`honelm.predictions.score_records`: its
target tokens and summed NLL, plus correct predictions for MLM): the per-example records an
ablation bootstraps, whose Σ loss / Σ units is exactly the loss reported here.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from honelm import predictions as P
from honelm.data.masking import MLMRows
from honelm.data.packing import PackedBlocks, bits_per_byte
from honelm.data.sft import SFTExamples
from honelm.objectives.lm import IGNORE, CausalLM
from honelm.objectives.logprobs import sum_by_row, target_logps
from honelm.objectives.mlm import MaskedLM


def row_scores(model: torch.nn.Module, batch: dict[str, Any], masked: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) summed NLL of each row's targets, (B,) their counts and (B,) correct predictions (masked LM; zeros for a
    causal LM), from one forward pass: the training objective's sums, split by row."""
    labels = batch["labels"]
    if not masked:  # the causal-LM loss's targets: labels shifted left, as CausalLM
        logps, counts = target_logps(model, CausalLM._inputs(batch), labels)
        return -logps, counts, torch.zeros_like(logps)
    _, rows = MaskedLM().outputs(model, batch)  # (M, V) fp32: the masked positions, in row-major order
    selected = labels != IGNORE
    target = labels[selected]
    nll = sum_by_row(F.cross_entropy(rows, target, reduction="none"), selected)
    correct = sum_by_row((rows.argmax(-1) == target).float(), selected)
    return nll, selected.sum(dim=1), correct


def _keep(records: list[dict[str, Any]] | None, nll: list[float], units: list[int], correct: list[float] | None,
          **fields: list[Any]) -> None:
    if records is not None:
        sums = {"loss": nll, **({"accuracy": correct} if correct is not None else {})}
        records += P.score_records(units, sums, first=len(records), **fields)  # after another source's rows


def loss_sums(model: torch.nn.Module, rows: MLMRows | PackedBlocks, batch_size: int, seed: int,
              device: torch.device, records: list[dict[str, Any]] | None = None) -> tuple[float, int, float]:
    """(summed NLL, units, correct) over every row: MLM with the fixed mask of `seed`, or CLM; each row's score
    record appended to `records` when given."""
    masked = isinstance(rows, MLMRows)
    if masked:
        batches: Iterable[dict] = rows.fixed_batches(batch_size, seed)
    else:
        batches = (rows.collate(list(range(s, min(s + batch_size, len(rows)))))
                   for s in range(0, len(rows), batch_size))
    nll: list[float] = []
    units: list[int] = []
    correct: list[float] = []
    for batch in batches:
        row_nll, row_units, row_correct = row_scores(model, {k: v.to(device) for k, v in batch.items()}, masked)
        nll += row_nll.tolist()
        units += row_units.tolist()
        correct += row_correct.tolist()
    _keep(records, nll, units, correct if masked else None)
    return sum(nll), sum(units), sum(correct)


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
                   prefix: str, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Loss (nats per trained token) and perplexity over every example, in length-sorted padded batches; each
    example's score record appended to `records` (in example order) when given."""
    lengths = examples.lengths
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    nll, count = [0.0] * len(examples), [0] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in examples.collate(idx).items()}
        row_nll, row_units, _ = row_scores(model, batch, masked=False)
        for i, value, units in zip(idx, row_nll.tolist(), row_units.tolist()):
            nll[i], count[i] = value, units
    _keep(records, nll, count, None)
    mean = sum(nll) / max(sum(count), 1)
    return {f"{prefix}_loss": mean, f"{prefix}_ppl": math.exp(min(mean, 50.0))}
