"""The data section every stage config shares, and how it becomes train / validation / test splits.

`SplitDataConfig` holds where the data comes from and how it is split; `text_splits` (documents
for language modelling) and `labelled_splits` (labelled examples, stratified by label) read the
files and split them by content (honelm.data.splits). The test split inside is sealed: only
`honelm test` opens it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from honelm.data.readers import read_documents, read_examples
from honelm.data.splits import make_splits, parse_ratios
from honelm.errors import ConfigError


@dataclass
class SplitDataConfig:
    """Where the data comes from and how it is split into train / validation / test."""

    train: str = ""
    """Training data: a file, directory or glob (comma-separated for several), or a dataset by name: hf:NAME[:CONFIG][@SPLIT] (hf:/saved/dir for one written by save_to_disk; docs/export.md)."""
    val: str = ""
    """Validation data file (or hf:...@validation); empty = split off the training data by data.split."""
    test: str = ""
    """Test data file (or hf:...@test), read only by `honelm test`; empty = split off the training data."""
    split: str = "8:1:1"
    """train:val:test ratios for what is split off (8:1:1 default; 6:2:2 accepted)."""
    seed: int = 0
    """Split seed, separate from run.seed so training seeds never change the split."""
    dedup: bool = False
    """Remove from train the exact and near duplicates of validation/test texts (always reported)."""
    near_dup_threshold: float = 0.8
    """Jaccard similarity of word 3-gram shingles at or above which two texts count as near duplicates (one changed word in 20 gives about 0.7)."""


def text_splits(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """Documents for language modelling, split by data.split (or the given val/test files)."""
    if not data.train:
        raise ConfigError("data.train is empty: give a text file, directory or glob")
    docs = read_documents(data.train.split(","), unit=data.unit, text_field=data.text_field)
    val = read_documents(data.val.split(","), unit=data.unit, text_field=data.text_field) if data.val else None
    load_test = (lambda: read_documents(data.test.split(","), unit=data.unit, text_field=data.text_field)) \
        if data.test else None
    splits = make_splits(docs, ratios=parse_ratios(data.split), seed=data.seed, stratify=False, val=val,
                         load_test=load_test, test_path=data.test.split(",") if data.test else None, dedup=data.dedup,
                         near_dup_threshold=data.near_dup_threshold, test_texts_for_leak_check=leak_texts)
    say_split(splits.manifest, say)
    return splits


def labelled_splits(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """Labelled examples, split stratified by label (classification) by data.split.

    `leak_texts` (the texts of a user-supplied test file) is passed only by `honelm test`, which
    has already opened that file: training never reads it, so its duplicates are found then.
    """
    if not data.train:
        raise ConfigError("data.train is empty: give a labelled JSONL/JSON/CSV/TSV/Parquet file")
    fields = dict(text_field=data.text_field, pair_field=data.pair_field or None, label_field=data.label_field,
                  task=data.task)
    examples = read_examples(data.train, **fields)
    val = read_examples(data.val, **fields) if data.val else None
    load_test = (lambda: read_examples(data.test, **fields)) if data.test else None
    splits = make_splits(examples, ratios=parse_ratios(data.split), seed=data.seed,
                         stratify=data.task == "classification", val=val, load_test=load_test,
                         test_path=data.test or None, dedup=data.dedup, near_dup_threshold=data.near_dup_threshold,
                         test_texts_for_leak_check=leak_texts)
    say_split(splits.manifest, say)
    return splits


def say_split(manifest: dict, say: Callable[[str], None]) -> None:
    counts = manifest.get("counts", {})
    dup = manifest.get("duplicates", {})
    exact = dup.get("exact", {}).get("count", 0)
    near = dup.get("near", {}).get("count", 0)
    removed = manifest.get("dedup", {}).get("removed_from_train", 0)
    say(f"split: train {counts.get('train')}, val {counts.get('val')}, test {counts.get('test')}; "
        f"across splits {exact} exact and {near} near duplicates" + (f", {removed} removed from train" if removed else
                                                                     " (data.dedup=true removes them from train)" if exact + near else ""))
