"""Per-example record files: `RUN/test_predictions.jsonl`, `RUN/best/val_predictions.jsonl`.

One JSON object per example, in split order (`i` is the example's index in its split), of one
of two kinds. Predictions (classification and regression runs: classify, distill, prompt):

    classification: {"i": 0, "gold": 1, "pred": 1, "probs": [0.1, 0.9]}
    regression:     {"i": 0, "gold": 3.2, "pred": 2.9}

`gold` and `pred` are label ids for classification (names in `RUN/labels.json`, see
`write_labels`); `probs` is the softmax of the logits computed in fp32 and rounded to
`DECIMALS` places, so `pred` is the argmax of the unrounded probabilities. Regression `pred` is
the model output rounded to `DECIMALS` places; `gold` is the label as read from the data.

Scores (every other stage that validates: sft, pretrain, adapt, reward, dpo; `score_records`):

    per token:  {"i": 0, "units": 14, "sums": {"loss": 31.25}}
    per pair:   {"i": 0, "units": 1, "sums": {"loss": 0.41, "accuracy": 1.0, "margin": 0.52},
                 "chosen": 1.3, "rejected": 0.78}

`units` is what the stage's metrics average over (an example's target tokens; 1 for a pair) and
`sums` the example's sum of each metric over them, so a metric of a set of examples is
Σ sums[m] / Σ units: exactly the stage's own `val_m` / `test_m` (its validation loss is the
token-weighted mean of the examples' per-token losses). Other fields describe the example.

The writers are the stages (validation records of the best checkpoint, in the same atomic save
as best/) and `honelm test` (test records); the readers are the report (confusion matrix,
calibration), `compare` (predictions) and ablations (paired bootstrap over examples). This
module imports no honelm module, so every one of them can use it without import cycles.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # the readers (report, ablate) must not pay torch's import for a type hint
    import torch

DECIMALS = 6
TEST_FILE = "test_predictions.jsonl"
VAL_FILE = "val_predictions.jsonl"  # inside RUN/best/
LABELS_FILE = "labels.json"


def prediction_records(logits: torch.Tensor, gold: Sequence[int | float], regression: bool) -> list[dict[str, Any]]:
    """One record per row of `logits` ((N, C) classification, (N, 1) or (N,) regression) and its gold label."""
    if logits.shape[0] != len(gold):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(gold)} gold labels")
    # bf16 autocast logits would round the probabilities coarsely; softmax in fp32 as documented.
    values = logits.detach().float().cpu()
    if regression:
        preds = values.reshape(len(gold), -1)[:, 0].tolist()
        return [{"i": i, "gold": float(g), "pred": round(p, DECIMALS)} for i, (g, p) in enumerate(zip(gold, preds))]
    probs = values.softmax(-1)
    argmax = probs.argmax(-1).tolist()
    return [{"i": i, "gold": int(g), "pred": int(p), "probs": [round(x, DECIMALS) for x in row]}
            for i, (g, p, row) in enumerate(zip(gold, argmax, probs.tolist()))]


def dumps_records(records: Sequence[dict[str, Any]]) -> str:
    """The JSONL text of `records`, one object a line."""
    return "".join(json.dumps(r) + "\n" for r in records)


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write `records` as JSONL atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps_records(records), encoding="utf-8")
    os.replace(tmp, path)


def score_records(units: Sequence[float], sums: dict[str, Sequence[float]], first: int = 0,
                  **fields: Sequence[Any]) -> list[dict[str, Any]]:
    """One score record per example (see the module docstring), numbered from `first`: its `units`, its sum of each
    metric over them (`sums`: metric → one value per example), and each of `fields` (name → one value per example)."""
    n = len(units)
    if any(len(v) != n for v in [*sums.values(), *fields.values()]):
        raise ValueError(f"{n} examples, but not one value of every metric and field per example")
    return [{"i": first + i, "units": units[i], "sums": {m: round(float(v[i]), DECIMALS) for m, v in sums.items()},
             **{k: v[i] for k, v in fields.items()}} for i in range(n)]


def is_scores(records: Sequence[dict[str, Any]]) -> bool:
    """Score records carry `units` and `sums`; predictions carry `gold` and `pred`."""
    return bool(records) and "units" in records[0]


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Parse and check a records file (predictions or scores); raise ValueError naming file:line for anything malformed.

    Strict on purpose: a paired bootstrap or a confusion matrix over a silently shortened or
    reordered file would be wrong without looking wrong.
    """
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        if "i" not in row:
            raise ValueError(f"{path}:{lineno}: missing field 'i'")
        if row["i"] != len(rows):
            raise ValueError(f"{path}:{lineno}: expected i={len(rows)}, found i={row['i']!r} "
                             "(rows must be in split order)")
        if rows and ("units" in row) != ("units" in rows[0]):
            raise ValueError(f"{path}:{lineno}: a {'score' if 'units' in row else 'prediction'} record where earlier "
                             f"rows are {'score' if 'units' in rows[0] else 'prediction'} records")
        where = f"{path}:{lineno}"
        _check_score(row, rows, where) if "units" in row else _check_prediction(row, rows, where)
        rows.append(row)
    return rows


def _check_score(row: dict[str, Any], rows: list[dict[str, Any]], where: str) -> None:
    """A score record: finite `units` >= 0 (a masked-LM row may have no masked token), `sums` of finite numbers
    with the metrics of the first row."""
    if not _finite(row["units"]) or row["units"] < 0:
        raise ValueError(f"{where}: field 'units' is not a finite number >= 0: {row['units']!r}")
    sums = row.get("sums")
    if not isinstance(sums, dict) or not sums or not all(_finite(v) for v in sums.values()):
        raise ValueError(f"{where}: field 'sums' is not a non-empty mapping of metric names to finite numbers")
    if rows and set(sums) != set(rows[0]["sums"]):
        raise ValueError(f"{where}: sums of {', '.join(sorted(sums))} where earlier rows have "
                         f"{', '.join(sorted(rows[0]['sums']))}")


def _check_prediction(row: dict[str, Any], rows: list[dict[str, Any]], where: str) -> None:
    """A prediction record: finite `gold` and `pred`; classification `probs` and label ids that index them."""
    for key in ("gold", "pred"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
        if not _finite(row[key]):
            raise ValueError(f"{where}: field {key!r} is not a finite number: {row[key]!r}")
    probs = row.get("probs")
    if probs is not None:
        if not isinstance(probs, list) or not probs or not all(_finite(p) for p in probs):
            raise ValueError(f"{where}: field 'probs' is not a non-empty list of finite numbers")
        if rows and len(probs) != len(rows[0].get("probs") or []):
            raise ValueError(f"{where}: {len(probs)} probabilities where earlier rows have "
                             f"{len(rows[0].get('probs') or [])}")
        for key in ("gold", "pred"):  # classification: label ids, i.e. indices into probs
            if row[key] != int(row[key]) or not 0 <= row[key] < len(probs):
                raise ValueError(f"{where}: field {key!r} must be a label id in 0..{len(probs) - 1}, "
                                 f"found {row[key]!r}")
    elif rows and "probs" in rows[0]:
        raise ValueError(f"{where}: missing field 'probs' (earlier rows are classification rows)")


def is_classification(records: Sequence[dict[str, Any]]) -> bool:
    """Classification records carry `probs`; regression records do not."""
    return bool(records) and all("probs" in r for r in records)


def labels_text(id2label: dict[int, str] | None) -> str:
    """The text of `RUN/labels.json`: `{"task": "classification", "id2label": {"0": "neg", ...}}` or `{"task": "regression"}`."""
    payload: dict[str, Any] = {"task": "regression"} if id2label is None else {
        "task": "classification", "id2label": {str(i): name for i, name in sorted(id2label.items())}}
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


def write_labels(run_dir: Path, id2label: dict[int, str] | None) -> None:
    """Write `RUN/labels.json` (`labels_text`)."""
    (run_dir / LABELS_FILE).write_text(labels_text(id2label), encoding="utf-8")


def read_labels(run_dir: Path) -> dict[int, str] | None:
    """id → label name from `RUN/labels.json`; None when absent or a regression run; ValueError if malformed."""
    path = run_dir / LABELS_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    mapping = payload.get("id2label") if isinstance(payload, dict) else None
    if mapping is None:
        return None
    try:
        return {int(k): str(v) for k, v in mapping.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{path}: 'id2label' must map integer ids to names") from None
