"""Boosters transform a model (LoRA) or wrap an objective (adversarial training).

`apply()` and `objective()` are the one place a stage hands its model, objective and config to
the boosters, so every stage gets the same behaviour: a stage config with a `lora` section gets
LoRA when `lora.enabled`; one with an `adversarial` section gets its method around the objective.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from torch import nn


def apply(model: nn.Module, cfg: Any, task: str, say: Callable[[str], None]) -> nn.Module:
    """Return the model the loop should train (the same object when no booster applies)."""
    lora_cfg = getattr(cfg, "lora", None)
    if lora_cfg is not None and lora_cfg.enabled:
        from honelm.boosters.lora import apply_lora

        model = apply_lora(model, lora_cfg, task, say)
    return model


def objective(inner: Any, cfg: Any, tokenizer: Any, say: Callable[[str], None],
              stored: Callable[[dict[str, Any], torch.Tensor], torch.Tensor] | None = None) -> Any:
    """Return the objective the loop should call: `inner`, or `inner` wrapped by adversarial training."""
    adv_cfg = getattr(cfg, "adversarial", None)
    if adv_cfg is None or adv_cfg.method == "none":
        return inner
    from honelm.boosters.adversarial import Adversarial, describe
    from honelm.errors import ConfigError

    if adv_cfg.method == "plae" and stored is None:
        raise ConfigError("adversarial.method=plae works with classify only: it retrains on labelled adversarial "
                          "embeddings (for language modelling use fgm, pgd, freelb, smart, r3f, vat or neftune)")

    wrapped = Adversarial(inner, adv_cfg, special_ids=list(getattr(tokenizer, "all_special_ids", []) or []),
                          stored=stored)
    say(describe(wrapped.cfg))
    return wrapped
