"""The objective contract shared by every stage: `Loss` and the `Objective` base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Loss:
    """A micro-batch loss.

    value:   scalar tensor, the SUM of per-unit losses (it carries the graph).
    units:   how many units (target tokens / examples) `value` sums over.
    metrics: detached scalar SUMS over the same units (e.g. correct predictions), logged as
             sum / units; plain means would make accumulation inexact.
    """

    value: torch.Tensor
    units: int | torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """Base class: subclasses implement `__call__` and `units`; `step` is overridable."""

    #: name of the default validation metric for this objective (lower is better unless noted)
    default_metric: str = "val_loss"

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Loss:
        return self.outputs(model, batch)[0]

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        """The loss and the fp32 outputs it was computed from, one row per loss unit.

        Rows are (units, C) logits for classification, (units, V) next-token/masked-token logits
        for language modelling, (units, 1) predictions for regression. Consistency regularisers
        (SMART, R3F, VAT in `honelm.boosters.adversarial`) compare these rows between a clean and
        a perturbed pass.
        """
        raise NotImplementedError

    def units(self, batch: dict[str, Any]) -> int:
        """Number of loss units in `batch` (counted without the model)."""
        raise NotImplementedError

    def unperturbed(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with what must not see a perturbation of the trained model's inputs computed now, clean.

        honelm.boosters.adversarial calls it once per micro-batch before its perturbed passes. Most
        objectives have nothing of the kind; DPO's reference log-probs are (a LoRA policy's reference
        is the same model, whose embedding output the perturbation hooks).
        """
        return batch

    def frozen_models(self) -> list[nn.Module]:
        """Models the objective runs but never trains (DPO's frozen reference copy).

        The loop holds their Linear weights in bf16 while it trains under bf16 autocast, as it does
        for the trained model's frozen ones (`train.bf16_frozen`, honelm.speed), and puts the exact
        fp32 weights back when training ends.
        """
        return []

    def step(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        """Forward and backward of one micro-batch; gradients accumulate in `.grad`.

        `scale` turns the summed loss into its share of the step mean (world_size / step units).
        """
        with autocast():
            loss = self(model, batch)
        (loss.value.float() * scale).backward()
        return loss
