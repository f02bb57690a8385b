"""AdamW parameter groups and the learning-rate schedule as a pure function of the step.

Weight decay is decoupled (AdamW) and applies only to weight matrices: biases and norm weights
(1-D tensors) never decay, and embeddings decay only when asked (with tied embeddings, decaying
the input table also decays the output layer; METHODS.md section 6.3).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from honelm.config import TrainConfig


LrScale = Callable[[str], float]
"""A parameter's learning-rate multiplier, by its name (LoRA+'s B matrices: `lora.lr_ratio`)."""


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False,
                 lr_scale: LrScale | None = None, held: Callable[[str], bool] | None = None) -> list[dict]:
    """Decayed matrices, and everything else (biases, norms, maybe embeddings); each split again by
    learning-rate multiplier (`lr_scale`, kept in the group as `lr_scale`: `set_lr` applies it) and by
    whether the parameter waits at the start (`held`, kept as `held`: `set_lr(hold=True)` gives it lr 0)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[bool, float, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        decays = p.ndim >= 2 and (decay_embeddings or id(p) not in embedding_ids)
        key = (decays, float(lr_scale(name)) if lr_scale else 1.0, bool(held and held(name)))
        groups.setdefault(key, []).append(p)
    order = sorted(groups, key=lambda k: (not k[0], k[1], k[2]))  # decayed first, as the two groups always were
    return [{"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "lr_scale": k[1], "held": k[2]}
            for k in order]


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr_scale: LrScale | None = None,
                   held: Callable[[str], bool] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel on CUDA, torch's default elsewhere.

    Fused AdamW also exists for CPU and is faster in isolation, but the end-to-end pretrain
    benchmark measured honelm slower with it on this CPU (docs/benchmarks.md, second
    measurement); until profiled, CPU keeps the default implementation.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings, lr_scale, held)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    device = next(p for g in groups for p in g["params"]).device.type
    fused = True if device == "cuda" else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=fused)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps >= 0:
        return min(cfg.warmup_steps, total_steps)
    return int(round(cfg.warmup_ratio * total_steps))


def lr_at(step: int, *, peak: float, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning rate used for optimizer step `step` (0-based).

    Warmup: lr * (step + 1) / (warmup + 1), so the first step is not wasted at lr = 0.
    Then decay from peak to peak * min_ratio over the remaining steps, reaching the floor on the
    last step (the schedule is tied to the real step count; METHODS.md 6.3 item 5).
    """
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return peak
    span = max(total - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    floor = peak * min_ratio
    if schedule == "linear":
        return peak - (peak - floor) * progress
    if schedule == "cosine":
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, hold: bool = False) -> None:
    """The schedule's `lr` for every group, times the group's own multiplier (`param_groups`); with `hold`, 0 for
    the groups that wait (`held`). A held group's gradients still feed AdamW's moments: it only does not move."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if hold and group.get("held") else lr * group.get("lr_scale", 1.0)
