"""Bad rows are reported all at once (or skipped with data.skip_bad_rows, counted); labels that differ only in case or
whitespace and tiny classes are warned about; a split that leaves validation empty is refused; NUL bytes are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from honelm.data.readers import BAD_ROWS_SHOWN, BadRows, BadRowsError, read_documents, read_examples
from honelm.data.sections import ChatDataConfig, LabelledDataConfig, chat_splits
from honelm.data.sources import labelled_splits
from honelm.errors import DataError


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def reviews(n: int = 60) -> list[dict]:
    return [{"text": f"review number {i} was {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i in range(n)]


def test_every_bad_row_is_listed_in_one_error(tmp_path):
    rows = reviews()
    rows[3]["text"] = ""
    rows[10]["text"] = "a NUL \u0000 inside"
    del rows[20]["label"]
    path = write_rows(tmp_path / "d.jsonl", rows)
    with (tmp_path / "d.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(BadRowsError) as caught:
        read_examples(path)
    message = str(caught.value)
    assert message.splitlines() == [
        "4 bad rows (fix them, or set data.skip_bad_rows=true to leave them out, counted):",
        f"  {path}:4: field 'text' is empty",
        f"  {path}:11: field 'text' contains a NUL byte (character 7): a binary or corrupted file?",
        f"  {path}:21: field 'label' is missing; available fields: 'text'",
        f"  {path}:61: invalid JSON: Expecting property name enclosed in double quotes (column 2)"]
    assert [e.line for e in caught.value.errors] == [4, 11, 21, 61]


def test_one_bad_row_reads_as_before_and_many_are_cut_with_a_count(tmp_path):
    rows = reviews()
    rows[5]["label"] = 1.5
    with pytest.raises(DataError, match=r"d.jsonl:6: field 'label' has wrong type float") as caught:
        read_examples(write_rows(tmp_path / "d.jsonl", rows))
    assert "bad rows" not in str(caught.value)
    lines = [f"line {i}\n" if i % 2 else "ok \u0000\n" for i in range(50)]  # 25 NUL lines in plain text
    (tmp_path / "t.txt").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(BadRowsError) as caught:
        read_documents(str(tmp_path / "t.txt"))
    shown = str(caught.value).splitlines()
    assert shown[0].startswith("25 bad rows") and len(shown) == 1 + BAD_ROWS_SHOWN + 1
    assert shown[-1] == f"  ... and {25 - BAD_ROWS_SHOWN} more"


def test_skipped_rows_are_counted_in_the_log_and_the_manifest(tmp_path):
    rows = reviews()
    rows[7]["text"] = "   "
    rows[8]["label"] = None
    said: list[str] = []
    data = LabelledDataConfig(train=write_rows(tmp_path / "d.jsonl", rows), skip_bad_rows=True)
    splits = labelled_splits(data, said.append)
    assert splits.manifest["counts"]["train"] + splits.manifest["counts"]["val"] + \
        splits.manifest["counts"]["test"] == 58
    record = splits.manifest["skipped_rows"]
    assert record["count"] == 2 and record["first"][0].endswith("d.jsonl:8: field 'text' is whitespace-only")
    assert said[0] == "data.skip_bad_rows: left out 2 bad row(s); the first 2:" and "d.jsonl:9" in said[2]
    with pytest.raises(BadRowsError, match="2 bad rows"):  # never dropped by default
        labelled_splits(LabelledDataConfig(train=data.train), said.append)
    bad = BadRows(skip=True)
    assert len(read_examples(data.train, bad=bad)) == 58 and len(bad.errors) == 2


def test_chat_rows_are_collected_too(tmp_path):
    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(30)]
    rows[2]["output"] = ""
    rows[4] = {"instruction": "no output"}
    data = ChatDataConfig(train=write_rows(tmp_path / "c.jsonl", rows))
    with pytest.raises(BadRowsError, match=r"(?s)2 bad rows.*c.jsonl:3.*c.jsonl:5"):
        chat_splits(data, print)
    said: list[str] = []
    data.skip_bad_rows = True
    assert chat_splits(data, said.append).manifest["skipped_rows"]["count"] == 2


def test_labels_differing_in_case_or_whitespace_and_tiny_classes_are_warned_about(tmp_path):
    rows = reviews()
    rows[30]["label"] = "pos "
    rows[31]["label"] = "Neg"
    said: list[str] = []
    labelled_splits(LabelledDataConfig(train=write_rows(tmp_path / "d.jsonl", rows)), said.append)
    warnings = [s for s in said if s.startswith("warning:")]
    path = tmp_path / "d.jsonl"
    assert f"warning: labels 'pos' (29 rows, first at {path}:2) and 'pos ' (1 row, first at {path}:31) differ only " \
           "in case or whitespace, so they are 2 classes; fix the data if they mean one" in warnings
    assert any("'neg' (29 rows" in w and "'Neg' (1 row" in w for w in warnings)
    assert f"warning: class 'pos ' has only 1 example (first at {path}:31): fewer than 10, too few to train and be " \
           "measured on" in warnings


def test_a_split_that_leaves_validation_empty_is_refused(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", reviews())
    with pytest.raises(DataError, match=r"the validation split is empty .*data.label_field='text' gives 60 classes "
                                        r"for 60 rows.*is it the label column\?"):
        labelled_splits(LabelledDataConfig(train=path, label_field="text"), lambda _: None)
    tiny = write_rows(tmp_path / "t.jsonl", reviews(2))
    with pytest.raises(DataError, match="the validation split is empty"):
        labelled_splits(LabelledDataConfig(train=tiny), lambda _: None)


def test_one_class_only_is_refused(tmp_path):
    rows = reviews()
    for r in rows:
        r["label"] = "pos"
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"field 'label' has one value only \('pos' in all 60 rows\): classification "
                                        r"needs at least two classes"):
        labelled_splits(LabelledDataConfig(train=path), lambda _: None)
    scores = write_rows(tmp_path / "s.jsonl", [{"text": r["text"], "label": 1.0} for r in rows])
    labelled_splits(LabelledDataConfig(train=scores, task="regression"), lambda _: None)  # a constant target is allowed


def test_a_field_missing_from_every_row_names_the_config_key(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", reviews())
    with pytest.raises(DataError) as caught:
        labelled_splits(LabelledDataConfig(train=path, text_field="body"), lambda _: None)
    assert str(caught.value) == (f"{path}: data.text_field='body': 60 rows have no field 'body', the first at line 1 "
                                 "(available fields: 'text', 'label'); set data.text_field to the field that holds it")
    with pytest.raises(DataError, match=r"task.text_field='body': 60 rows .* set task.text_field to"):  # adapt's task
        labelled_splits(LabelledDataConfig(train=path, text_field="body"), lambda _: None, section="task")
    rows = reviews()
    del rows[3]["label"], rows[9]["label"]  # a few rows only: the rows are the story, not the key
    with pytest.raises(BadRowsError, match="2 bad rows"):
        labelled_splits(LabelledDataConfig(train=write_rows(tmp_path / "e.jsonl", rows)), lambda _: None)
