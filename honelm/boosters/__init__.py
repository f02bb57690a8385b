"""Boosters transform a model (LoRA), prepare a run of their own (plae's teacher) or wrap an objective.

`apply()`, `prepare()` and `objective()` are the one place the runner hands the model, the
stage's plan, the objective and the config to the boosters, so every stage gets the same
behaviour: a stage config with a `lora` section gets LoRA when `lora.enabled`; one with an
`adversarial` section gets its method around the objective (plae: after its teacher run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from honelm.boosters import plae
from honelm.boosters.adversarial import Adversarial, describe
from honelm.boosters.lora import apply_lora
from honelm.errors import ConfigError
from honelm.models import LoadedModel


def carries_adapter(cfg: Any, stage: str) -> bool:
    """Whether the stage continues the LoRA adapter of its init_from run (`lora.carry`); checks that it may.

    dpo and ppo refuse: their reference is the policy with its adapters disabled, which under a
    carried adapter would be the model from before that adapter, not the starting policy.
    """
    lora_cfg = getattr(cfg, "lora", None)
    if lora_cfg is None or not lora_cfg.carry:
        return False
    if not lora_cfg.enabled:
        raise ConfigError("lora.carry=true needs lora.enabled=true (it keeps training the init_from run's adapter)")
    if stage in ("dpo", "ppo"):
        raise ConfigError(f"lora.carry=true is not available for {stage}: its reference is the policy with adapters "
                          "disabled, which would then be the model before the carried adapter; leave lora.carry=false "
                          "(the init_from adapter is merged, and a fresh adapter trains on top)")
    return True


def apply(loaded: LoadedModel, cfg: Any, task: str, say: Callable[[str], None]) -> LoadedModel:
    """Return the record of the model the loop should train (`loaded` itself when no booster applies)."""
    lora_cfg = getattr(cfg, "lora", None)
    if lora_cfg is not None and lora_cfg.enabled:
        loaded = apply_lora(loaded, lora_cfg, task, say)
    return loaded


@dataclass
class Prepared:
    """What a booster's own run before the main one leaves for it (plae: the stored adversarial embeddings)."""

    stored: Callable[[dict[str, Any], torch.Tensor], torch.Tensor] | None = None
    """The `stored(batch, like)` lookup `objective()` hands to plae's wrapper."""
    loaded: LoadedModel | None = None
    """The model the main run trains instead of the first one (which the booster's run trained)."""
    interrupted: bool = False
    """The booster's run stopped (Ctrl-C, or a stop that came as it finished): the main run must not start."""


def prepare(ctx: Any, stage: Any, loaded: LoadedModel, plan: Any, train: Callable[[Any, nn.Module, Any, bool], Any],
            reload: Callable[[], LoadedModel]) -> Prepared | None:
    """Run what a booster needs before the main run, with the stage's plan; None when no booster needs anything.

    `train(sub, model, objective, resume)` fits `model` with the plan's stream, validation and best/
    into the sub-run `sub` (`ctx.sub_run(name)`); `reload()` gives a fresh model the way the runner
    loaded the first (the seed reset first). plae: the teacher trains the loaded model, so the main
    run (the student) trains a fresh one from the same start.
    """
    adv_cfg = getattr(ctx.cfg, "adversarial", None)
    if adv_cfg is None or adv_cfg.method != "plae" or not adv_cfg.resolved().active:
        return None
    stored = plae.prepare(ctx, stage.model_spec(ctx), loaded.model, plan, train)
    if stored is None:
        return Prepared(interrupted=True)
    return Prepared(stored=stored, loaded=reload())


def objective(inner: Any, cfg: Any, tokenizer: Any, say: Callable[[str], None],
              stored: Callable[[dict[str, Any], torch.Tensor], torch.Tensor] | None = None) -> Any:
    """Return the objective the loop should call: `inner`, or `inner` wrapped by adversarial training."""
    adv_cfg = getattr(cfg, "adversarial", None)
    if adv_cfg is None or adv_cfg.method == "none":
        return inner
    if adv_cfg.method == "plae" and stored is None:
        raise ConfigError("adversarial.method=plae works with classify only: it retrains on labelled adversarial "
                          "embeddings (for language modelling use fgm, pgd, freelb, smart, r3f, vat or neftune)")

    wrapped = Adversarial(inner, adv_cfg, special_ids=list(getattr(tokenizer, "all_special_ids", []) or []),
                          stored=stored)
    say(describe(wrapped.cfg))
    return wrapped
