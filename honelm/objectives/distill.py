"""Knowledge distillation of a classifier or regressor: gold labels and a teacher's outputs together.

Classification (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network"):

    loss_i = α · CE(y_i, softmax(s_i)) · [i has a gold label] + (1 − α) · KD_i
    KD_i   = T² · KL(softmax(t_i / T) ‖ softmax(s_i / T))        (loss="kl")
    KD_i   = ‖s_i − t_i‖²  (squared L2 distance of the logits)     (loss="mse", Tang et al. 2019)

s_i are the student's logits, t_i the teacher's, T the temperature. The T² factor keeps the soft
term's gradient on the same scale as the hard term's when T changes (Hinton et al. section 2:
the gradients of the soft term scale as 1/T²). Rows of the transfer set without a gold label
(unlabelled or augmented text) carry the KD term only.

Regression: KD_i = (s_i − t_i)² (the teacher's prediction as a soft target), CE replaced by the
squared error to the gold value; no temperature.

`Loss.value` is the sum over the examples of the batch (honelm's objective contract) and the
metrics are sums too: the gold and KD parts (`ce`, `kd`) and how often the student's top class
equals the teacher's (`agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from honelm.bounds import PROBABILITY, above, at_least
from honelm.errors import ConfigError
from honelm.objectives.base import Loss, Objective
from honelm.objectives.classify import Classify


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) per row: (B, C) logits → (B,)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def logit_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between student and teacher logits per row: (B, C) → (B,)."""
    return (student.float() - teacher.float()).pow(2).sum(-1)


def kd_terms(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, has_label: torch.Tensor,
             alpha: float, temperature: float, loss: Literal["kl", "mse"], regression: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example (total, gold part, KD part), each (B,); the gold part is 0 where there is no gold label."""
    if regression:
        kd = logit_mse(student, teacher)
        gold = (student.float().squeeze(-1) - labels.float()).pow(2)
    else:
        kd = soft_kl(student, teacher, temperature) if loss == "kl" else logit_mse(student, teacher)
        # rows without a gold label carry a placeholder class 0; their term is masked out below
        gold = F.cross_entropy(student.float(), labels.long().clamp(min=0), reduction="none")
    gold = torch.where(has_label, gold, torch.zeros_like(gold))
    return alpha * gold + (1.0 - alpha) * kd, gold, kd


class Distill(Objective):
    """The KD loss on batches that carry the teacher's outputs (`teacher`, (B, C)) and `has_label` (B,)."""

    def __init__(self, alpha: float, temperature: float, loss: Literal["kl", "mse"] = "kl", regression: bool = False):
        self.alpha, self.temperature, self.loss, self.regression = alpha, temperature, loss, regression
        self.default_metric = "val_mse" if regression else "val_accuracy"
        self.continuous = regression
        self._logits = Classify(regression)

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        logits = self._logits.logits(model, batch)
        teacher = batch["teacher"].to(logits.device)
        total, gold, kd = kd_terms(logits, teacher, batch["labels"], batch["has_label"].to(logits.device),
                                   self.alpha, self.temperature, self.loss, self.regression)
        metrics = {"ce" if not self.regression else "gold_mse": gold.sum().detach(), "kd": kd.sum().detach()}
        if not self.regression:
            metrics["agreement"] = (logits.argmax(-1) == teacher.argmax(-1)).sum().detach().float()
        return Loss(value=total.sum(), units=logits.shape[0], metrics=metrics), logits

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].numel())


@dataclass
class DistillOptions:
    """How the teacher's outputs and the gold labels are mixed in the student's loss."""

    alpha: Annotated[float, PROBABILITY] = 0.5
    """Weight of the gold-label term: loss = alpha*CE(gold) + (1-alpha)*KD; rows without a gold label carry KD only. 0 = teacher only."""
    temperature: Annotated[float, above(0)] = 2.0
    """Softmax temperature T of the KL term (multiplied by T^2, Hinton et al. 2015): classification with loss=kl, and token-level KD."""
    loss: Literal["kl", "mse"] = "kl"
    """KD term: kl (T^2 * KL(teacher_T || student_T)) or mse (squared distance of the logits, Tang et al. 2019). Regression always uses the squared error to the teacher's prediction."""
    mode: Literal["auto", "sequence", "token"] = "auto"
    """Generation only: sequence (the teacher answers the training prompts, the student is SFT'd on the answers; any tokenizers) or token (the teacher's next-token distribution on the references; one shared vocabulary); auto = token when the student's tokenizer is the teacher's vocabulary."""
    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    """Token-level KD: forward KL, reverse KL, or generalized JSD(beta) (GKD), on the teacher's top-k."""
    beta: Annotated[float, PROBABILITY] = 0.5
    """Token-level KD with divergence=jsd: the interpolation beta in (0, 1)."""
    top_k: Annotated[int, at_least(1)] = 32
    """Token-level KD: teacher log-probs kept per target token (memory k x 6 bytes per token)."""
    tail: Literal["bucket", "renormalise"] = "bucket"
    """Token-level KD: the teacher's mass outside its top-k kept as one more category (bucket), or the top-k renormalised to 1 (renormalise: pushes the student's mass off every other token, the gold one included when the teacher ranked it below k). See docs/distill.md."""
    num_samples: Annotated[int, at_least(1)] = 1
    """Sequence-level KD: teacher answers per training prompt (seeds sampling.seed, seed+1, ...)."""
    on_policy: Annotated[float, PROBABILITY] = 0.0
    """Token-level KD: share of batches whose answers the student samples itself (sampling.*) and the teacher, kept in memory, scores (GKD); 0 = none. Needs data.packing=false."""

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha={self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature={self.temperature} must be > 0")
        if self.top_k < 1 or self.num_samples < 1:
            raise ConfigError("distill.top_k and distill.num_samples must be >= 1")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ConfigError(f"distill.on_policy={self.on_policy} must be in [0, 1]")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ConfigError(f"distill.beta={self.beta} must be in (0, 1) for divergence=jsd")
