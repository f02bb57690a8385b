"""What a booster is to honelm: a config section, the stage capabilities it needs, and its hooks.

A booster declares itself once (`Booster`, in its own module) and is listed in
`honelm.boosters.BOOSTERS`; the runner calls the hooks of every booster whose section a stage's
config has, so no stage wires a booster by hand and no booster knows a stage by name. What a
booster may need of a stage is said in capabilities, which a training stage's config declares
(`honelm.boosters.StageConfig.capabilities`):

- `LABELS`: the stage trains on labelled examples (classification or regression): plae
  retrains on labelled adversarial embeddings.
- `PAIRS`: the stage trains a pairwise loss on preference pairs, chosen and rejected as rows of
  one batch (reward, dpo): adversarial training perturbs both rows alike, and refuses the methods
  that do not fit such a loss (`Method.not_pairwise`).
- `ADAPTER_REFERENCE`: the stage's reference model is its own policy with the LoRA adapters
  disabled (DPO, PPO): LoRA must then start from the unchanged starting policy (no carried
  adapter, no init that rewrites the base).

Hooks, in the runner's order: `check` (config validation: refuse what the stage cannot give),
`transform` (the loaded model, e.g. LoRA's wrapper), `prepare` (a run of its own before the main
one, e.g. plae's teacher), `wrap` (the objective). When several boosters wrap the objective, the
first in `BOOSTERS` wraps innermost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from honelm.models import LoadedModel

LABELS = "labels"
PAIRS = "pairs"
ADAPTER_REFERENCE = "adapter_reference"

Say = Callable[[str], None]


@dataclass(frozen=True)
class Booster:
    """One booster: the config section it reads and what it does at each point of a run."""

    name: str
    section: str
    """The config section a stage config carries to offer this booster (e.g. `lora`)."""
    check: Callable[[Any, frozenset[str], str], None]
    """check(section, stage capabilities, stage name): raise ConfigError for what the stage cannot give."""
    transform: Callable[[LoadedModel, Any, str, Say], LoadedModel] | None = None
    """transform(loaded, section, model task, say) -> the record of the model to train."""
    carries: Callable[[Any], bool] | None = None
    """carries(section): the model loader must load the base of init_from's adapter and keep that adapter."""
    prepare: Callable[..., Any] | None = None
    """prepare(ctx, stage, loaded, plan, train, reload) -> Prepared | None: a run of its own before the main one."""
    wrap: Callable[[Any, Any, Any, Say, Any], Any] | None = None
    """wrap(objective, section, tokenizer, say, stored) -> the objective the loop calls."""
    lr_scale: Callable[[Any], Callable[[str], float] | None] | None = None
    """lr_scale(section) -> a trained parameter's learning-rate multiplier by its name, or None (all 1)."""
