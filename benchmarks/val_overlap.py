"""How much of a run's validation split sits inside its train split, and what that does to validation accuracy.

    python benchmarks/val_overlap.py RUN [RUN ...]       # classify/distill runs on the same data settings

Phrase-level data (SST-2's train.tsv holds every sub-phrase of its sentences as a row of its own) split by row puts
sub-phrases of one sentence on both sides: a validation phrase the model saw as part of a train row is easier
than a new sentence, so validation overstates held-out accuracy and can rank models in the wrong order. Exact and
near duplicates (`data.dedup`) do not catch it, as a short phrase is neither equal nor similar to the sentence
holding it.

The first run's config rebuilds the split exactly as the run made it (`honelm.data.sources.labelled_splits`, its
data settings, the test file left out). A validation text counts as *inside* when its words occur as a contiguous
run in some longer train text: `honelm.data.splits.texts_inside`, the check behind the split log's line, here with
no window limit. For every RUN, its best checkpoint's
validation accuracy (`best/val_predictions.jsonl`) is given on all rows, on those inside and on the rest. Hand-run,
never by CI; a few seconds on SST-2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from honelm.data.sources import labelled_splits
from honelm.data.splits import texts_inside


def accuracy(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.4f} (n={len(flags)})" if flags else "- (n=0)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories trained on the same data settings")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    for run in runs:
        for needed in ("config.yaml", "best/val_predictions.jsonl"):
            if not (run / needed).is_file():
                raise SystemExit(f"{run}: no {needed}: give finished classify or distill run directories")
    data = yaml.safe_load((runs[0] / "config.yaml").read_text(encoding="utf-8"))["data"]
    splits = labelled_splits(SimpleNamespace(**{**data, "test": ""}), lambda line: None)
    val_texts = [e.text for e in splits.val]
    flags, _ = texts_inside([e.text for e in splits.train], val_texts, limit=sys.maxsize)
    assert flags is not None  # no limit
    n_in = sum(flags)
    print(f"validation: {len(val_texts)} rows; {n_in} ({100 * n_in / len(val_texts):.1f}%) occur inside a longer train row")
    for run in runs:
        rows = sorted((json.loads(x) for x in (run / "best" / "val_predictions.jsonl").read_text().splitlines()),
                      key=lambda r: r["i"])
        if len(rows) != len(val_texts):
            raise SystemExit(f"{run}: {len(rows)} validation predictions for {len(val_texts)} validation rows: "
                             "not the same data settings as the first run")
        ok = [r["gold"] == r["pred"] for r in rows]
        print(f"{run.name}: validation accuracy {accuracy(ok)}; inside a longer train row "
              f"{accuracy([o for o, f in zip(ok, flags) if f])}; not inside {accuracy([o for o, f in zip(ok, flags) if not f])}")


if __name__ == "__main__":
    main()
