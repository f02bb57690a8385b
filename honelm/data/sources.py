"""The data section every stage config shares, and how it becomes train / validation / test splits.

`SplitDataConfig` holds where the data comes from and how it is split; `text_splits` (documents
for language modelling) and `labelled_splits` (labelled examples, stratified by label) read the
files and split them by content (honelm.data.splits). The test split inside is sealed: only
`honelm test` opens it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Sequence

from honelm.bounds import at_least, between
from honelm.config import FieldError
from honelm.data.readers import BadRows, BadRowsError, read_documents, read_examples
from honelm.data.splits import make_splits, parse_ratios, val_inside_train
from honelm.errors import ConfigError, DataError
from honelm.tracking import phase


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
    """train:val:test ratios for what is split off (8:1:1 default; 6:2:2 accepted; 9:1:0 = no test share): three non-negative numbers, train > 0, and validation gets a share unless data.val gives a file."""
    seed: Annotated[int, at_least(0)] = 0
    """Split seed, separate from run.seed so training seeds never change the split."""
    dedup: bool = False
    """Remove from train the exact and near duplicates of validation/test texts (always reported)."""
    near_dup_threshold: Annotated[float, between(0, 1, open_lo=True)] = 0.8
    """Jaccard similarity of word 3-gram shingles at or above which two texts count as near duplicates (one changed word in 20 gives about 0.7)."""
    skip_bad_rows: bool = False
    """Leave out rows that fail validation (counted, the first few in the log and in split_manifest.json's skipped_rows) instead of stopping with the list of them."""

    def validate(self) -> None:
        """data.split: three non-negative numbers, train > 0, and a validation share unless data.val gives one."""
        try:
            ratios = parse_ratios(self.split)
        except ValueError as e:
            raise FieldError("split", f"{self.split!r}: {str(e).split(': ', 1)[-1]}; write "
                             "train:val:test, e.g. 8:1:1 (9:1:0 = no test share)") from None
        if ratios[1] == 0 and not self.val:
            raise FieldError("split", f"{self.split!r} leaves nothing for validation: give validation a share "
                             "(e.g. 8:1:1) or a validation file (data.val)")


def skipping(data: Any) -> BadRows:
    """Where a split's bad rows go: raised together, or left out with data.skip_bad_rows."""
    return BadRows(skip=bool(getattr(data, "skip_bad_rows", False)))


def report_skipped(bad: BadRows, manifest: dict, say: Callable[[str], None]) -> None:
    """The rows data.skip_bad_rows left out: their count and the first few in the manifest and the log."""
    if bad.errors:
        manifest["skipped_rows"] = bad.record()
        bad.say(say)


def read_test_later(read: Callable[[BadRows], list[Any]], data: Any,
                    say: Callable[[str], None]) -> Callable[[], list[Any]]:
    """`load_test` for make_splits: the test file read (only by `honelm test`), its skipped rows said."""
    def load() -> list[Any]:
        bad = skipping(data)
        rows = read(bad)
        bad.check()
        bad.say(say)
        return rows
    return load


SPLITTING = "splitting (content hashes, exact and near-duplicate scan)"


def text_splits(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """Documents for language modelling, split by data.split (or the given val/test files)."""
    if not data.train:
        raise ConfigError("data.train is empty: give a text file, directory or glob")
    bad = skipping(data)

    def read(spec: str, bad: BadRows) -> list[Any]:
        return read_documents(spec.split(","), unit=data.unit, text_field=data.text_field, bad=bad)

    with phase(say, f"reading {data.train}" + (f" and {data.val}" if data.val else "")):
        docs = read(data.train, bad)
        val = read(data.val, bad) if data.val else None
    bad.check()
    load_test = read_test_later(lambda b: read(data.test, b), data, say) if data.test else None
    with phase(say, SPLITTING):
        splits = make_splits(docs, ratios=parse_ratios(data.split), seed=data.seed, stratify=False, val=val,
                             load_test=load_test, test_path=data.test.split(",") if data.test else None,
                             dedup=data.dedup, near_dup_threshold=data.near_dup_threshold,
                             test_texts_for_leak_check=leak_texts)
    report_skipped(bad, splits.manifest, say)
    say_split(splits.manifest, say)
    check_not_empty(splits.manifest, data)
    return splits


def labelled_splits(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None,
                    section: str = "data") -> Any:
    """Labelled examples, split stratified by label (classification) by data.split.

    `leak_texts` (the texts of a user-supplied test file) is passed only by `honelm test`, which
    has already opened that file: training never reads it, so its duplicates are found then.
    `section` is the config section `data` came from (adapt's task text is `task`), for the keys errors name.
    """
    if not data.train:
        raise ConfigError("data.train is empty: give a labelled JSONL/JSON/CSV/TSV/Parquet file")
    fields = dict(text_field=data.text_field, pair_field=data.pair_field or None, label_field=data.label_field,
                  task=data.task)
    bad = skipping(data)
    with phase(say, f"reading {data.train}" + (f" and {data.val}" if data.val else "")):
        try:  # a file in which no row is good raises here, before the other file is read
            examples = read_examples(data.train, **fields, bad=bad)
            val = read_examples(data.val, **fields, bad=bad) if data.val else None
        except BadRowsError as e:
            raise _name_the_field_key(e, data, section) from None
    bad.check()
    if data.task == "classification":
        check_two_classes(examples, data, section)
        warn_about_labels(examples + (val or []), say)
    load_test = read_test_later(lambda b: read_examples(data.test, **fields, bad=b), data, say) if data.test else None
    with phase(say, SPLITTING):
        splits = make_splits(examples, ratios=parse_ratios(data.split), seed=data.seed,
                             stratify=data.task == "classification", val=val, load_test=load_test,
                             test_path=data.test or None, dedup=data.dedup, near_dup_threshold=data.near_dup_threshold,
                             test_texts_for_leak_check=leak_texts)
        if not data.pair_field:  # a pair's two texts are not one phrase that a sentence could hold
            splits.manifest["val_inside_train"] = val_inside_train([e.text for e in splits.train],
                                                                   [e.text for e in splits.val])
    report_skipped(bad, splits.manifest, say)
    say_split(splits.manifest, say)
    check_not_empty(splits.manifest, data, _label_hint(examples, data, section))
    return splits


FIELD_KEYS = ("text_field", "pair_field", "label_field")


def _name_the_field_key(error: BadRowsError, data: Any, section: str = "data") -> DataError:
    """A file none of whose rows has a configured field most likely means a wrong data.*_field: say which key.

    Called only when a file had no good row at all; a few bad rows among good ones are listed as rows.
    """
    if len(error.errors) < 2 or any(not e.message.startswith("is missing") for e in error.errors):
        return error
    missing = {e.field for e in error.errors}
    keys = [k for k in FIELD_KEYS if getattr(data, k) in missing]
    if len(missing) != 1 or not keys:
        return error
    first = error.errors[0]
    field = next(iter(missing))
    return DataError(first.path, None, None,
                     f"{section}.{keys[0]}={field!r}: {len(error.errors)} rows have no field {field!r}, the first at "
                     f"line {first.line} ({first.message.removeprefix('is missing; ')}); set {section}.{keys[0]} to "
                     "the field that holds it")


def check_two_classes(rows: Sequence[Any], data: Any, section: str = "data") -> None:
    """A classification task needs two classes or more: one class only is a wrong label field or a wrong file."""
    classes = {r.label for r in rows}
    if len(classes) == 1:
        raise DataError(data.train, None, data.label_field,
                        f"has one value only ({next(iter(classes))!r} in all {len(rows)} rows): classification needs "
                        f"at least two classes (check {section}.label_field and the file; {section}.task=regression for "
                        "a numeric target)")


def say_split(manifest: dict, say: Callable[[str], None]) -> None:
    counts = manifest.get("counts", {})
    dup = manifest.get("duplicates", {})
    exact = dup.get("exact", {}).get("count", 0)
    near = dup.get("near", {}).get("count", 0)
    removed = manifest.get("dedup", {}).get("removed_from_train", 0)
    say(f"split: train {counts.get('train')}, val {counts.get('val')}, test {counts.get('test')}; "
        f"across splits {exact} exact and {near} near duplicates" + (f", {removed} removed from train" if removed else
                                                                     " (data.dedup=true removes them from train)" if exact + near else ""))
    inside = manifest.get("val_inside_train") or {}
    if inside.get("count"):
        say(f"validation: {inside['count']} of {inside['of']} texts ({100 * inside['count'] / inside['of']:.1f}%, median "
            f"{inside['median_words']} words) occur word for word inside a longer train text, as phrase-level data "
            "split by row does: validation will overstate accuracy on new text (docs/data.md)")
    elif inside.get("checked") is False:
        say(f"validation: not checked for texts inside train texts ({inside['windows']:,} word windows, over the "
            f"{inside['limit']:,} limit)")


MIN_CLASS_EXAMPLES = 10
"""A class with fewer examples than this is warned about: a stratified 8:1:1 split cannot give every split one."""


def warn_about_labels(rows: Sequence[Any], say: Callable[[str], None]) -> list[str]:
    """Warn (and return the warnings) about class labels that differ only in case or whitespace ("Positive " and
    "positive" are two classes) and about classes with fewer than MIN_CLASS_EXAMPLES examples."""
    counts = Counter(r.label for r in rows)
    first = {}
    for r in rows:
        first.setdefault(r.label, f"{r.source}:{r.line}")
    groups: dict[str, list[Any]] = defaultdict(list)
    for label in counts:
        groups[" ".join(str(label).split()).casefold()].append(label)
    said = []
    for labels in groups.values():
        if len(labels) > 1:
            shown = " and ".join(f"{lbl!r} ({counts[lbl]} row{'s' if counts[lbl] != 1 else ''}, first at {first[lbl]})"
                                 for lbl in sorted(labels, key=lambda x: -counts[x]))
            said.append(f"warning: labels {shown} differ only in case or whitespace, so they are {len(labels)} "
                        "classes; fix the data if they mean one")
    for label, n in sorted(counts.items(), key=lambda kv: kv[1]):
        if n < MIN_CLASS_EXAMPLES:
            said.append(f"warning: class {label!r} has only {n} example{'s' if n != 1 else ''} (first at "
                        f"{first[label]}): fewer than {MIN_CLASS_EXAMPLES}, too few to train and be measured on")
    for line in said[:10]:
        say(line)
    if len(said) > 10:
        say(f"warning: ... and {len(said) - 10} more such label warnings")
    return said


def _label_hint(rows: Sequence[Any], data: Any, section: str = "data") -> str:
    """For a classification task with about as many classes as rows: the likely cause (the wrong label field)."""
    classes = len({r.label for r in rows})
    if data.task != "classification" or classes * 2 <= len(rows):
        return ""
    return (f"; {section}.label_field={data.label_field!r} gives {classes} classes for {len(rows)} rows, so most classes "
            "cannot reach validation: is it the label column?")


def check_not_empty(manifest: dict, data: Any, hint: str = "") -> None:
    """Refuse splits that leave validation empty, or a test share (data.split) that came out empty."""
    counts = manifest.get("counts", {})
    if counts.get("val") == 0:
        raise DataError(data.val or data.train, None, None,
                        f"the validation split is empty (data.split={data.split!r}, train {counts.get('train')} rows)"
                        + (hint or ": give more rows, a larger validation share or a data.val file"))
    if counts.get("test") == 0 and not data.test and parse_ratios(data.split)[2] > 0:
        raise DataError(data.train, None, None,
                        f"the test split is empty although data.split={data.split!r} gives it a share"
                        + (hint or ": give more rows or a data.test file (or 9:1:0 for no test split)"))
