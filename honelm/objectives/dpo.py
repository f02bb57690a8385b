"""Direct preference optimisation: DPO (sigmoid), cDPO (label smoothing), IPO and hinge losses.

For P pairs, with summed completion log-probs (`honelm.objectives.logprobs`) of the policy π and
the frozen reference π_ref, each (P,):

    h   = [log π(y_c|x) - log π_ref(y_c|x)] - [log π(y_r|x) - log π_ref(y_r|x)]      (P,)

    sigmoid (DPO, Rafailov et al. 2023)     L = -log σ(β·h)
    cDPO (label smoothing ε, Mitchell)      L = -(1-ε)·log σ(β·h) - ε·log σ(-β·h)
                                              = (1-ε)·L_DPO(y_c, y_r) + ε·L_DPO(y_r, y_c)
    hinge (SLiC)                            L = max(0, 1 - β·h)
    ipo (Azar et al. 2023; β plays τ)       L = (h̄ - 1/(2β))²,  h̄ = the log-ratios divided by
                                              each completion's token count (TRL's normalisation,
                                              confirmed with the IPO authors)

Label smoothing applies to `sigmoid` only. Current TRL (1.x) IGNORES `label_smoothing` for
`loss_type="sigmoid"` (it uses it only for robust/exo_pair/aot); TRL 0.12 applied it as above.
honelm applies it as above: that is what the name promises.

Implicit rewards (detached, summed log-ratios for every loss type, as TRL logs them):
r̂_c = β·(log π(y_c|x) - log π_ref(y_c|x)), r̂_r likewise. Metrics are sums over the P pairs
(units = pairs; the loop logs sum / pairs): `rewards_chosen`, `rewards_rejected`,
`rewards_margin` (r̂_c - r̂_r), `rewards_accuracy` (r̂_c > r̂_r, strict: with π = π_ref every
reward is 0 and the accuracy 0, not 0.5), `logps_chosen`, `logps_rejected` (policy log-probs).
TRL calls them rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
logps/chosen, logps/rejected.

The reference, in the order `DPO.reference_logps` tries them: log-probs stored in the batch
(`ref_logps`, precomputed once before training), a separate frozen model, or, for a LoRA policy,
the same model with its adapters disabled (peft's `disable_adapter()`), which is exactly the
model LoRA was applied to. `precompute_reference` stores a model's log-probs of every pair for
the first; `evaluate_pairs` gives the loss and metrics over a whole evaluation set and, given a
`records` list, appends each pair's score record (`honelm.predictions.score_records`: its loss and
every metric above), in pair order.

A booster that perturbs the policy's inputs (honelm.boosters.adversarial) must leave the reference
alone: `DPO.unperturbed` computes the reference log-probs of a batch before any perturbed pass (a
LoRA policy's reference is the same model, whose input embeddings the perturbation hooks). The
rows `outputs` returns for consistency regularisers are the implicit rewards [r̂_c, r̂_r], whose
softmax is the pair's implicit preference probability σ(β·h).
`DPOObjectiveConfig` is the `dpo` section of `honelm dpo`'s config (these settings, read by the stage).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from honelm import predictions as P
from honelm.bounds import above, between
from honelm.errors import ConfigError
from honelm.objectives.base import Loss, Objective
from honelm.objectives.logprobs import sequence_logps, unwrap

LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOObjectiveConfig:
    """The DPO-family loss and its reference model."""

    beta: Annotated[float, above(0)] = 0.1
    """β: how far the policy may move from the reference (larger = stays closer); for ipo it is τ."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid (DPO: -log σ(β·h)), ipo ((h/tokens - 1/(2β))², length-normalised as in TRL) or hinge (max(0, 1 - β·h))."""
    label_smoothing: Annotated[float, between(0, 0.5, open_hi=True)] = 0.0
    """cDPO: the probability ε that a pair's preference is flipped; loss (1-ε)·L(c, r) + ε·L(r, c); sigmoid only, 0 <= ε < 0.5. Current TRL ignores label_smoothing for sigmoid (TRL 0.12 applied it like this)."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every train and validation pair in one no-grad pass before training and keep only those (no reference model in memory while training)."""
    disable_dropout: bool = True
    """Turn off every dropout of policy and reference (TRL's disable_dropout), so both score a sequence the same at step 0."""

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing (cDPO) applies to dpo.loss=sigmoid only, not {self.loss}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss (P,) from summed log-probs, each (P,); token counts (P,) are needed by `ipo` only."""
    chosen_ratio = policy_chosen - ref_chosen  # log π(y_c|x)/π_ref(y_c|x)   (P,)
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)  # β·h
        loss = -F.logsigmoid(z)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
        return loss
    if label_smoothing:
        raise ValueError(f"label smoothing applies to the sigmoid loss only, not {loss_type!r}")
    if loss_type == "hinge":
        return torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completion token counts")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def dpo_pair_values(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Detached per-pair values (P,) of the implicit rewards, their margin and accuracy, and the policy log-probs."""
    pc, pr = policy_chosen.detach().float(), policy_rejected.detach().float()
    rc = beta * (pc - ref_chosen.detach().float())  # r̂_c (P,)
    rr = beta * (pr - ref_rejected.detach().float())
    return {"rewards_chosen": rc, "rewards_rejected": rr, "rewards_margin": rc - rr,
            "rewards_accuracy": (rc > rr).float(), "logps_chosen": pc, "logps_rejected": pr}


def dpo_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Detached sums over the P pairs of `dpo_pair_values`."""
    values = dpo_pair_values(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return {k: v.sum() for k, v in values.items()}


def adapters_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """peft's `disable_adapter()` on a LoRA model: the base it was applied to, for the block's duration."""
    inner = unwrap(model)
    if not hasattr(inner, "disable_adapter"):
        raise RuntimeError("DPO without a reference model or stored reference log-probs needs a LoRA (peft) policy")
    return inner.disable_adapter()


class DPO(Objective):
    """DPO-family loss on [chosen; rejected] batches with completion-only labels."""

    default_metric = "val_loss"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: nn.Module | None = None):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference = reference

    def frozen_models(self) -> list[nn.Module]:
        return [self.reference] if self.reference is not None else []

    def reference_logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(2P,) reference log-probs: stored in the batch, else a frozen model's, else the adapter-free policy's."""
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference, batch, right_padded=True)[0]
            with adapters_disabled(model):
                return sequence_logps(unwrap(model), batch, right_padded=True)[0]

    def unperturbed(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with the reference's log-probs (`ref_logps`, (2P,)) computed now, before any perturbed pass."""
        return batch if "ref_logps" in batch else {**batch, "ref_logps": self.reference_logps(model, batch)}

    def terms(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Per pair (P,) each: policy log-probs of chosen and rejected, the reference's, and both token counts."""
        ref = self.reference_logps(model, batch)  # (2P,), first: no graph held while it runs
        logps, tokens = sequence_logps(model, batch, right_padded=True)  # (2P,), (2P,): pairs are right-padded
        return (*logps.chunk(2), *ref.chunk(2), *tokens.chunk(2))

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        pc, pr, rc, rr, tc, tr = self.terms(model, batch)
        per_pair = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing, tc, tr)  # (P,)
        implicit = self.beta * torch.stack([pc - rc, pr - rr], dim=1)  # [r̂_c, r̂_r] (P, 2), through the policy
        return (Loss(value=per_pair.sum(), units=pc.numel(), metrics=dpo_metrics(pc, pr, rc, rr, self.beta)),
                implicit)

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0)) // 2


def evaluate_pairs(model: nn.Module, data: Any, objective: DPO, batch_size: int, device: torch.device,
                   prefix: str, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Mean loss and every DPO metric over the pairs of `data` (`honelm.data.preferences.EncodedPairs`),
    in length-sorted batches (sums over pairs / pairs); each pair's score record appended to `records` when given."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    total, sums = 0.0, {}
    per_pair: dict[str, list[float]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        pc, pr, rc, rr, tc, tr = objective.terms(model, {k: v.to(device) for k, v in data.collate(idx).items()})
        losses = dpo_loss(pc, pr, rc, rr, objective.beta, objective.loss_type, objective.label_smoothing, tc, tr)
        values = {"loss": losses.detach().float(), **dpo_pair_values(pc, pr, rc, rr, objective.beta)}
        total += float(losses.sum())
        for k, v in values.items():
            if k != "loss":
                sums[k] = sums.get(k, 0.0) + float(v.sum())
            column = per_pair.setdefault(k, [0.0] * len(data))
            for i, x in zip(idx, v.tolist()):
                column[i] = x
    if records is not None:
        records += P.score_records([1] * len(data), per_pair)
    n = max(len(data), 1)
    return {f"{prefix}_loss": total / n, **{f"{prefix}_{k}": v / n for k, v in sums.items()}}


def precompute_reference(model: nn.Module, splits: list[Any], batch_size: int, device: torch.device,
                         autocast: Any) -> None:
    """Store the model's summed completion log-probs of every pair of each `EncodedPairs` in `splits` as its
    `ref_logps` (N, 2) [chosen, rejected], computed under `autocast`."""
    was_training = model.training
    model.to(device).eval()
    with torch.no_grad():
        for data in splits:
            out = torch.empty(len(data), 2)
            order = sorted(range(len(data)), key=lambda i: data.lengths[i])
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = {k: v.to(device) for k, v in data.collate(idx).items()}
                with autocast():
                    logps = sequence_logps(model, batch, right_padded=True)[0].float().cpu()  # (2P,)
                out[idx, 0], out[idx, 1] = logps.chunk(2)
            data.ref_logps = out
    model.train(was_training)
