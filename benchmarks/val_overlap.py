"""How much of a run's validation split sits inside its train split, and what that does to validation accuracy.

    python benchmarks/val_overlap.py RUN [RUN ...]       # classify/distill runs on the same data settings

Phrase-level data (SST-2's train.tsv holds every sub-phrase of its sentences as a row of its own) split by row puts
sub-phrases of one sentence on both sides: a validation phrase the model saw as part of a train row is easier
than a new sentence, so validation overstates held-out accuracy and can rank models in the wrong order. Exact and
near duplicates (`data.dedup`) do not catch it, as a short phrase is neither equal nor similar to the sentence
holding it.

The first run's config rebuilds the split exactly as the run made it (`honelm.data.sources.labelled_splits`, its
data settings, the test file left out). A validation text counts as *inside* when its words (after
`normalize_for_dedup`) occur as a contiguous run in some train text. For every RUN, its best checkpoint's
validation accuracy (`best/val_predictions.jsonl`) is given on all rows, on those inside and on the rest. Hand-run,
never by CI; a few seconds on SST-2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import yaml

from honelm.data.sources import labelled_splits
from honelm.data.splits import normalize_for_dedup


def words(text: str) -> list[str]:
    return normalize_for_dedup(text).split()


def inside_train(train_texts: list[str], val_texts: list[str]) -> list[bool]:
    """For each validation text: whether its words occur as a contiguous run in some train text. Only windows as
    long as some validation text are formed, so the cost is the train words times the distinct validation lengths."""
    wanted = {" ".join(words(t)) for t in val_texts}
    lengths = sorted({len(w.split()) for w in wanted if w})
    found: set[str] = set()
    for text in train_texts:
        w = words(text)
        for n in lengths:
            if n > len(w):
                break
            for i in range(len(w) - n + 1):
                window = " ".join(w[i:i + n])
                if window in wanted:
                    found.add(window)
    return [" ".join(words(t)) in found for t in val_texts]


def accuracy(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.4f} (n={len(flags)})" if flags else "- (n=0)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories trained on the same data settings")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    data = yaml.safe_load((runs[0] / "config.yaml").read_text(encoding="utf-8"))["data"]
    splits = labelled_splits(SimpleNamespace(**{**data, "test": ""}), lambda line: None)
    val_texts = [e.text for e in splits.val]
    flags = inside_train([e.text for e in splits.train], val_texts)
    n_in = sum(flags)
    print(f"validation: {len(val_texts)} rows; {n_in} ({100 * n_in / len(val_texts):.1f}%) occur inside a train row")
    for run in runs:
        rows = sorted((json.loads(x) for x in (run / "best" / "val_predictions.jsonl").read_text().splitlines()),
                      key=lambda r: r["i"])
        if len(rows) != len(val_texts):
            raise SystemExit(f"{run}: {len(rows)} validation predictions for {len(val_texts)} validation rows: "
                             "not the same data settings as the first run")
        ok = [r["gold"] == r["pred"] for r in rows]
        print(f"{run.name}: validation accuracy {accuracy(ok)}; inside a train row "
              f"{accuracy([o for o, f in zip(ok, flags) if f])}; not inside {accuracy([o for o, f in zip(ok, flags) if not f])}")


if __name__ == "__main__":
    main()
