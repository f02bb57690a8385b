"""Bradley-Terry reward modelling: a scalar score per sequence, trained so chosen outscores rejected.

With r_c, r_r (P,) the scores of the chosen and rejected sequences of P pairs (one forward over
the (2P, T) batch [chosen; rejected]; the score is the sequence-classification head's output at
the last non-pad token), the per-pair loss is (InstructGPT; TRL's RewardTrainer, METHODS.md §4.1)

    L_p = -log σ(r_c - r_r - m_p)  +  coef · (r_c + r_r)²

where m_p is an optional per-pair margin from the data (a larger m_p asks for a wider gap) and
the second term (reward centring, Eisenstein et al. 2023; TRL's center_rewards_coefficient)
pulls the mean reward towards 0 so the scale stays usable downstream. `Loss.value` sums L_p over
the pairs (units = pairs), so the loop's mean is TRL's `loss.mean() + coef · mean((r_c + r_r)²)`.

Metrics (sums over pairs, logged divided by the pair count): `accuracy` counts r_c > r_r
(strict: a tie counts as wrong), `margin` sums r_c - r_r, `reward_mean` sums (r_c + r_r)/2,
`reward_chosen` / `reward_rejected` sum r_c / r_r. Spread and extremes (std, min, max) are not
sums, so they are reported by validation and `honelm test` (`reward_stats`), not per step.
`evaluate_pairs` scores a whole evaluation set of pairs (`score_pairs`, in length-sorted batches) and,
given a `records` list, appends each pair's score record (`honelm.predictions.score_records`: its
loss, accuracy, margin and reward_mean, and both rewards), in pair order.
`RewardObjectiveConfig` is the `reward` section of `honelm reward`'s config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from honelm import predictions as P
from honelm.bounds import at_least
from honelm.errors import ConfigError
from honelm.objectives.base import Loss, Objective

MODEL_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


@dataclass
class RewardObjectiveConfig:
    """The Bradley-Terry objective."""

    center_coef: Annotated[float, at_least(0)] = 0.0
    """Reward centring: add coef · mean((r_c + r_r)²) to pull the mean reward to 0 (TRL's center_rewards_coefficient, e.g. 0.01); 0 = off."""
    disable_dropout: bool = True
    """Turn off every dropout of the model (TRL's disable_dropout): with dropout, chosen and rejected are scored through noise."""

    def validate(self) -> None:
        if self.center_coef < 0:
            raise ConfigError(f"reward.center_coef must be >= 0, got {self.center_coef}")


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair loss (P,): -log σ(r_c - r_r - m) + coef·(r_c + r_r)²; r_c, r_r, m (P,)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)  # = log(1 + exp(-diff)), stable for large |diff|
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss


def pair_values(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached per-pair values (P,): accuracy (strict >), margin, reward_mean, reward_chosen, reward_rejected."""
    c, r = r_chosen.detach().float(), r_rejected.detach().float()
    return {"accuracy": (c > r).float(), "margin": c - r, "reward_mean": (c + r) / 2, "reward_chosen": c,
            "reward_rejected": r}


def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached sums over P pairs of `pair_values`."""
    return {k: v.sum() for k, v in pair_values(r_chosen, r_rejected).items()}


def reward_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor, prefix: str) -> dict[str, float]:
    """Summary over a whole evaluation set: accuracy, margin, and mean/std/min/max of all 2P rewards."""
    both = torch.cat([r_chosen, r_rejected]).double()
    n = max(r_chosen.numel(), 1)
    return {f"{prefix}_accuracy": float((r_chosen > r_rejected).sum()) / n,
            f"{prefix}_margin": float((r_chosen - r_rejected).double().sum()) / n,
            f"{prefix}_reward_mean": float(both.mean()), f"{prefix}_reward_std": float(both.std(unbiased=False)),
            f"{prefix}_reward_min": float(both.min()), f"{prefix}_reward_max": float(both.max())}


class RewardModel(Objective):
    """Bradley-Terry loss of a one-output sequence classifier on [chosen; rejected] batches."""

    default_metric = "val_loss"

    def __init__(self, center_coef: float = 0.0):
        self.center_coef = center_coef

    @staticmethod
    def scores(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_c, r_r), each (P,) in fp32, from one forward over the (2P, T) batch."""
        logits = model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}).logits  # (2P, 1)
        rewards = logits.float().squeeze(-1)  # (2P,)
        return rewards.chunk(2)  # type: ignore[return-value]

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        r_c, r_r = self.scores(model, batch)
        per_pair = bradley_terry(r_c, r_r, batch.get("margin"), self.center_coef)  # (P,)
        return (Loss(value=per_pair.sum(), units=r_c.numel(), metrics=pair_metrics(r_c, r_r)),
                torch.stack([r_c, r_r], dim=1))  # (P, 2)

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0)) // 2


def score_pairs(model: nn.Module, data: Any, batch_size: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_c, r_r), each (N,) on CPU in pair order, over `data` (`honelm.data.preferences.EncodedPairs`)
    in length-sorted batches."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    chosen, rejected = torch.empty(len(data)), torch.empty(len(data))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in data.collate(idx).items()}
        r_c, r_r = RewardModel.scores(model, batch)
        chosen[idx], rejected[idx] = r_c.cpu(), r_r.cpu()
    return chosen, rejected


def scored_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margins: torch.Tensor | None,
                   center_coef: float, prefix: str, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Loss (the training objective's mean) and `reward_stats` of an evaluation set's scores; each pair's score
    record appended to `records` when given."""
    per_pair = bradley_terry(r_chosen, r_rejected, margins, center_coef)
    if records is not None:
        values = pair_values(r_chosen, r_rejected)
        sums = {"loss": per_pair.tolist(), **{k: values[k].tolist() for k in ("accuracy", "margin", "reward_mean")}}
        records += P.score_records([1] * len(per_pair), sums, chosen=r_chosen.tolist(), rejected=r_rejected.tolist())
    return {f"{prefix}_loss": float(per_pair.double().mean()), **reward_stats(r_chosen, r_rejected, prefix)}


def evaluate_pairs(model: nn.Module, data: Any, batch_size: int, device: torch.device, prefix: str,
                   center_coef: float = 0.0, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Loss, accuracy, margin and reward mean/std/min/max of `model` over the pairs of `data` (each pair's score
    record appended to `records` when given)."""
    r_c, r_r = score_pairs(model, data, batch_size, device)
    return scored_metrics(r_c, r_r, data.margins, center_coef, prefix, records)
