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
`transform` (the loaded model, e.g. LoRA's wrapper), `calibrate` (settings measured on the starting
model, e.g. adversarial sizes relative to its embeddings), `prepare` (a run of its own before the
main one, e.g. plae's teacher), `wrap` (the objective). When several boosters wrap the objective,
the first in `BOOSTERS` wraps innermost.

One hook serves the protocol rather than a run: `space`, the booster's recommended search space
(LoRA's learning rate an order of magnitude up, an adversarial method's strength), which an
ablation's per-variant search starts from (`honelm.protocol.spaces`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from honelm.models import LoadedModel

LABELS = "labels"
PAIRS = "pairs"
ADAPTER_REFERENCE = "adapter_reference"

Say = Callable[[str], None]


@dataclass
class Space:
    """A search space as the boosters extend it: searched ranges and the settings they are meant with."""

    ranges: dict[str, Any] = field(default_factory=dict)
    """Dotted config key → a range mapping ({low, high, log} or {low, high, step}) or a list of choices: a search
    file's `space` entries."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Dotted config key → the value every trial sets alongside the ranges (adversarial.relative: true)."""


def range_around(value: float, factor: float) -> dict[str, Any]:
    """A log-scale range from value/factor to value·factor."""
    return {"low": value / factor, "high": value * factor, "log": True}


def scale_range(rng: Any, factor: float) -> Any:
    """A range mapping or a list of choices with every number multiplied by `factor` (a log range stays log)."""
    if isinstance(rng, list):
        return [v * factor for v in rng]
    if "values" in rng:
        return {**rng, "values": [v * factor for v in rng["values"]]}
    return {k: (v * factor if k in ("low", "high", "step") and v is not None else v) for k, v in rng.items()}


def widen_range(rng: Any, factor: float) -> Any:
    """A range reaching `factor` times higher at its top, its bottom kept (a log range stays log); a list of choices
    gets each choice times `factor` added."""
    if isinstance(rng, list):
        return sorted({*rng, *(v * factor for v in rng)})
    if "values" in rng:
        return {**rng, "values": sorted({*rng["values"], *(v * factor for v in rng["values"])})}
    return {**rng, "high": rng["high"] * factor}


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
    lr_hold: Callable[[Any], tuple[Callable[[str], bool], float] | None] | None = None
    """lr_hold(section) -> (which trained parameters wait, by name; the share of the run's first steps they wait at
    learning rate 0), or None (none waits)."""
    calibrate: Callable[[Any, Any, Any, Any, Say], Any] | None = None
    """calibrate(section, model, stream, tokenizer, say) -> the section with what depends on the model at hand
    measured on the starting model (before any checkpoint is restored), e.g. relative sizes made absolute."""
    space: Callable[[Any, Any, Space], Space] | None = None
    """space(section, stage config, space so far) -> the space a run with this booster searches: the one it is
    given with its own recommended ranges added or transformed (unchanged when the section leaves it off)."""
