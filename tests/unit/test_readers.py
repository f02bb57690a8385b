"""Tests for honelm.data.readers: every bad row is a DataError naming file, line and field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from honelm.data.readers import (
    Document,
    Example,
    check_labels_seen,
    expand_paths,
    read_documents,
    read_examples,
)
from honelm.errors import DataError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8"))
    else:
        path.write_bytes(content)
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def error_of(fn: Callable[..., object], *args: object, **kwargs: object) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------- JSONL


def test_jsonl_reads_rows_and_skips_blank_lines(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n\n   \n{"text": "b", "label": 0}\n')
    got = read_examples(p)
    assert got == [Example("a", None, 1, str(p), 1), Example("b", None, 0, str(p), 4)]


def test_jsonl_invalid_json_names_line_3(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n{"text": "c", label}\n')
    e = error_of(read_examples, p)
    assert (e.path, e.line) == (str(p), 3)
    assert "invalid JSON" in e.message
    assert str(e).startswith(f"{p}:3:")


def test_missing_field_names_field_and_lists_available(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jsonl", jsonl([{"text": "a", "label": 1}, {"sentence": "b", "label": 1}]))
    e = error_of(read_examples, p)
    assert (e.line, e.field) == (2, "text")
    assert "'sentence'" in e.message and "'label'" in e.message


@pytest.mark.parametrize("value", ["", "   \n\t"])
def test_empty_text_is_an_error(tmp_path: Path, value: str) -> None:
    p = write(tmp_path / "a.jsonl", jsonl([{"text": "ok", "label": 1}, {"text": value, "label": 1}]))
    e = error_of(read_examples, p)
    assert (e.path, e.line, e.field) == (str(p), 2, "text")


def test_empty_pair_names_the_pair_field(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jsonl", jsonl([{"q": "a", "a": " ", "label": 1}]))
    e = error_of(read_examples, p, text_field="q", pair_field="a")
    assert (e.line, e.field) == (1, "a")


def test_non_string_text_and_non_object_row(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jsonl", jsonl([{"text": 5, "label": 1}]))
    e = error_of(read_examples, p)
    assert (e.line, e.field) == (1, "text") and "int" in e.message
    q = write(tmp_path / "b.jsonl", '{"text": "a", "label": 1}\n["text", 1]\n')
    e = error_of(read_examples, q)
    assert e.line == 2 and "object" in e.message


def test_invalid_utf8_in_jsonl_names_line_field_and_offset(tmp_path: Path) -> None:
    first = b'{"text": "ok", "label": 1}\n'
    p = write(tmp_path / "a.jsonl", first + b'{"text": "ab\xffc", "label": 1}\n')
    e = error_of(read_examples, p)
    assert (e.line, e.field) == (2, "text")
    offset = len(first) + len(b'{"text": "ab')
    assert f"byte offset {offset}" in e.message and "UTF-8" in e.message


@pytest.mark.parametrize(
    "label, kind",
    [(1.5, "float"), (1.0, "float"), (True, "bool"), (None, "null"), ([1], "list"), ({"a": 1}, "object")],
)
def test_wrong_classification_label_type(tmp_path: Path, label: object, kind: str) -> None:
    p = write(tmp_path / "a.jsonl", jsonl([{"text": "a", "label": 1}, {"text": "b", "label": label}]))
    e = error_of(read_examples, p)
    assert (e.line, e.field) == (2, "label")
    assert kind in e.message


def test_mixed_int_and_str_labels(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": "pos"}]
    p = write(tmp_path / "a.jsonl", jsonl(rows))
    e = error_of(read_examples, p)
    assert (e.line, e.field) == (3, "label")
    assert "label type str but earlier rows have int" in e.message


def test_regression_labels(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jsonl", jsonl([{"text": "a", "label": 1}, {"text": "b", "label": 2.5}]))
    got = read_examples(p, task="regression")
    assert [e.label for e in got] == [1.0, 2.5] and all(isinstance(e.label, float) for e in got)
    bad = write(tmp_path / "b.jsonl", jsonl([{"text": "a", "label": "1.5"}]))
    assert error_of(read_examples, bad, task="regression").field == "label"
    boolean = write(tmp_path / "c.jsonl", jsonl([{"text": "a", "label": True}]))
    assert error_of(read_examples, boolean, task="regression").field == "label"
    nan = write(tmp_path / "d.jsonl", '{"text": "a", "label": NaN}\n')
    assert "finite" in error_of(read_examples, nan, task="regression").message


def test_unlabelled_examples(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jsonl", jsonl([{"text": "a"}]))
    assert read_examples(p, label_field=None) == [Example("a", None, None, str(p), 1)]


def test_korean_text_round_trips_unchanged(tmp_path: Path) -> None:
    texts = ["  안녕하세요, 세계!  ", "한국어 문장\t입니다.\n두 번째 줄"]
    p = write(tmp_path / "ko.jsonl", jsonl([{"text": t, "label": "긍정"} for t in texts]))
    got = read_examples(p)
    assert [e.text for e in got] == texts and got[0].label == "긍정"
    q = write(tmp_path / "ko.txt", "안녕하세요 세계\n")
    assert read_documents(q)[0].text == "안녕하세요 세계"


# -------------------------------------------------------------------------------------- JSON


def test_json_array_line_numbers(tmp_path: Path) -> None:
    content = '[\n  {"text": "a", "label": 1},\n\n  {"text": "b",\n   "label": 2},\n  {"text": "c", "label": 3}\n]\n'
    p = write(tmp_path / "a.json", content)
    assert [e.line for e in read_examples(p)] == [2, 4, 6]
    bad = write(tmp_path / "b.json", content.replace('"label": 3', '"label": 3.5'))
    e = error_of(read_examples, bad)
    assert (e.line, e.field) == (6, "label")


def test_json_object_with_single_list(tmp_path: Path) -> None:
    p = write(tmp_path / "a.json", '{"version": 2,\n "data": [\n  {"text": "a", "label": "x"},\n  {"text": "b", "label": "y"}\n]}')
    got = read_examples(p)
    assert [(e.text, e.line) for e in got] == [("a", 3), ("b", 4)]
    two = write(tmp_path / "b.json", '{"a": [], "b": []}')
    assert "exactly one list" in error_of(read_examples, two).message


def test_json_invalid_and_utf8(tmp_path: Path) -> None:
    p = write(tmp_path / "a.json", '[\n{"text": "a", "label": 1},\n{"text": "b" "label": 1}\n]')
    e = error_of(read_examples, p)
    assert e.line == 3 and "invalid JSON" in e.message
    q = write(tmp_path / "b.json", b'[\n{"text": "a", "label": 1},\n{"text": "\xc3(", "label": 1}]')
    e = error_of(read_examples, q)
    assert (e.line, e.field) == (3, "text") and "UTF-8" in e.message


# ----------------------------------------------------------------------------------- CSV/TSV


def test_tsv_int_labels_are_converted(tmp_path: Path) -> None:
    p = write(tmp_path / "a.tsv", "text\tlabel\nhello, world\t0\nbye\t1\n")
    got = read_examples(p)
    assert [(e.text, e.label, e.line) for e in got] == [("hello, world", 0, 2), ("bye", 1, 3)]


def test_tsv_has_no_quoting_and_csv_does(tmp_path: Path) -> None:
    p = write(tmp_path / "a.tsv", 'text\tlabel\n" quoted " phrase\t0\n"open only\t1\n')
    assert [e.text for e in read_examples(p)] == ['" quoted " phrase', '"open only']
    q = write(tmp_path / "a.csv", 'text,label\n"a, b",0\n')
    assert [e.text for e in read_examples(q)] == ["a, b"]


def test_csv_labels_stay_strings_unless_all_ints(tmp_path: Path) -> None:
    p = write(tmp_path / "a.csv", "text,label\na,3\nb,x\n")
    assert [e.label for e in read_examples(p)] == ["3", "x"]
    q = write(tmp_path / "b.csv", "text,label\na,01\nb,1\n")
    assert [e.label for e in read_examples(q)] == ["01", "1"]  # "01" and "1" are not merged


def test_csv_wrong_column_count_after_multiline_field(tmp_path: Path) -> None:
    content = 'text,label\n"first\nsecond\nthird",1\nok,0\n"quoted\nagain",1,extra\n'
    p = write(tmp_path / "a.csv", content)
    e = error_of(read_examples, p)
    assert e.line == 6
    assert "expected 2 columns got 3" in e.message


def test_csv_multiline_field_reports_start_line(tmp_path: Path) -> None:
    good = write(tmp_path / "good.csv", 'text,label\nx,1\n"multi\nline",1\ny,1\n')
    assert [(e.text, e.line) for e in read_examples(good)] == [("x", 2), ("multi\nline", 3), ("y", 5)]
    p = write(tmp_path / "a.csv", 'text,label\nx,1\n"multi\nline",1\n"  \n ",1\n')
    e = error_of(read_examples, p)
    assert (e.line, e.field) == (5, "text")


def test_csv_header_missing_field_and_utf8(tmp_path: Path) -> None:
    p = write(tmp_path / "a.csv", "sentence,label\na,1\n")
    e = error_of(read_examples, p)
    assert (e.line, e.field) == (1, "text") and "'sentence'" in e.message
    q = write(tmp_path / "b.csv", b"text,label\na,1\nb\xfe,1\n")
    e = error_of(read_examples, q)
    assert (e.line, e.field) == (3, "text") and "byte offset 16" in e.message


def test_csv_regression_labels(tmp_path: Path) -> None:
    p = write(tmp_path / "a.csv", "text,label\na,1\nb,-2.5e1\n")
    assert [e.label for e in read_examples(p, task="regression")] == [1.0, -25.0]
    q = write(tmp_path / "b.csv", "text,label\na,1\nb,inf\n")
    e = error_of(read_examples, q, task="regression")
    assert (e.line, e.field) == (3, "label")
    r = write(tmp_path / "c.csv", "text,label\na,high\n")
    assert error_of(read_examples, r, task="regression").line == 2


# ----------------------------------------------------------------------------------- Parquet


def test_parquet_row_numbers(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, 1, 0]}), p)
    assert [(e.text, e.label, e.line) for e in read_examples(p)] == [("a", 0, 1), ("b", 1, 2), ("c", 0, 3)]
    q = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["a", "b", " "], "label": [0, 1, 0]}), q)
    e = error_of(read_examples, q)
    assert (e.path, e.line, e.field) == (str(q), 3, "text")
    r = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0.5, 1.0]}), r)
    assert (error_of(read_examples, r).line, error_of(read_examples, r).field) == (1, "label")


# --------------------------------------------------------------------------------- Documents


def test_documents_lines_paragraphs_files(tmp_path: Path) -> None:
    p = write(tmp_path / "a.txt", "one\ntwo\r\n\n  \nthree\nfour\n")
    assert [(d.text, d.line) for d in read_documents(p)] == [("one", 1), ("two", 2), ("three", 5), ("four", 6)]
    assert [(d.text, d.line) for d in read_documents(p, unit="paragraphs")] == [("one\ntwo", 1), ("three\nfour", 5)]
    assert read_documents(p, unit="files") == [Document("one\ntwo\r\n\n  \nthree\nfour\n", str(p), 1)]


def test_documents_from_dirs_globs_and_structured(tmp_path: Path) -> None:
    write(tmp_path / "d" / "b.txt", "b1\nb2\n")
    write(tmp_path / "d" / "sub" / "a.jsonl", jsonl([{"body": "a1"}]))
    write(tmp_path / "d" / "notes.md", "ignored in directory mode\n")
    write(tmp_path / "d" / ".hidden" / "c.txt", "hidden copy\n")
    got = read_documents(tmp_path / "d", text_field="body")
    assert [d.text for d in got] == ["b1", "b2", "a1"]  # sorted by path: d/b.txt < d/sub/a.jsonl
    assert [d.text for d in read_documents(str(tmp_path / "d" / "*.txt"))] == ["b1", "b2"]
    assert [d.text for d in read_documents(str(tmp_path / "d" / "**" / "*.jsonl"), text_field="body")] == ["a1"]
    assert len(expand_paths([tmp_path / "d", tmp_path / "d" / "b.txt"])) == 2  # no double read


def test_glob_matching_nothing_errors(tmp_path: Path) -> None:
    e = error_of(read_documents, str(tmp_path / "nope*.txt"))
    assert e.line is None and "matched nothing" in e.message
    assert "no such file" in error_of(expand_paths, tmp_path / "missing.txt").message


def test_documents_invalid_utf8_in_txt(tmp_path: Path) -> None:
    p = write(tmp_path / "a.txt", b"fine\nalso fine\nbad \x80 byte\n")
    e = error_of(read_documents, p)
    assert e.line == 3 and "byte offset 19" in e.message
    e = error_of(read_documents, p, unit="files")
    assert e.line == 3 and "byte offset 19" in e.message


def test_documents_structured_empty_text_errors(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jsonl", jsonl([{"text": "x"}, {"text": " "}]))
    e = error_of(read_documents, p)
    assert (e.line, e.field) == (2, "text")


# ------------------------------------------------------------------------------ label checks


def test_check_labels_seen(tmp_path: Path) -> None:
    train = [Example("a", None, "pos", "t", 1), Example("b", None, "neg", "t", 2)]
    check_labels_seen(train, [Example("c", None, "pos", "v", 1)], "val")
    e = error_of(check_labels_seen, train, [Example("c", None, "pos", "v", 1), Example("d", None, "meh", "v", 7)], "val")
    assert (e.path, e.line, e.field) == ("v", 7, "label")
    assert "label 'meh' in the val split never appears in train" in e.message
