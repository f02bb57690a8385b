"""Answer checkers: rewards that compare a response with its prompt row's own reference answer.

This module owns the kinds `reward.function` / `reward.checks` accept (`honelm.rl.rewards` turns
them into a scorer) and the answer extraction they share. A spec is `KIND` or `KIND:ARG`; in
`reward.checks` it may start with a weight, `W*KIND:ARG` (e.g. `0.2*max_length:32`).

Fixed-string rewards (no reference needed):
    contains:TEXT     1 if the response contains TEXT, else 0
    regex:PATTERN     1 if PATTERN matches somewhere in the response, else 0
    token:ID          how many times token id ID occurs in the response (up to and including EOS)
    json[:SCHEMA]     1 if the response (or its first {...} block) is valid JSON; with SCHEMA, a JSON
                      object {"key": "type"} (str, int, float, number, bool, list, object, null),
                      only if it is an object holding every key with a value of that type
    max_length:N      penalty −max(0, n − N)/N for a response of n tokens (EOS not counted)
    format:PATTERN    penalty: 0 if the whole stripped response matches PATTERN, else −1
Rewards against the row's reference answer (a row's `answer` field, else its reply: alpaca
`output`, a `completion`, a final assistant turn):
    exact             1 if the (marked) answer equals the reference after normalisation
                      (case, surrounding whitespace and punctuation, repeated spaces)
    numeric[:TOL]     1 if the response's number is within TOL (default 1e-6) of the reference:
                      a marked answer (`#### 42`, `\\boxed{42}`, `Answer: 42`) if there is one,
                      else the last number in the response
    capture:PATTERN   1 if PATTERN's first group (the whole match without one) equals the reference
                      after normalisation
    label[:A|B|...]   classification by generation: 1 if the first label word in the response is the
                      reference (with a list, the first of those words found; without, the first word)
    python:MOD:FUNC   `FUNC(prompt, response, row) -> float` from module MOD (importable); `row` holds
                      the prompt row's fields with `answer` set to its reference

A response is *correct* (the accuracy reported beside the reward) when every reference check of the
reward gives it a positive score. Checks needing a reference refuse, when the prompts are read, a
row without one or with one they cannot use (naming file and line).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from honelm.errors import ConfigError, DataError, HonelmError

# the number formats a response may state: 1,234.5  -3  .5  2e-3
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
MARKED = (re.compile(r"####\s*([^\n]+)"), re.compile(r"\\boxed\{([^{}]*)\}"),
          re.compile(r"answer(?:\s+is|\s*[:=])\s*([^\n]+)", re.IGNORECASE))
JSON_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (float,), "number": (int, float),
                                           "bool": (bool,), "list": (list,), "object": (dict,), "null": (type(None),)}


@dataclass(frozen=True)
class Response:
    """What a check sees of one response: the prompt, the decoded text, the tokens, the row it answers."""

    prompt: Any  # chat messages or the plain-text prompt
    text: str
    token_ids: list[int]  # up to and including the first EOS
    ended: bool
    reference: str | None
    row: dict[str, Any]
    source: str
    line: int


@dataclass(frozen=True)
class Check:
    """One parsed check: its spec, weight, scoring function and what it needs of a prompt row."""

    spec: str
    weight: float
    score: Callable[[Response], float]
    needs_reference: bool = False
    check_row: Callable[[str, str, int], None] | None = None  # (reference, source, line) → raises DataError


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or punctuation: what `exact` compares."""
    return re.sub(r"\s+", " ", text.strip().strip(".,;:!?\"'`").strip()).lower()


def marked_answer(text: str) -> str | None:
    """The last explicitly marked answer (`#### x`, `\\boxed{x}`, `Answer: x`), or None."""
    for pattern in MARKED:
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return None


def parse_number(text: str) -> float | None:
    """The number `text` is (commas as thousands separators allowed), or None."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def response_number(text: str) -> float | None:
    """The number a response answers with: its marked answer's first number, else its last number."""
    marked = marked_answer(text)
    where = marked if marked is not None else text
    numbers = [m.group(0) for m in NUMBER.finditer(where) if any(c.isdigit() for c in m.group(0))]
    if not numbers:
        return None
    return parse_number(numbers[0] if marked is not None else numbers[-1])


def _json_value(text: str) -> Any:
    """The response as JSON, or its first {...} block as JSON; raises ValueError when neither parses."""
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        start, end = stripped.find("{"), stripped.rfind("}")
        if start < 0 or end <= start:
            raise
        return json.loads(stripped[start:end + 1])


def _schema(spec: str, arg: str) -> dict[str, tuple[type, ...]]:
    try:
        raw = json.loads(arg)
    except ValueError as e:
        raise ConfigError(f"{spec!r}: the schema must be a JSON object {{\"key\": \"type\"}}: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(t, str) and t in JSON_TYPES for t in raw.values()):
        raise ConfigError(f"{spec!r}: the schema maps keys to one of {', '.join(JSON_TYPES)}")
    return {k: JSON_TYPES[t] for k, t in raw.items()}


def _matches(value: Any, schema: dict[str, tuple[type, ...]]) -> bool:
    if not isinstance(value, dict):
        return False
    for key, types in schema.items():
        if key not in value:
            return False
        v = value[key]
        if isinstance(v, bool) and bool not in types:  # JSON true is not a number here
            return False
        if not isinstance(v, types):
            return False
    return True


def json_check(spec: str, arg: str) -> Callable[[Response], float]:
    schema = _schema(spec, arg) if arg else None

    def score(r: Response) -> float:
        try:
            value = _json_value(r.text)
        except ValueError:
            return 0.0
        return float(schema is None or _matches(value, schema))
    return score


def _compile(spec: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{spec!r}: invalid regex: {e}") from None


def _needs_number(reference: str, source: str, line: int) -> None:
    if parse_number(reference) is None:
        raise DataError(source, line, "answer", f"{reference!r} is not a number (reward check numeric)")


def numeric_check(spec: str, arg: str) -> Callable[[Response], float]:
    try:
        tol = float(arg) if arg else 1e-6
    except ValueError:
        raise ConfigError(f"{spec!r}: numeric takes a tolerance, e.g. numeric:0.01, got {arg!r}") from None
    if not tol >= 0:
        raise ConfigError(f"{spec!r}: the tolerance must be >= 0")

    def score(r: Response) -> float:
        got = response_number(r.text)
        want = parse_number(r.reference or "")
        return float(got is not None and want is not None and abs(got - want) <= tol)
    return score


def capture_check(spec: str, arg: str) -> Callable[[Response], float]:
    pattern = _compile(spec, arg)

    def score(r: Response) -> float:
        found = pattern.search(r.text)
        if found is None:
            return 0.0
        got = found.group(1) if pattern.groups else found.group(0)
        return float(got is not None and normalise(got) == normalise(r.reference or ""))
    return score


def exact_check(r: Response) -> float:
    marked = marked_answer(r.text)
    return float(normalise(marked if marked is not None else r.text) == normalise(r.reference or ""))


def label_check(spec: str, arg: str) -> tuple[Callable[[Response], float], Callable[[str, str, int], None] | None]:
    labels = [normalise(x) for x in arg.split("|")] if arg else []
    if arg and not all(labels):
        raise ConfigError(f"{spec!r}: empty label in the list")
    words = re.compile(r"[\w'-]+")

    def score(r: Response) -> float:
        found = [w.lower() for w in words.findall(r.text)]
        if labels:
            found = [w for w in found if w in labels]
        return float(bool(found) and found[0] == normalise(r.reference or ""))

    def check_row(reference: str, source: str, line: int) -> None:
        if normalise(reference) not in labels:
            raise DataError(source, line, "answer", f"{reference!r} is not one of the labels {arg} (reward check {spec})")
    return score, (check_row if labels else None)


def int_arg(spec: str, arg: str, what: str, low: int) -> int:
    """ARG of a KIND:ARG check as an integer >= `low`, or a ConfigError naming the check and what it needs."""
    try:
        value = int(arg)
    except ValueError:
        raise ConfigError(f"{spec!r}: needs {what} (an integer >= {low}), got {arg!r}") from None
    if value < low:
        raise ConfigError(f"{spec!r}: {what} must be >= {low}, got {value}")
    return value


def length_check(spec: str, arg: str) -> Callable[[Response], float]:
    limit = int_arg(spec, arg, "a token count", 1)

    def score(r: Response) -> float:
        n = len(r.token_ids) - int(r.ended)  # EOS is not part of the answer's length
        return -max(0, n - limit) / limit
    return score


def python_check(spec: str, arg: str) -> Callable[[Response], float]:
    module, sep, name = arg.rpartition(":")
    if not sep or not module or not name:
        raise ConfigError(f"{spec!r}: expected python:MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{spec!r}: cannot load {module}:{name}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{spec!r}: {module}:{name} is not callable")

    def score(r: Response) -> float:
        try:
            value = fn(r.prompt, r.text, r.row)
        except Exception as e:  # a user's checker: any failure is reported with the row it failed on
            raise HonelmError(f"reward check {spec} raised {type(e).__name__}: {e} on the prompt at "
                              f"{r.source}:{r.line}") from e
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HonelmError(f"reward check {spec} returned {value!r} (not a finite number) for the prompt at "
                              f"{r.source}:{r.line}")
        return float(value)
    return score


def _fixed(spec: str, kind: str, arg: str) -> Callable[[Response], float] | None:
    """The kinds that need no reference; None for another kind."""
    if kind == "contains":
        return lambda r: float(arg in r.text)
    if kind == "regex":
        pattern = _compile(spec, arg)
        return lambda r: float(pattern.search(r.text) is not None)
    if kind == "token":
        token = int_arg(spec, arg, "a token id", 0)
        return lambda r: float(sum(1 for t in r.token_ids if t == token))
    if kind == "format":
        pattern = _compile(spec, arg)
        return lambda r: 0.0 if pattern.fullmatch(r.text.strip()) else -1.0
    builders: dict[str, Callable[[str, str], Callable[[Response], float]]] = {
        "json": json_check, "max_length": length_check, "python": python_check}
    return builders[kind](spec, arg) if kind in builders else None


KINDS = ("contains", "regex", "token", "json", "max_length", "format", "exact", "numeric", "capture", "label", "python")
NEEDS_ARG = ("contains", "regex", "token", "max_length", "format", "capture", "python")


def parse_check(spec: str, weight: float = 1.0) -> Check:
    """`KIND[:ARG]` → a `Check` (see the module doc for the kinds); ConfigError naming the spec otherwise."""
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"reward check {spec!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind in NEEDS_ARG and not arg:
        raise ConfigError(f"reward check {spec!r}: {kind} needs an argument ({kind}:...)")
    fixed = _fixed(spec, kind, arg)
    if fixed is not None:
        return Check(spec, weight, fixed)
    if kind == "exact":
        return Check(spec, weight, exact_check, needs_reference=True)
    if kind == "numeric":
        return Check(spec, weight, numeric_check(spec, arg), needs_reference=True, check_row=_needs_number)
    if kind == "capture":
        return Check(spec, weight, capture_check(spec, arg), needs_reference=True)
    score, check_row = label_check(spec, arg)
    return Check(spec, weight, score, needs_reference=True, check_row=check_row)


def parse_weighted(item: str) -> Check:
    """`[W*]KIND[:ARG]` (an item of reward.checks) → a weighted `Check`."""
    head, star, rest = item.partition("*")
    if star and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", head):
        return parse_check(rest.strip(), float(head))
    return parse_check(item.strip())
