"""`hf:NAME[:CONFIG][@SPLIT]` datasets: a dataset saved with `datasets` itself (offline), read through the strict
readers (the same field checks and DataErrors naming source, row and field) and recorded in the split manifest."""

from __future__ import annotations

import pytest

from honelm.data import hub
from honelm.data.readers import read_documents, read_examples, read_rows
from honelm.data.sections import LabelledDataConfig
from honelm.data.sources import labelled_splits
from honelm.data.splits import unlock_test_split, verify_manifest
from honelm.errors import DataError

datasets = pytest.importorskip("datasets")

WORDS = ["superb", "dull", "lovely", "slow", "bright", "flat", "warm", "thin", "sharp", "vague"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict (train, test) with a ClassLabel label column, saved with save_to_disk."""
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    def split(start: int, n: int):
        return datasets.Dataset.from_dict(
            {"text": [f"the film number {i} was {WORDS[i % 10]} and {WORDS[(i * 3) % 10]}" for i in range(start, start + n)],
             "label": [i % 2 for i in range(start, start + n)]}, features=features)
    out = tmp_path_factory.mktemp("hub") / "reviews"
    datasets.DatasetDict(train=split(0, 40), test=split(100, 10)).save_to_disk(str(out))
    return out


def test_parse_names_configs_splits_and_local_directories():
    assert hub.parse("hf:glue:sst2@validation") == hub.HubSpec("hf:glue:sst2@validation", "glue", "sst2", "validation")
    assert hub.parse("hf:org/imdb@train[:10%]").split == "train[:10%]"
    local = hub.parse("hf:/data/x:y@test")  # a directory's name may hold a colon: no configuration there
    assert local.local and (local.name, local.config, local.split) == ("/data/x:y", None, "test")
    assert not hub.parse("hf:imdb").local and hub.parse("hf:imdb").split is None
    for bad in ("hf:", "hf:imdb@"):
        with pytest.raises(DataError, match="expected hf:NAME"):
            hub.parse(bad)


def test_saved_dataset_reads_as_strict_rows_with_label_names(saved):
    spec = f"hf:{saved}@train"
    examples = read_examples(spec)
    assert len(examples) == 40 and examples[1].label == "positive" and examples[0].label == "negative"
    assert (examples[3].source, examples[3].line) == (spec, 4)
    assert [d.text for d in read_documents(spec)] == [e.text for e in examples]
    assert read_rows(spec)[0].data == {"text": examples[0].text, "label": "negative"}


def test_bad_specs_and_rows_are_data_errors_naming_source_row_and_field(saved, tmp_path):
    with pytest.raises(DataError, match="the dataset has splits train, test: name one with @SPLIT"):
        read_examples(f"hf:{saved}")
    with pytest.raises(DataError, match="no split 'validation'; the dataset has train, test"):
        read_examples(f"hf:{saved}@validation")
    with pytest.raises(DataError, match="field 'sentence' is missing; available fields: 'text', 'label'"):
        read_examples(f"hf:{saved}@train", text_field="sentence")
    with pytest.raises(DataError, match="no such dataset directory"):
        read_examples(f"hf:{tmp_path / 'absent'}@train")
    bad = tmp_path / "bad"
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"text": ["fine", "   ", "x"], "label": [0, 1, 1]}, features=features).save_to_disk(str(bad))
    with pytest.raises(DataError) as err:
        read_examples(f"hf:{bad}")  # one split saved alone: no @SPLIT needed
    assert (err.value.path, err.value.line, err.value.field) == (f"hf:{bad}", 2, "text")
    unlabelled = tmp_path / "unlabelled"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, -1]}, features=features).save_to_disk(str(unlabelled))
    with pytest.raises(DataError) as err:
        read_examples(f"hf:{unlabelled}")  # ClassLabel's -1 ("no label") is a missing label, refused
    assert (err.value.line, err.value.field) == (2, "label")


def test_hub_splits_are_recorded_and_rebuild_identically(saved):
    data = LabelledDataConfig(train=f"hf:{saved}@train", test=f"hf:{saved}@test", split="8:2:0")
    splits = labelled_splits(data, lambda _: None)
    manifest = splits.manifest
    assert manifest["test_source"] == f"hf:{saved}@test" and len(manifest["test_file_sha256"]) == 64
    assert manifest["counts"] == {"train": 32, "val": 8, "test": None}  # a supplied test split is not read here
    verify_manifest(manifest, labelled_splits(data, lambda _: None).manifest)
    with unlock_test_split("a test of the hub reader"):
        test = splits.test
    assert len(test) == 10 and {e.source for e in test} == {f"hf:{saved}@test"}
