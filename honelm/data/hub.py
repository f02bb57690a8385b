"""Datasets by name: `hf:NAME[:CONFIG][@SPLIT]` wherever a data file is accepted, read through `datasets`.

    data.train=hf:imdb@train                 a dataset of the Hugging Face hub (online, or already cached)
    data.train=hf:glue:sst2@train            with a configuration
    data.train=hf:imdb@train[:2000]          any split expression `datasets` accepts (hub datasets only)
    data.train=hf:/data/reviews@train        a dataset saved with `save_to_disk` (a DatasetDict: name the split)
    data.train=hf:./saved_dataset            a saved single Dataset (no split needed), or a dict with one split

A NAME that starts with `/`, `./`, `../` or `~` is a directory written by `Dataset.save_to_disk` or
`DatasetDict.save_to_disk` and is opened with `load_from_disk` (offline; nothing is downloaded);
anything else goes to `load_dataset(NAME, CONFIG, split=SPLIT)`, which needs the hub or its cache.
Without `@SPLIT` a dataset with one split gives that split; one with several is an error naming
them (a test split is never picked silently).

The rows are handed to the strict readers (honelm.data.readers) as a Parquet file's rows are: the
same field checks and the same DataError naming the source (the spec as written), the 1-based row
and the field. One conversion: a `ClassLabel` column gives its label NAMES (what labels.json and
a served classifier should show), and its -1 ("no label") becomes a missing label, which the
readers refuse. `sha256` hashes the rows themselves (sorted-key JSON, in order), so a test split
given as `data.test=hf:…` is recorded in the split manifest like a test file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from honelm.errors import DataError

PREFIX = "hf:"
_LOCAL_STARTS = ("/", "./", "../", "~")


@dataclass(frozen=True)
class HubSpec:
    """A parsed `hf:` spec."""

    spec: str
    """As written (the `source` of every row and DataError)."""
    name: str
    config: str | None
    split: str | None

    @property
    def local(self) -> bool:
        """A directory saved with `save_to_disk`, not a hub name."""
        return self.name.startswith(_LOCAL_STARTS)


def is_hub(item: Any) -> bool:
    """Whether `item` is an `hf:` spec."""
    return isinstance(item, str) and item.startswith(PREFIX)


def parse(spec: str) -> HubSpec:
    """`hf:NAME[:CONFIG][@SPLIT]` → HubSpec (a local NAME keeps its own colons out of CONFIG: it has none)."""
    body = spec[len(PREFIX):]
    body, at, split = body.rpartition("@") if "@" in body else (body, "", "")
    name, _, config = (body, "", "") if body.startswith(_LOCAL_STARTS) else body.partition(":")
    if not name or (at and not split):
        raise DataError(spec, None, None, "expected hf:NAME[:CONFIG][@SPLIT] (NAME a hub dataset or a saved directory)")
    if name.startswith(_LOCAL_STARTS) and config:
        raise DataError(spec, None, None, "a saved dataset directory has no configuration")
    return HubSpec(spec, name, config or None, split or None)


def _pick_split(spec: HubSpec, found: Any) -> Any:
    """The split of a DatasetDict the spec names (or its only one); a Dataset is returned as it is."""
    from datasets import DatasetDict

    if not isinstance(found, DatasetDict):
        if spec.split and found.split is not None and str(found.split) != spec.split:
            raise DataError(spec.spec, None, None, f"this saved dataset is the {found.split!r} split, not {spec.split!r}")
        return found
    splits = list(found)
    if spec.split is None:
        if len(splits) != 1:
            raise DataError(spec.spec, None, None, f"the dataset has splits {', '.join(splits)}: name one with @SPLIT")
        return found[splits[0]]
    if spec.split not in found:
        raise DataError(spec.spec, None, None, f"no split {spec.split!r}; the dataset has {', '.join(splits)}")
    return found[spec.split]


def load(spec: HubSpec) -> Any:
    """The `datasets.Dataset` the spec names; DataError when it cannot be had."""
    try:
        import datasets
    except ImportError:
        raise DataError(spec.spec, None, None, "hf: datasets are read with the `datasets` package, which is not "
                        "installed: pip install 'honelm[hf]'") from None
    try:
        if spec.local:
            path = Path(spec.name).expanduser()
            if not path.is_dir():
                raise DataError(spec.spec, None, None, f"no such dataset directory {path} (written by save_to_disk)")
            found = datasets.load_from_disk(str(path))
        else:
            found = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many unrelated types (offline, missing config, corrupt files)
        raise DataError(spec.spec, None, None, f"cannot load the dataset: {type(e).__name__}: {e}") from None
    return _pick_split(spec, found)


def columns(dataset: Any) -> list[str]:
    return list(dataset.column_names)


def rows(spec: HubSpec, dataset: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row, row) of the dataset, ClassLabel columns as their names (-1 as a missing label)."""
    from datasets import ClassLabel

    labels = {k: f for k, f in dataset.features.items() if isinstance(f, ClassLabel)}
    for i, row in enumerate(dataset, start=1):
        for key, feature in labels.items():
            value = row.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                row[key] = None if value < 0 else feature.int2str(value)
        yield i, row


def sha256(spec: str) -> str:
    """A content hash of the rows an `hf:` spec gives (what the manifest records for a test split given by name)."""
    parsed = parse(spec)
    dataset = load(parsed)
    h = hashlib.sha256()
    for _, row in rows(parsed, dataset):
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
    return h.hexdigest()
