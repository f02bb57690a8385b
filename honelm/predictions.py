"""Per-example prediction files of classify runs: `RUN/test_predictions.jsonl`, `RUN/best/val_predictions.jsonl`.

One JSON object per example, in split order (`i` is the example's index in its split):

    classification: {"i": 0, "gold": 1, "pred": 1, "probs": [0.1, 0.9]}
    regression:     {"i": 0, "gold": 3.2, "pred": 2.9}

`gold` and `pred` are label ids for classification (names in `RUN/labels.json`, see
`write_labels`); `probs` is the softmax of the logits computed in fp32 and rounded to
`DECIMALS` places, so `pred` is the argmax of the unrounded probabilities. Regression `pred` is
the model output rounded to `DECIMALS` places; `gold` is the label as read from the data.

The writer is the classify stage (validation predictions of the best checkpoint) and
`honelm test` (test predictions); the readers are the report (confusion matrix, calibration) and
ablations (paired bootstrap over examples). This module imports no honelm module, so every one
of them can use it without import cycles.
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


def read_records(path: Path) -> list[dict[str, Any]]:
    """Parse and check a predictions file; raise ValueError naming file:line for anything malformed.

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
        for key in ("i", "gold", "pred"):
            if key not in row:
                raise ValueError(f"{path}:{lineno}: missing field {key!r}")
        if row["i"] != len(rows):
            raise ValueError(f"{path}:{lineno}: expected i={len(rows)}, found i={row['i']!r} "
                             "(rows must be in split order)")
        for key in ("gold", "pred"):
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{path}:{lineno}: field {key!r} is not a finite number: {value!r}")
        probs = row.get("probs")
        if probs is not None:
            if not isinstance(probs, list) or not probs or not all(
                    isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) for p in probs):
                raise ValueError(f"{path}:{lineno}: field 'probs' is not a non-empty list of finite numbers")
            if rows and len(probs) != len(rows[0].get("probs") or []):
                raise ValueError(f"{path}:{lineno}: {len(probs)} probabilities where earlier rows have "
                                 f"{len(rows[0].get('probs') or [])}")
            for key in ("gold", "pred"):  # classification: label ids, i.e. indices into probs
                if row[key] != int(row[key]) or not 0 <= row[key] < len(probs):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a label id in 0..{len(probs) - 1}, "
                                     f"found {row[key]!r}")
        elif rows and "probs" in rows[0]:
            raise ValueError(f"{path}:{lineno}: missing field 'probs' (earlier rows are classification rows)")
        rows.append(row)
    return rows


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
