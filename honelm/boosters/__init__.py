"""Boosters transform a model (LoRA) or wrap an objective (adversarial training).

`apply()` is the one place a stage hands its model and config to the boosters, so every stage
gets the same behaviour: a stage config with a `lora` section gets LoRA when `lora.enabled`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


def apply(model: nn.Module, cfg: Any, task: str, say: Callable[[str], None]) -> nn.Module:
    """Return the model the loop should train (the same object when no booster applies)."""
    lora_cfg = getattr(cfg, "lora", None)
    if lora_cfg is not None and lora_cfg.enabled:
        from honelm.boosters.lora import apply_lora

        model = apply_lora(model, lora_cfg, task, say)
    return model
