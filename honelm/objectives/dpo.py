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

The reference, in the order `Anchored.reference_logps` tries them (DPO's and KTO's,
`honelm.objectives.kto`): log-probs stored in the batch (`ref_logps`, precomputed once before
training), a separate frozen model, or, for a LoRA policy, the same model with its adapters
disabled (peft's `disable_adapter()`), which is exactly the model LoRA was applied to. `precompute_reference` stores a model's log-probs of every pair for
the first; `evaluate_pairs` gives the loss and metrics over a whole evaluation set and, given a
`records` list, appends each pair's score record (`honelm.predictions.score_records`: its loss and
every metric above), in pair order.

A booster that perturbs the policy's inputs (honelm.boosters.adversarial) must leave the reference
alone: `DPO.unperturbed` computes the reference log-probs of a batch before any perturbed pass (a
LoRA policy's reference is the same model, whose input embeddings the perturbation hooks). The
rows `outputs` returns for consistency regularisers are the implicit rewards [r̂_c, r̂_r], whose
softmax is the pair's implicit preference probability σ(β·h).
`evaluate_pairs` reads any objective with a `scores` method (KTO's and the reference-free ORPO/SimPO's too).
`DPOObjectiveConfig` is the `dpo` section of `honelm dpo`'s config: these settings and those of the other
preference losses the stage offers (kto, orpo, simpo), read by the stage through `honelm.objectives.preference`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from honelm import predictions as P
from honelm.bounds import above, at_least, between
from honelm.errors import ConfigError
from honelm.objectives.base import Loss, Objective
from honelm.objectives.logprobs import sequence_logps, unwrap

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")
"""DPO's own losses (`dpo_loss`); the preference stage also offers kto (`honelm.objectives.kto`) and the
reference-free orpo and simpo (`honelm.objectives.reference_free`)."""
REFERENCE_FREE: tuple[str, ...] = ("orpo", "simpo")
DEFAULT_BETA = {"simpo": 2.0}
"""β when `dpo.beta` is left empty: 0.1 (DPO, KTO and TRL's default) unless listed (SimPO's paper uses β of 2 and more)."""


@dataclass
class DPOObjectiveConfig:
    """The preference loss (DPO's variants, KTO, ORPO, SimPO) and its reference model (formulas: docs/preference.md)."""

    beta: Annotated[float | None, above(0)] = None
    """β: how far the policy may move from the reference (larger = stays closer; τ for ipo; SimPO's reward scale); empty = the loss's default: 0.1 (sigmoid, ipo, hinge, kto) or 2.0 (simpo). orpo has no β (see orpo_lambda)."""
    loss: Literal["sigmoid", "ipo", "hinge", "kto", "orpo", "simpo"] = "sigmoid"
    """sigmoid (DPO: -log σ(β·h)), ipo ((h/tokens - 1/(2β))², length-normalised as in TRL), hinge (max(0, 1 - β·h)); kto (unpaired examples, desirable or not, against the reference; Ethayarajh et al. 2024); no reference model: orpo (chosen NLL + λ·odds-ratio term; Hong et al. 2024), simpo (-log σ(β·Δ mean log-prob - γ); Meng et al. 2024)."""
    label_smoothing: Annotated[float, between(0, 0.5, open_hi=True)] = 0.0
    """cDPO: the probability ε that a pair's preference is flipped; loss (1-ε)·L(c, r) + ε·L(r, c); sigmoid only, 0 <= ε < 0.5. Current TRL ignores label_smoothing for sigmoid (TRL 0.12 applied it like this)."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every train and validation pair in one no-grad pass before training and keep only those (no reference model in memory while training). Not for orpo/simpo, which have no reference."""
    disable_dropout: bool = True
    """Turn off every dropout of policy and reference (TRL's disable_dropout), so both score a sequence the same at step 0."""
    kto_desirable_weight: Annotated[float, above(0)] = 1.0
    """KTO's λ_D, the weight of desirable examples' losses. The paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples (the log says when it is outside)."""
    kto_undesirable_weight: Annotated[float, above(0)] = 1.0
    """KTO's λ_U, the weight of undesirable examples' losses."""
    orpo_lambda: Annotated[float, at_least(0)] = 0.1
    """ORPO's λ: weight of the odds-ratio term -log σ(log odds(chosen) - log odds(rejected)) added to the chosen reply's mean token NLL (TRL ORPOConfig.beta's default)."""
    simpo_gamma: Annotated[float, at_least(0)] = 1.0
    """SimPO's target margin γ in -log σ(β·(mean log-prob of chosen - of rejected) - γ); with the default β 2, γ/β = 0.5."""

    @property
    def beta_value(self) -> float:
        """β as the loss uses it: `beta`, or the loss's default when it is empty."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.loss, 0.1)

    @property
    def reference_free(self) -> bool:
        """orpo and simpo: no reference model is loaded, copied or scored."""
        return self.loss in REFERENCE_FREE

    @property
    def unpaired(self) -> bool:
        """kto: trains on single completions judged desirable or not (`honelm.data.unpaired`), not on pairs."""
        return self.loss == "kto"

    def validate(self) -> None:
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing (cDPO) applies to dpo.loss=sigmoid only, not {self.loss}")
        if self.beta is not None and self.loss == "orpo":
            raise ConfigError("dpo.beta does not apply to dpo.loss=orpo (its weight is dpo.orpo_lambda)")
        if self.precompute_ref and self.reference_free:
            raise ConfigError(f"dpo.precompute_ref: dpo.loss={self.loss} uses no reference model")
        for name, value, loss in (("kto_desirable_weight", self.kto_desirable_weight, "kto"),
                                  ("kto_undesirable_weight", self.kto_undesirable_weight, "kto"),
                                  ("orpo_lambda", self.orpo_lambda, "orpo"), ("simpo_gamma", self.simpo_gamma, "simpo")):
            if value < 0 or (value == 0 and loss == "kto"):
                raise ConfigError(f"dpo.{name} must be {'> 0' if loss == 'kto' else '>= 0'}, got {value}")
            if self.loss != loss and value != getattr(DPOObjectiveConfig, name):
                raise ConfigError(f"dpo.{name} applies to dpo.loss={loss} only, not {self.loss}")


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


class Anchored(Objective):
    """An objective scored against a frozen reference (DPO, KTO): where the reference's log-probs come from.

    Batches are 2U rows (two per unit: [chosen; rejected] pairs, or KTO's [examples; KL rows]).
    """

    default_metric = "val_loss"

    def __init__(self, reference: nn.Module | None = None):
        self.reference = reference

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0)) // 2

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


class DPO(Anchored):
    """DPO-family loss on [chosen; rejected] batches with completion-only labels."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: nn.Module | None = None):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        super().__init__(reference)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

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

    def scores(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per pair (P,): the loss and the detached `dpo_pair_values`."""
        pc, pr, rc, rr, tc, tr = self.terms(model, batch)
        losses = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing, tc, tr)
        return losses, dpo_pair_values(pc, pr, rc, rr, self.beta)


def evaluate_pairs(model: nn.Module, data: Any, objective: Any, batch_size: int, device: torch.device,
                   prefix: str, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Mean loss and every metric of `objective.scores` over the pairs of `data` (`honelm.data.preferences.EncodedPairs`;
    or KTO's examples, `honelm.data.unpaired.EncodedExamples`), in length-sorted batches (sums over units / units);
    each unit's score record appended to `records` when given."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    total, sums = 0.0, {}
    per_pair: dict[str, list[float]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        losses, scored = objective.scores(model, {k: v.to(device) for k, v in data.collate(idx).items()})
        values = {"loss": losses.detach().float(), **scored}
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
