"""The preference stage's losses as one choice (`dpo.loss`): which objective, how it is described, what it records.

    sigmoid, ipo, hinge   DPO's variants         pairs     reference    honelm.objectives.dpo
    kto                   KTO                    unpaired  reference    honelm.objectives.kto
    orpo, simpo           ORPO, SimPO            pairs     none         honelm.objectives.reference_free

`build` makes the objective from the `dpo` config section (`honelm.objectives.dpo.DPOObjectiveConfig`),
`describe` the run log's lines about it, `record_metrics` the metrics each loss's per-example score
records carry (KTO's examples have one reward each, not a chosen and a rejected one), and
`kto_balance` the paper's advice on λ_D and λ_U for the data's desirable/undesirable counts.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from honelm.objectives.base import Objective
from honelm.objectives.dpo import DPO, DPOObjectiveConfig
from honelm.objectives.kto import KTO
from honelm.objectives.reference_free import ReferenceFree

PAIR_RECORDS = ("rewards_accuracy", "rewards_margin", "loss", "rewards_chosen", "rewards_rejected")
KTO_RECORDS = ("rewards_accuracy", "rewards_margin", "loss", "rewards", "kl")


def build(section: DPOObjectiveConfig, reference: nn.Module | None) -> Objective:
    """The objective `section.loss` names; `reference` (a frozen model, or None: stored log-probs or LoRA disabled)
    is used by the reference-anchored losses only."""
    beta = section.beta_value
    if section.loss == "kto":
        return KTO(beta, section.kto_desirable_weight, section.kto_undesirable_weight, reference)
    if section.reference_free:
        return ReferenceFree(section.loss, beta, section.orpo_lambda, section.simpo_gamma)
    return DPO(beta, section.loss, section.label_smoothing, reference)


def describe(section: DPOObjectiveConfig, train: Any = None) -> list[str]:
    """The log's lines about the objective; for KTO, with the training examples (`counts`), the balance note."""
    loss, beta = section.loss, section.beta_value
    if loss == "orpo":
        return [f"objective: orpo loss, lambda {section.orpo_lambda} (chosen NLL + odds-ratio term), no reference model"]
    if loss == "simpo":
        return [f"objective: simpo loss, beta {beta}, gamma {section.simpo_gamma}, no reference model"]
    if loss == "kto":
        note = kto_balance(section, *train.counts) if train is not None else None
        return [f"objective: kto loss, beta {beta}, desirable weight {section.kto_desirable_weight}, "
                f"undesirable weight {section.kto_undesirable_weight}", *([note] if note else [])]
    return [f"objective: {loss} loss, beta {beta}"
            + (f", label smoothing {section.label_smoothing} (cDPO)" if section.label_smoothing else "")]


def record_metrics(section: DPOObjectiveConfig) -> tuple[str, ...]:
    """The metrics of the per-example validation/test records of a run with this loss (what `honelm ablate` compares)."""
    return KTO_RECORDS if section.unpaired else PAIR_RECORDS


def kto_balance(section: DPOObjectiveConfig, desirable: int, undesirable: int) -> str | None:
    """A note when λ_D·n_D / (λ_U·n_U) lies outside [1, 4/3], the range Ethayarajh et al. (2024, eq. 8) advise."""
    ratio = section.kto_desirable_weight * desirable / (section.kto_undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    low = undesirable * section.kto_undesirable_weight / desirable
    return (f"note: KTO's λ_D·n_D / (λ_U·n_U) = {ratio:.2f} with {desirable} desirable and {undesirable} undesirable "
            f"training examples; the paper advises 1 to 4/3: dpo.kto_desirable_weight in [{low:.2f}, {low * 4 / 3:.2f}] "
            f"with dpo.kto_undesirable_weight={section.kto_undesirable_weight}")
