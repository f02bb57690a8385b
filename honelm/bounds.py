"""The values a numeric config field allows, declared on the field itself and checked in one place.

A field states its range in its annotation: `batch_size: Annotated[int, at_least(1)] = 16`. The
config machinery (`honelm.config.validate`, run by every verb's `build` and by `from_mapping`
for the spec files) checks every declared `Bound` before any section's own `validate()` and
before anything runs, so a bad value is one line naming the key, the value and what is allowed:
`train.batch_size=0: must be an integer >= 1`. `typing.get_type_hints` drops `Annotated` unless
asked, so parsing and `--help` see the plain type. `tests/unit/test_bounds.py` walks every verb's
config and fails for a numeric field without a bound, so a new field cannot forget one.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from honelm.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """An interval of allowed values (`lo`/`hi`, inclusive unless `open_lo`/`open_hi`; None = unbounded),
    plus `also`: single values outside it that mean something (-1 = "derive it"), with `note` saying what."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    also: tuple[float, ...] = ()
    note: str = ""

    def allows(self, value: float) -> bool:
        """Whether `value` is in the interval or one of the special values."""
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.open_hi else value <= self.hi)

    def describe(self, integer: bool) -> str:
        """What is allowed, in words: "an integer >= 1", "a number in [0, 1)", "an integer >= 0, or -1 (...)"."""
        kind = "an integer" if integer else "a number"
        if self.lo is not None and self.hi is not None:
            text = f"{kind} in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"
        elif self.lo is not None:
            text = f"{kind} {'>' if self.open_lo else '>='} {self.lo:g}"
        elif self.hi is not None:
            text = f"{kind} {'<' if self.open_hi else '<='} {self.hi:g}"
        else:
            text = f"any {'integer' if integer else 'finite number'}"
        if self.also:
            text += ", or " + " or ".join(f"{v:g}" for v in self.also)
        return text + (f" ({self.note})" if self.note else "")


def at_least(lo: float, *also: float, note: str = "") -> Bound:
    """value >= lo (or one of `also`)."""
    return Bound(lo=lo, also=also, note=note)


def above(lo: float, note: str = "") -> Bound:
    """value > lo."""
    return Bound(lo=lo, open_lo=True, note=note)


def between(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False, note: str = "") -> Bound:
    """lo <= value <= hi, either end open on request."""
    return Bound(lo=lo, hi=hi, open_lo=open_lo, open_hi=open_hi, note=note)


PROBABILITY = between(0, 1)
"""A probability or a share: [0, 1]."""
DROPOUT = between(0, 1, open_hi=True)
"""A dropout rate: [0, 1) (1 would drop everything)."""
ANY = Bound()
"""Deliberately unbounded (a value any finite number of which means something, e.g. a search range's end)."""


def _is_numeric(tp: Any) -> bool:
    """int or float, alone or in a union (with None, str, a list...): the annotations a Bound applies to."""
    if tp in (int, float):
        return True
    return get_origin(tp) in (typing.Union, types.UnionType) and any(_is_numeric(a) for a in get_args(tp))


def numeric_fields(cls: type) -> list[str]:
    """The fields of a config dataclass whose values are numbers (a Bound is required on each)."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _is_numeric(hints[f.name])]


def bounds_of(cls: type) -> dict[str, Bound]:
    """Each field's declared Bound (from `Annotated[T, Bound]`)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    found = {}
    for f in dataclasses.fields(cls):
        extras = getattr(hints[f.name], "__metadata__", ())
        bound = next((x for x in extras if isinstance(x, Bound)), None)
        if bound is not None:
            found[f.name] = bound
    return found


def _integer(tp: Any) -> bool:
    """Whether a field's values are integers (an `int | float` field, a search range's end, is "a number")."""
    kinds = set(get_args(tp)) | {tp}
    return int in kinds and float not in kinds


def allowed(cls: type) -> dict[str, str]:
    """What each bounded field of `cls` allows, in words (for `--help`)."""
    hints = typing.get_type_hints(cls)
    return {name: bound.describe(_integer(hints[name])) for name, bound in bounds_of(cls).items()}


def check_bounds(cfg: Any, section: str = "") -> None:
    """Raise ConfigError for the first field of `cfg` (one section, not its subsections) outside its Bound.

    Non-numbers (None for "unset", a string of a str/int union, a list of seeds) are left to the
    section's own validate(); a list of numbers is checked item by item.
    """
    hints = typing.get_type_hints(type(cfg))
    for name, bound in bounds_of(type(cfg)).items():
        value = getattr(cfg, name)
        integer = _integer(hints[name])
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not bound.allows(item):
                key = f"{section}.{name}" if section else name
                raise ConfigError(f"{key}={item!r}: must be {bound.describe(integer)}")
