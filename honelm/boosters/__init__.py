"""Boosters transform a model (LoRA) or wrap an objective (adversarial training).

`apply()` and `objective()` are the one place a stage hands its model, objective and config to
the boosters, so every stage gets the same behaviour: a stage config with a `lora` section gets
LoRA when `lora.enabled`; one with an `adversarial` section gets its method around the objective.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

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
