"""Boosters as registered plug-ins: LoRA transforms the model, adversarial training wraps the objective.

Each booster declares itself (`honelm.boosters.base.Booster`: its config section, a check of what
it needs from a stage, and its hooks) and is listed once in `BOOSTERS`. The runner calls the
functions below for every stage, so a stage config that carries a booster's section gets that
booster with no wiring of its own; a training stage's config derives from `StageConfig`, whose
validation checks the stage × booster matrix once (`check`), before any work starts. Order: model
transforms and wrappers run in `BOOSTERS` order (the first wraps the objective innermost); only
the first booster whose `prepare` has work runs a run of its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

from honelm.boosters import adversarial, lora, plae
from honelm.boosters.base import Booster, Say, Space
from honelm.boosters.plae import Prepared
from honelm.models import LoadedModel

ADVERSARIAL = Booster("adversarial", "adversarial", check=adversarial.check, prepare=plae.prepare_hook,
                      wrap=adversarial.wrap, calibrate=adversarial.calibrate, space=adversarial.space)
BOOSTERS: tuple[Booster, ...] = (lora.BOOSTER, ADVERSARIAL)
"""Every booster, in the order their hooks run."""

__all__ = ["BOOSTERS", "Booster", "Prepared", "Space", "StageConfig", "apply", "calibrate", "carries_adapter", "check",
           "lr_hold", "lr_scale", "objective", "prepare", "search_space"]


class StageConfig:
    """Base of a training stage's config: validating it checks the stage × booster matrix.

    A subclass sets `verb` (its stage's name, for messages) and `capabilities` (what it offers a
    booster: honelm.boosters.base.LABELS, ADAPTER_REFERENCE); a subclass with a `validate()` of its
    own calls `super().validate()`.
    """

    verb: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def validate(self) -> None:
        check(self)


def _active(cfg: Any) -> list[tuple[Booster, Any]]:
    """The boosters whose section `cfg` carries, with that section, in `BOOSTERS` order."""
    return [(b, getattr(cfg, b.section)) for b in BOOSTERS if getattr(cfg, b.section, None) is not None]


def check(cfg: Any) -> None:
    """Every booster's check against the capabilities of the stage whose config `cfg` is (ConfigError)."""
    capabilities = getattr(type(cfg), "capabilities", frozenset())
    stage = getattr(type(cfg), "verb", "") or "this stage"
    for booster, section in _active(cfg):
        booster.check(section, capabilities, stage)


def carries_adapter(cfg: Any) -> bool:
    """Whether the model loader keeps init_from's adapter (a booster asks for it: `lora.carry`)."""
    return any(b.carries(section) for b, section in _active(cfg) if b.carries is not None)


def apply(loaded: LoadedModel, cfg: Any, task: str, say: Say) -> LoadedModel:
    """The record of the model the loop should train, after every booster's transform."""
    for booster, section in _active(cfg):
        if booster.transform is not None:
            loaded = booster.transform(loaded, section, task, say)
    return loaded


def calibrate(cfg: Any, loaded: LoadedModel, plan: Any, tokenizer: Any, say: Say) -> Any:
    """`cfg`, or a copy whose booster sections are measured on the starting model (`Booster.calibrate`)."""
    for booster, section in _active(cfg):
        if booster.calibrate is not None:
            measured = booster.calibrate(section, loaded.model, plan.stream, tokenizer, say)
            if measured is not section:
                cfg = dataclasses.replace(cfg, **{booster.section: measured})
    return cfg


def search_space(cfg: Any, base: Space) -> Space:
    """The space a run with `cfg` searches: `base` through every booster's `space` hook, in `BOOSTERS` order."""
    for booster, section in _active(cfg):
        if booster.space is not None:
            base = booster.space(section, cfg, base)
    return base


def prepare(ctx: Any, stage: Any, loaded: LoadedModel, plan: Any, train: Callable[..., Any],
            reload: Callable[[], LoadedModel]) -> Prepared | None:
    """A booster's run before the main one (plae's teacher); None when no booster has such work."""
    for booster, _ in _active(ctx.cfg):
        if booster.prepare is not None:
            prepared = booster.prepare(ctx, stage, loaded, plan, train, reload)
            if prepared is not None:
                return prepared
    return None


def lr_scale(cfg: Any) -> Callable[[str], float] | None:
    """The product of every booster's learning-rate multipliers, by parameter name; None when no booster has any."""
    scales = [f for b, section in _active(cfg) if b.lr_scale is not None and (f := b.lr_scale(section)) is not None]
    if not scales:
        return None
    return lambda name: math.prod(f(name) for f in scales)


def lr_hold(cfg: Any) -> tuple[Callable[[str], bool], float] | None:
    """The parameters that wait at learning rate 0 for the first share of the steps (LoRA's `lora.head_first`):
    (by name, share), the longest share when several boosters hold some; None when none does."""
    holds = [h for b, section in _active(cfg) if b.lr_hold is not None and (h := b.lr_hold(section)) is not None]
    if not holds:
        return None
    waits = [w for w, _ in holds]
    return (lambda name: any(w(name) for w in waits)), max(share for _, share in holds)


def objective(inner: Any, cfg: Any, tokenizer: Any, say: Say, stored: Any = None) -> Any:
    """The objective the loop should call: `inner` wrapped by every booster that wraps objectives."""
    for booster, section in _active(cfg):
        if booster.wrap is not None:
            inner = booster.wrap(inner, section, tokenizer, say, stored)
    return inner
