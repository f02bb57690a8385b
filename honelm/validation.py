"""Bounded validation: periodic validations on a fixed subset, the whole validation set at the end.

On a large corpus a full validation can cost as much as the training between two of them (148k
documents: 2,151 validation blocks took 38 s against 53 s for the 70 steps between). A stage whose
validation is a `Validation` lets the loop cap it (`train.eval_max_batches`):

- the subset is fixed: the validation rows taken evenly spread over the split (row i*N/n for
  i < n), built once, so every periodic validation scores the same rows and the best-so-far
  comparison is between like numbers; a resumed run rebuilds the same subset (it depends on the
  config and the data only, never on timing);
- the default (auto, -1) caps a periodic validation at a third of the items trained between two
  of them (AUTO_SHARE): a validation item costs about a third of a training item (forward only;
  0.38 measured on a tiny decoder), so validation costs about an eighth of training time, well
  under a fifth; never below AUTO_MIN_BATCHES batches;
- the best model is chosen on the subset, its trainable weights kept in RUN/.best-weights.pt
  (best/ is not written from a subset); at the end of the run the best and the final model are
  both evaluated on the WHOLE validation set and the better one becomes best/, with those full
  numbers in best.json.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from honelm.config import TrainConfig

Scorer = Callable[[nn.Module], dict[str, float]]
AUTO_MIN_BATCHES = 4
"""The auto cap never goes below this many validation batches (a smaller subset would choose the best on noise)."""
AUTO_SHARE = 3
"""auto caps a periodic validation at 1/AUTO_SHARE of the items trained between two validations."""
BEST_WEIGHTS = ".best-weights.pt"


@dataclass
class Validation:
    """A validation the loop can cap. Called with a model, it scores every validation item (`full`);
    `subset(n)` builds, once, the scoring of a fixed subset of about n of its `items` and returns it with the
    subset's actual size (in the same unit: blocks, examples, pairs)."""

    full: Scorer
    subset: Callable[[int], tuple[Scorer, int]]
    items: int
    unit: str = "items"

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return self.full(model)


class Whole:
    """A validation that cannot be cut to a subset (a streamed corpus split): every item at every validation;
    `items` counts them for the log."""

    def __init__(self, score: Scorer, items: int) -> None:
        self.score, self.items = score, items

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return self.score(model)


def spread(rows: Sequence[Any], n: int) -> list[Any]:
    """n rows evenly spread over `rows` (row floor(i*N/n) for i < n): deterministic, and covering the whole split."""
    total = len(rows)
    if n >= total:
        return list(rows)
    return [rows[i * total // n] for i in range(max(n, 1))]


def rows_for(n_rows: int, n_items: int, cap: int) -> int:
    """How many of `n_rows` rows (documents) to take for about `cap` of the `n_items` items they encode to."""
    return max(1, math.ceil(n_rows * cap / max(n_items, 1)))


def eval_cap(cfg: TrainConfig, step_items: int) -> int:
    """Items a periodic validation may score (0: no cap): train.eval_max_batches batches of eval_batch_size, or
    with auto (-1) AUTO_SHARE of the items trained between two validations, at least AUTO_MIN_BATCHES batches."""
    if cfg.eval_max_batches > 0:
        return cfg.eval_max_batches * cfg.eval_batch_size
    if cfg.eval_max_batches == 0 or cfg.eval_every == 0:
        return 0
    return max(AUTO_MIN_BATCHES * cfg.eval_batch_size, cfg.eval_every * step_items // AUTO_SHARE)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters by name (frozen ones do not change in training: a best model differs from
    the final one in these only)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_best_weights(run_dir: Path, step: int, model: nn.Module) -> None:
    """RUN/.best-weights.pt: the trainable weights of the best model so far and its step (atomic)."""
    tmp = run_dir / f"{BEST_WEIGHTS}.{os.getpid()}"
    torch.save({"step": step, "weights": {k: v.detach().cpu() for k, v in trainable(model).items()}}, tmp)
    os.replace(tmp, run_dir / BEST_WEIGHTS)


def load_best_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor] | None:
    """The kept best weights when they are those of `step` (else None: the final model is the only candidate)."""
    path = run_dir / BEST_WEIGHTS
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["weights"] if saved.get("step") == step else None


def put_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the model's trainable parameters in place."""
    params = trainable(model)
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
